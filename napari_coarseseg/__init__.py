"""napari-coarseseg: segmentation networks trained from coarse drawings.

The core (this package minus ``_viewer`` and ``_widgets``) imports neither Qt
nor napari, so it runs headless from Python and from the ``coarseseg``
command. ``train_in_viewer``, ``predict_in_viewer`` and ``live_in_viewer``
import napari on first use.
"""

from ._version import __version__
from .annotations import AnnotationError, Role, simulate, validate_drawing, validate_image
from .inference import Prediction
from .levelset import grow_regions, label_regions
from .methods import METHODS, TrainingRun, load_model, predict
from .methods.recursive import train_recursive
from .methods.refineseg import train_refineseg
from .metrics import dice, match_instances, mean_average_precision, object_f1
from .model_io import Model, ModelFileError, list_shipped_models, read_card, save_model
from .training import TrainingConfig, TrainingEvent, list_presets, load_preset, run_to_end, select_device

__all__ = [
    "__version__",
    "AnnotationError",
    "METHODS",
    "Model",
    "ModelFileError",
    "Prediction",
    "Role",
    "TrainingConfig",
    "TrainingEvent",
    "TrainingRun",
    "list_presets",
    "list_shipped_models",
    "load_model",
    "load_preset",
    "predict",
    "read_card",
    "run_to_end",
    "save_model",
    "select_device",
    "simulate",
    "grow_regions",
    "label_regions",
    "dice",
    "match_instances",
    "mean_average_precision",
    "object_f1",
    "train_recursive",
    "train_refineseg",
    "validate_drawing",
    "validate_image",
]

_VIEWER_FUNCTIONS = ("train_in_viewer", "predict_in_viewer")
_LIVE_FUNCTIONS = ("live_in_viewer",)


def __getattr__(name):
    # Lazy (and left out of __all__), so that importing the core never imports napari or Qt.
    if name in _VIEWER_FUNCTIONS:
        from . import _viewer

        return getattr(_viewer, name)
    if name in _LIVE_FUNCTIONS:
        from . import _live_viewer

        return getattr(_live_viewer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
