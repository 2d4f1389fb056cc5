"""The training methods and their registry: what the rest of the package knows about methods.

Each method is a module in this folder with a :class:`Method` record that
says everything the package asks about it: the drawing roles it takes, its
preset, its length in steps, its training generator, its prediction and the
network a model card describes. The command line builds its options from
:data:`METHODS`, the napari widgets their forms, :func:`load_model` the
network of a file and :func:`predict` the prediction; nothing outside this
folder compares method names.

Adding a method: write ``methods/NAME.py`` (a :class:`TrainingLoop` subclass
with its batch, loss terms and evolution masks; a ``train_NAME`` generator
function; a ``predict_NAME`` function; ``build_model(card)``; and its
:class:`Method` record), then add the record to :data:`METHODS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..annotations import AnnotationError
from ..inference import TILE_SIZE, Prediction, move_channels_for_model
from ..model_io import Model, ModelFileError, check_weight_shapes, load_weights, read_card, resolve_model_path
from ._loop import TrainingLoop, TrainingRun
from ._method import DrawingRole, Method
from .recursive import RECURSIVE
from .refineseg import REFINESEG

__all__ = ["METHODS", "Method", "DrawingRole", "TrainingLoop", "TrainingRun", "get_method", "check_roles",
           "drawing_roles", "DEFAULT_METHOD", "load_model", "predict"]

#: The registry: every method the package trains and applies, by name.
METHODS: dict[str, Method] = {method.name: method for method in (REFINESEG, RECURSIVE)}

#: The method the command line, the viewer functions and the Train widget start with.
DEFAULT_METHOD = REFINESEG.name


def get_method(name: str) -> Method:
    """The registered method of that name; a ``ValueError`` naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def drawing_roles() -> dict[str, list[tuple[Method, DrawingRole]]]:
    """Every drawing role some registered method takes (registry order), with the methods that take it."""
    roles: dict[str, list[tuple[Method, DrawingRole]]] = {}
    for method in METHODS.values():
        for role in method.roles:
            roles.setdefault(role.name, []).append((method, role))
    return roles


def check_roles(method: Method, given: Iterable[str], spell: Callable[[str], str] = lambda role: f"a {role} layer"):
    """Refuse drawing roles ``method`` does not take, and missing roles it requires.

    ``spell`` says how the user sees a role in the message: ``--partial`` on
    the command line, "a partial layer" in napari.

    Raises
    ------
    AnnotationError
        Naming the method the foreign role belongs to, or the missing role.
    """
    given = list(given)
    foreign = [role for role in given if role not in method.role_names]
    if foreign:
        takers = drawing_roles()
        owners = sorted({other.name for role in foreign for other, _ in takers.get(role, [])})
        where = f"the {' or '.join(owners)} method" if owners else "no method"
        raise AnnotationError(f"{', '.join(spell(role) for role in foreign)} belong{'s' if len(foreign) == 1 else ''}"
                              f" to {where}, not {method.name}")
    for role in method.roles:
        if role.required and role.name not in given:
            raise AnnotationError(f"the {method.name} method needs {spell(role.name)}: {role.meaning}")


def load_model(path, device="cpu") -> Model:
    """Load a model file: parse the card, build the network its method describes, load raw tensors.

    ``path`` is a ``.safetensors`` file or the name of a model shipped in
    ``models/`` (:func:`~napari_coarseseg.list_shipped_models`), e.g.
    ``"dsb2018-nuclei-refineseg"``. No code in the file is executed.

    Raises
    ------
    ModelFileError
        If the file is missing, not a safetensors file, carries no valid card
        (a field of the wrong type or out of range, generic or the method's:
        :attr:`Method.check_card`), names a method this napari-coarseseg does
        not know, or its tensors do not match the network the card describes.
        Always one line, naming the file.

    Examples
    --------
    >>> load_model("dsb2018-nuclei-refineseg").method
    'refineseg'
    """
    path = resolve_model_path(path)
    card = read_card(path)
    if card["method"] not in METHODS:
        raise ModelFileError(f"{path}: unknown method {card['method']!r}; this napari-coarseseg knows "
                             f"{', '.join(METHODS)}. Upgrade napari-coarseseg.")
    method = METHODS[card["method"]]
    try:
        if method.check_card is not None:
            method.check_card(card)
        # The skeleton on the meta device allocates nothing: a card whose (in-range) sizes do not match the
        # file's tensors is refused before the network it describes is allocated for real.
        with torch.device("meta"):
            skeleton = method.build_model(card)
    except ModelFileError as error:
        raise ModelFileError(f"{path}: {error}") from None
    check_weight_shapes(path, skeleton)
    model = load_weights(path, method.build_model(card))
    return model.to(device).eval()


def predict(model: Model, image, device="auto", tile_size: int = TILE_SIZE, overlap: int = 64,
            batch_size: int = 4, name: str = "image", keep_probabilities: bool = True, flips: bool = False,
            channel_axis: int | None = None, **options) -> Prediction:
    """Segment an image (2-D, a (Z, Y, X) stack slice by slice, RGB or channels on an axis) with its method.

    Parameters
    ----------
    model : Model
        A trained model (:func:`load_model`).
    image : array_like
        The image, normalised here as during training; lazy arrays (dask,
        zarr, memmap) are read one slice at a time.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    tile_size, overlap : int
        Side of the square tiles and their overlap, in pixels.
    batch_size : int
        Tiles per forward pass.
    name : str
        How to call the image in error messages.
    keep_probabilities : bool
        Return the class probabilities. ``False`` keeps only labels (and
        reliability) and streams the planes: memory stays at one slice's
        probabilities however long the stack.
    flips : bool
        Test-time augmentation: average the network's maps over the four
        mirror images of every tile (four times the prediction time).
    channel_axis : int, optional
        The axis of ``image`` that holds its channels, e.g. 0 for (C, Y, X);
        their number must be the model's (``model.channels``). The labels
        (and reliability) have the image's shape without it; the
        probabilities have the classes first.
    **options
        Options of the model's method: ``prior_correction`` (refineseg,
        default True) and ``prior_strength`` (refineseg, default from the
        card), ``epsilon``, ``gate``, ``seed_level`` and ``spacing`` (recursive;
        default from the card; ``spacing`` is the image's pixel size, see
        :func:`~napari_coarseseg.methods.recursive.predict_recursive`).

    Returns
    -------
    Prediction
    """
    if overlap < 0 or overlap >= tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} with tile_size {tile_size}")
    image = move_channels_for_model(image, model, channel_axis, name)
    return get_method(model.method).predict(model, image, device=device, tile_size=tile_size, overlap=overlap,
                                            batch_size=batch_size, name=name,
                                            keep_probabilities=keep_probabilities, flips=flips, **options)
