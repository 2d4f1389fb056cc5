"""Export a model as a bioimage.io model package (format 0.5), for ilastik, deepImageJ, QuPath, bioimageio.core.

The package (one ``.zip``) holds ``rdf.yaml`` and everything it names:

- the network in three weight formats: ONNX, TorchScript, and the PyTorch
  state dict with its architecture as a self-contained source file (this
  package's ``networks.py`` and ``multitask.py``, which need only torch, plus
  the :class:`CoarsesegNetwork` wrapper);
- the input's preprocessing: bioimage.io's ``zero_mean_unit_variance`` per
  image and channel, which is exactly this package's normalisation
  (:func:`napari_coarseseg.data.normalize`, below), so none of it is folded
  into the network;
- a test input (a crop of a sample image) and its test output, the class
  probabilities computed by this package's own :func:`napari_coarseseg.predict`;
- a cover image, the documentation (``README.md``: preprocessing, training
  summary, a Validation section, citations, licence) and the model card.

What the exported network computes: the probabilities ``predict`` returns,
in one forward pass. For a model whose card holds a class prior (refineseg),
:func:`~napari_coarseseg.methods.refineseg.adjust_to_prior`,

    p'(y|x) = p(y|x) (pi_est[y] / pi_train[y]) ** tau / Z,

equals a softmax of the logits plus ``tau log(pi_est / pi_train)``, so that
constant is added to the logits inside the network (:func:`prior_logit_offset`).
A multi-task model (recursive) exports its segmentation task T1's
probabilities; the final level-set growth of its ``predict`` stays outside.

Normalisation: :func:`~napari_coarseseg.data.normalize` maps the ``low`` and
``high`` percentiles to 0 and 1, ``s = (x - lo) / d``, then z-scores ``s``.
An affine map followed by a z-score is the z-score of ``x`` itself,

    (s - mean(s)) / std(s) = (x - mean(x)) / std(x),

so ``zero_mean_unit_variance`` over the image's y and x reproduces it; the
two differ only in their guards against a constant image (ours ``max(std(s),
1e-6)``, bioimage.io's ``std(x) + 1e-6``: a relative 1e-6 / std(x)). The
percentiles cannot go in as bioimage.io's ``scale_range`` step before it:
bioimageio.core 0.11 computes the statistics of every step on the raw input,
so the z-score after it would subtract the raw image's mean (tried: wrong).

Sizes: the input's height and width are ``min + n * step`` with ``step =
2 ** depth`` (the U-Net's pooling) and ``min`` the smallest such size of at
least :data:`MIN_SIDE` px; the output has the input's size (``SizeReference``).
No halo is declared: the output at a tile's border is the network's own, as
in ``predict``, where a plane of at most 512 x 512 px is one tile.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import multitask, networks
from ._version import __version__
from .annotations import AnnotationError
from .inference import check_image_for_model, move_channels_for_model
from .model_io import Model, atomic_write, resolve_model_path
from .multitask import MultiTaskUNet
from .networks import UNet
from .training import models_dir

__all__ = ["export_bioimageio", "ExportReport", "CoarsesegNetwork", "exported_network", "prior_logit_offset",
           "architecture_source", "EXPORT_FORMATS", "MIN_SIDE", "TEST_SIDE"]

#: The package formats ``coarseseg export --format`` writes.
EXPORT_FORMATS = ("bioimageio",)
#: Smallest input side the package declares (rounded up to the network's step): 16 px would run, but a 4 x 4
#: px bottleneck at depth 4 sees too little to be worth a tile.
MIN_SIDE = 64
#: Side of the test input cut from the sample image (or less, for a smaller image).
TEST_SIDE = 256
#: Largest difference allowed between a weight format's output and ``predict`` on the test input; the export
#: refuses to write a package above it (measured: about 1e-6).
TOLERANCE = 1e-4
ONNX_OPSET = 17
LICENSE = "BSD-3-Clause"
INPUT_ID, OUTPUT_ID = "image", "probabilities"

CITATIONS = (
    ("A. Du, N. Aung, T. N. Arvanitis, S. K. Piechnik, J. A. C. Lima, S. E. Petersen, L. Zhang, RefineSeg: Dual "
     "Coarse-to-Fine Learning for Medical Image Segmentation, MICCAI 2025 (the refineseg method).",
     "https://github.com/AnghongDu/RefineSeg-MICCAI2025"),
    ("R. Ke, A. Bugeau, N. Papadakis, M. Kirkland, P. Schuetz, C.-B. Schoenlieb, Multi-task deep learning for image "
     "segmentation using recursive approximation tasks, IEEE Transactions on Image Processing 30, 2021 (the "
     "recursive method).", "https://arxiv.org/abs/2005.13053"),
)


class CoarsesegNetwork(nn.Module):
    """A napari-coarseseg network that returns class probabilities: what bioimage.io runs.

    Parameters
    ----------
    kind : str
        ``"unet"`` (:class:`UNet`) or ``"multitask"`` (:class:`MultiTaskUNet`,
        whose segmentation task T1 gives the probabilities).
    in_channels, n_labels, base_channels, depth, task_levels, separation
        The network's shape, as in the model card.
    logit_offset : list of float, optional
        Added to the logits before the softmax, one per label: the prior
        correction ``tau log(pi_est / pi_train)`` of refineseg models.

    Notes
    -----
    ``forward`` takes a normalised (B, C, H, W) float32 batch, H and W
    multiples of ``2 ** depth``, and returns (B, n_labels, H, W)
    probabilities. This class is copied into the package's architecture file,
    beside the sources of ``UNet`` and ``MultiTaskUNet``; it may use nothing else.
    """

    def __init__(self, kind: str, in_channels: int, n_labels: int, base_channels: int, depth: int,
                 task_levels: int = 2, separation: bool = False, logit_offset=None):
        super().__init__()
        if kind == "unet":
            self.network = UNet(in_channels, n_labels, base_channels, depth)
        elif kind == "multitask":
            self.network = MultiTaskUNet(in_channels, n_labels, base_channels, depth, task_levels, separation)
        else:
            raise ValueError(f"unknown network kind {kind!r}; expected 'unet' or 'multitask'")
        offset = torch.zeros(n_labels) if logit_offset is None else torch.tensor(logit_offset, dtype=torch.float32)
        # Not persistent: the offset is an architecture argument (rdf.yaml shows it), not a weight.
        self.register_buffer("logit_offset", offset.reshape(1, n_labels, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.network(x)
        logits = output[0] if isinstance(output, tuple) else output["segmentation"]
        return torch.softmax(logits.float() + self.logit_offset, dim=1)


@dataclass
class ExportReport:
    """What :func:`export_bioimageio` wrote and measured.

    Attributes
    ----------
    path : Path
        The package.
    differences : dict
        Per weight format, the largest absolute difference between its
        probabilities and ``predict``'s on the test input.
    test_shape : tuple of int
        Shape of the test input, (1, C, Y, X).
    """

    path: Path
    differences: dict = field(default_factory=dict)
    test_shape: tuple = ()


def prior_logit_offset(card: dict) -> list[float] | None:
    """The constant that moves softmax probabilities to the card's estimated class prior, or ``None``.

    ``tau log(pi_est / pi_train)`` per label (tau: the card's prior
    ``strength``, 1 for cards written before it was stored), what
    ``predict`` applies by default; ``None`` for cards without a prior.
    """
    prior = card.get("prior")
    if not prior:
        return None
    strength = float(prior.get("strength", 1.0))
    ratio = np.asarray(prior["estimated"], dtype=np.float64) / np.asarray(prior["training"], dtype=np.float64)
    return [float(v) for v in strength * np.log(ratio)]


def network_kwargs(model: Model) -> dict:
    """The keyword arguments of :class:`CoarsesegNetwork` for ``model`` (the package's architecture kwargs)."""
    network = model.network
    kwargs = {"in_channels": int(network.in_channels), "n_labels": int(network.n_classes),
              "base_channels": int(network.base_channels), "depth": int(network.depth)}
    if isinstance(network, MultiTaskUNet):
        kwargs.update(kind="multitask", task_levels=int(network.task_levels),
                      separation=bool(network.has_separation))
    elif isinstance(network, UNet):
        kwargs["kind"] = "unet"
    else:
        raise ValueError(f"a {type(network).__name__} network cannot be exported yet (U-Nets only)")
    offset = prior_logit_offset(model.card)
    if offset is not None:
        kwargs["logit_offset"] = offset
    return kwargs


def exported_network(model: Model) -> CoarsesegNetwork:
    """``model``'s network wrapped as :class:`CoarsesegNetwork`, on the CPU, in evaluation mode."""
    wrapper = CoarsesegNetwork(**network_kwargs(model))
    wrapper.network.load_state_dict(model.network.state_dict())
    return wrapper.eval()


def architecture_source() -> str:
    """A Python file that defines :class:`CoarsesegNetwork` with torch alone (the state dict's architecture)."""
    parts = ['"""The network of a napari-coarseseg model, as exported for bioimage.io (generated by '
             f'napari-coarseseg {__version__}; needs only torch)."""\n\nfrom __future__ import annotations\n']
    for module in (networks, multitask):
        # One __future__ import may stand at the top of a file only; each module's own goes.
        source = inspect.getsource(module).replace("from __future__ import annotations\n", "")
        parts.append(f"\n# ---- napari_coarseseg/{Path(module.__file__).name} ----\n{source}")
    parts.append(f"\n# ---- the exported wrapper ----\n\n\n{inspect.getsource(CoarsesegNetwork)}")
    return "".join(parts)


def min_side(step: int) -> int:
    """The smallest input side the package declares for a network of this step: :data:`MIN_SIDE` rounded up."""
    return -(-MIN_SIDE // step) * step


def check_dependencies() -> None:
    """A one-line ``ValueError`` naming the extras to install when a package the export needs is missing."""
    from importlib.util import find_spec

    def installed(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    missing = [name for name in ("bioimageio.spec", "onnx", "onnxruntime") if not installed(name)]
    if missing:
        raise ValueError(f"the bioimage.io export needs {', '.join(missing)}: pip install "
                         "'napari-coarseseg[bioimageio]'")


def check_output(out) -> Path:
    """``out`` as a path if a package can be written there; one-line errors otherwise (nothing is written).

    Raises
    ------
    ValueError
        If ``out`` does not end in ``.zip``, is a folder, or its folder does
        not exist or cannot be written to (tried with a temporary file).
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give a file name ending in .zip")
    if out.suffix.lower() != ".zip":
        raise ValueError(f"--out {str(out)!r}: a bioimage.io package is a .zip file; name it e.g. model.zip")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {str(out.parent)!r} does not exist; create it first")
    try:
        # os.access says yes to root on a read-only mount: only writing tells.
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"cannot write to folder {str(out.parent)!r} ({error.strerror or error})") from None
    return out


def check_model(model: Model) -> None:
    """Refuse, in one line, models the package cannot describe exactly."""
    if model.slice_context:
        raise ValueError(f"the model sees {model.slice_context} neighbouring slice(s) on either side as channels "
                         "(slice_context); bioimage.io export supports slice-wise 2-D models (slice_context 0) only")
    norm = model.card.get("normalisation", {})
    if norm.get("kind") != "percentile-zscore":
        raise ValueError(f"the model's normalisation {norm.get('kind')!r} has no bioimage.io equivalent here")


def sample_crop(model: Model, sample=None, channel_axis: int | None = None) -> np.ndarray:
    """The test image: a centred crop of ``sample`` (default: the bundled nuclei image), (Y, X) or (Y, X, C).

    A stack gives its middle slice. The crop's sides are at most
    :data:`TEST_SIDE` and valid input sizes of the package.
    """
    if sample is None:
        if model.channels != 1:
            raise ValueError(f"the bundled sample image is grey but the model takes {model.channels} channels; give "
                             "a sample image with them (--sample IMAGE)")
        from .samples import load_dsb_nuclei

        sample = load_dsb_nuclei()[0]
    image = move_channels_for_model(sample, model, channel_axis, "sample image")
    # A lazy stack (a napari layer of a zarr) passes the check unread; only its middle slice is read.
    image = check_image_for_model(image, model, "sample image")
    if image.ndim - (1 if model.rgb else 0) == 3:
        image = image[image.shape[0] // 2]
    image = check_image_for_model(np.asarray(image), model, "sample image")  # the slice's pixels checked too
    step = int(model.network.divisor)
    smallest = min_side(step)
    sides = [min(TEST_SIDE, n) // step * step for n in image.shape[:2]]
    if min(sides) < smallest:
        raise AnnotationError(f"the sample image is {image.shape[0]} x {image.shape[1]} px; the package needs at "
                              f"least {smallest} x {smallest}")
    top, left = [(n - s) // 2 for n, s in zip(image.shape[:2], sides, strict=True)]
    return np.ascontiguousarray(image[top : top + sides[0], left : left + sides[1]], dtype=np.float32)


def as_input_tensor(image: np.ndarray) -> np.ndarray:
    """(Y, X) or (Y, X, C) -> the package's (1, C, Y, X) float32 layout."""
    planar = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return np.ascontiguousarray(planar[None], dtype=np.float32)


def write_weights(network: CoarsesegNetwork, example: torch.Tensor, folder: Path) -> dict[str, Path]:
    """Write the state dict, its architecture source, TorchScript and ONNX files; their paths by role."""
    paths = {"pytorch_state_dict": folder / "weights.pt", "architecture": folder / "coarseseg_network.py",
             "torchscript": folder / "weights_torchscript.pt", "onnx": folder / "weights.onnx"}
    torch.save(network.state_dict(), paths["pytorch_state_dict"])
    paths["architecture"].write_text(architecture_source())
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns that shapes become constants; the interpolation sizes follow the input (checked at
        # other sizes by bioimage.io's test), so those warnings are noise here. Its own check (3 s) is left
        # to weight_differences, which compares every format with predict.
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(network, example, check_trace=False), str(paths["torchscript"]))
        options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        axes = {0: "batch", 2: "y", 3: "x"}
        torch.onnx.export(network, (example,), str(paths["onnx"]), input_names=[INPUT_ID], output_names=[OUTPUT_ID],
                          dynamic_axes={INPUT_ID: axes, OUTPUT_ID: axes}, opset_version=ONNX_OPSET, **options)
    return paths


def weight_differences(network: CoarsesegNetwork, paths: dict, normalised: np.ndarray,
                       expected: np.ndarray) -> dict[str, float]:
    """Largest absolute difference of each weight format's probabilities from ``expected`` (``predict``'s)."""
    import onnxruntime

    tensor = torch.from_numpy(normalised)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: still bioimage.io's TorchScript format
        outputs = {"pytorch_state_dict": network(tensor).numpy(),
                   "torchscript": torch.jit.load(str(paths["torchscript"]))(tensor).numpy()}
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    outputs["onnx"] = session.run(None, {INPUT_ID: normalised})[0]
    return {name: float(np.abs(output - expected).max()) for name, output in outputs.items()}


def write_tensors(folder: Path, raw: np.ndarray, probabilities: np.ndarray) -> None:
    """The test tensors (.npy, what ``bioimageio test`` compares) and the same as TIFF sample tensors (for people)."""
    import tifffile

    for name, tensor in (("input", raw), ("output", probabilities)):
        np.save(folder / f"test_{name}.npy", tensor)
        tifffile.imwrite(folder / f"sample_{name}.tif", tensor, photometric="minisblack", compression="zlib")


def write_cover(image: np.ndarray, probabilities: np.ndarray, path: Path) -> None:
    """A 2:1 PNG: the test image, and beside it the same with the objects' probability in yellow."""
    import imageio.v3 as iio

    grey = image if image.ndim == 2 else image[..., :3].mean(-1)
    low, high = np.percentile(grey, [1.0, 99.8])
    grey = np.clip((grey - low) / max(high - low, 1e-6), 0, 1)
    objects = 1.0 - probabilities[0]  # every class but background
    overlay = np.stack([grey, grey, grey], -1) * (1 - 0.6 * objects[..., None])
    overlay += 0.6 * objects[..., None] * np.array([1.0, 0.85, 0.0])
    left = np.stack([grey, grey, grey], -1)
    height, width = grey.shape
    # Side by side, each half padded to a square so that the whole is 2:1.
    canvas = np.zeros((max(height, width), 2 * max(height, width), 3))
    canvas[:height, :width] = left
    canvas[:height, max(height, width) : max(height, width) + width] = overlay
    iio.imwrite(path, (np.clip(canvas, 0, 1) * 255).astype(np.uint8))


def normalised_image(model: Model, image: np.ndarray) -> np.ndarray:
    """``image`` normalised as ``predict`` normalises it (what the package's preprocessing gives)."""
    from .data import normalize

    norm = model.card["normalisation"]
    return normalize(image, norm["low"], norm["high"], rgb=image.ndim == 3)


def package_name(name: str) -> str:
    """``name`` in the characters a bioimage.io name may hold (letters, digits, ``_+- ()``), 5 to 128 long."""
    name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", name).strip() or "napari-coarseseg"
    return (name if len(name) >= 5 else f"{name} model")[:128]


def channel_names(model: Model) -> list[str]:
    """Names of the input channels: grey, the colours of an RGB(A) model, else channel0, channel1, ..."""
    if model.channels == 1:
        return ["grey"]
    if model.rgb and model.card.get("channel_axis") is None and model.channels in (3, 4):
        return ["red", "green", "blue", "alpha"][: model.channels]
    return [f"channel{i}" for i in range(model.channels)]


def label_names(model: Model) -> list[str]:
    """Names of the output channels: background, then the card's class names as identifiers."""
    names = model.card.get("class_names") or [f"class {k}" for k in range(1, model.n_classes + 1)]
    return ["background", *(re.sub(r"\W+", "_", str(n)).strip("_") or f"class_{k}" for k, n in
                            enumerate(names, start=1))]


def tensor_descriptions(model: Model, folder: Path):
    """The package's input and output tensor descriptions (``bioimageio.spec`` 0.5 objects)."""
    from bioimageio.spec.model import v0_5 as spec

    step = int(model.network.divisor)
    size = spec.ParameterizedSize(min=min_side(step), step=step)
    per_image = [spec.AxisId("y"), spec.AxisId("x")]  # statistics per image and channel, as normalize()
    image = spec.InputTensorDescr(
        id=spec.TensorId(INPUT_ID),
        description="the raw image (any intensity range); normalised by the preprocessing",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=channel_names(model)),
              spec.SpaceInputAxis(id=spec.AxisId("y"), size=size), spec.SpaceInputAxis(id=spec.AxisId("x"), size=size)],
        test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=spec.FileDescr(source=folder / "sample_input.tif"),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        # The percentile step of our normalisation cancels in the z-score that follows it (module docstring),
        # and bioimage.io tools compute every statistic on the raw input: z-scoring that alone is exact.
        preprocessing=[spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(axes=per_image))],
    )

    def same_as_input(axis: str):
        return spec.SizeReference(tensor_id=spec.TensorId(INPUT_ID), axis_id=spec.AxisId(axis))

    probabilities = spec.OutputTensorDescr(
        id=spec.TensorId(OUTPUT_ID),
        description="class probabilities (background first), as napari-coarseseg's predict gives them",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=label_names(model)),
              spec.SpaceOutputAxis(id=spec.AxisId("y"), size=same_as_input("y")),
              spec.SpaceOutputAxis(id=spec.AxisId("x"), size=same_as_input("x"))],
        test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=spec.FileDescr(source=folder / "sample_output.tif"),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    return image, probabilities


def weights_description(model: Model, paths: dict):
    """The package's weights: the state dict with its architecture file, and TorchScript and ONNX made from it."""
    from bioimageio.spec.model import v0_5 as spec

    version = spec.Version(torch.__version__.split("+")[0])
    architecture = spec.ArchitectureFromFileDescr(source=paths["architecture"], callable=spec.Identifier(
        CoarsesegNetwork.__name__), kwargs=network_kwargs(model))
    return spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(source=paths["pytorch_state_dict"],
                                                             architecture=architecture, pytorch_version=version),
        torchscript=spec.TorchscriptWeightsDescr(source=paths["torchscript"], pytorch_version=version,
                                                 parent="pytorch_state_dict"),
        onnx=spec.OnnxWeightsDescr(source=paths["onnx"], opset_version=ONNX_OPSET, parent="pytorch_state_dict"),
    )


def check_license(license: str) -> str:
    """``license`` if it is an SPDX identifier bioimage.io accepts; a one-line ``ValueError`` otherwise."""
    from bioimageio.spec.model import v0_5 as spec

    try:
        spec.LicenseId(license)
    except ValueError:
        raise ValueError(f"--license {license!r} is not an SPDX licence identifier bioimage.io accepts "
                         f"(e.g. {LICENSE}, CC-BY-4.0, MIT)") from None
    return license


def model_description(model: Model, name: str, folder: Path, paths: dict, authors, license: str, tags):
    """The ``bioimageio.spec`` 0.5 ``ModelDescr`` of the files in ``folder``."""
    from bioimageio.spec.model import v0_5 as spec

    image, probabilities = tensor_descriptions(model, folder)
    classes = ", ".join(label_names(model)[1:])
    return spec.ModelDescr(
        name=package_name(name),
        description=f"Class probabilities ({classes}) of a {model.method} model trained with napari-coarseseg from "
                    f"coarse drawings; exported by napari-coarseseg {__version__}.",
        authors=[spec.Author(name=author) for author in authors],  # no github_user: validating it needs the network
        cite=[spec.CiteEntry(text=text, url=spec.HttpUrl(url)) for text, url in CITATIONS],
        license=spec.LicenseId(license),
        documentation=spec.FileDescr(source=folder / "README.md"),
        covers=[spec.FileDescr(source=folder / "cover.png")],
        attachments=[spec.FileDescr(source=folder / "coarseseg_card.json")],
        tags=["napari-coarseseg", model.method, "2d", "pytorch", "unet", "semantic-segmentation",
              "weakly-supervised", *tags],
        inputs=[image],
        outputs=[probabilities],
        weights=weights_description(model, paths),
    )


def _number(value) -> str:
    """A card value for reading: floats to 4 significant digits, lists and dicts spelt out."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_number(v)}" for k, v in value.items())
    return str(value)


def training_summary(card: dict) -> str:
    """The card's training summary as a markdown list (its settings stay in the attached card)."""
    training = card.get("training", {})
    lines = [f"- method: {card['method']}; {card['n_classes']} class(es): {', '.join(card.get('class_names', []))}; "
             f"{card['channels']} channel(s); network: {_number(card['network'])}"]
    shapes = {"image_shapes": ", ".join(" x ".join(map(str, shape)) for shape in training.get("image_shapes", []))}
    lines += [f"- {key.replace('_', ' ')}: {shapes.get(key) or _number(value)}" for key, value in training.items()
              if key != "config"]
    lines.append("- every setting of the run: `coarseseg_card.json` in this package (the model file's card)")
    return "\n".join(lines)


def what_it_computes(model: Model) -> str:
    """How the exported network's output relates to ``predict``: the prior correction or the multi-task T1."""
    offset = prior_logit_offset(model.card)
    if offset is not None:
        prior = model.card["prior"]
        return (f"Prior correction, folded into the network. The loss gives every drawing layer the same weight, so "
                f"the network's softmax carries the class balance of the drawings ({_number(prior['training'])}), "
                f"not of the images; `predict` moves it to the class frequencies estimated on the training images "
                f"({_number(prior['estimated'])}) with strength tau = {_number(prior.get('strength', 1.0))}: "
                f"p'(y|x) = p(y|x) (estimated[y] / training[y]) ** tau / Z. That equals a softmax of the logits plus "
                f"tau log(estimated / training) = [{_number(offset)}], which the exported network adds to its "
                f"logits (`logit_offset` of the architecture), so its output is `predict`'s probabilities and "
                f"their argmax is `predict`'s labels.")
    if isinstance(model.network, MultiTaskUNet):
        return ("The network is the multi-task U-Net of the recursive method; the package exports its segmentation "
                "task T1's class probabilities, which are the probabilities `predict` returns. `predict`'s labels "
                "go one step further, outside the network: T2's regions grow into T1's foreground by a level-set "
                "rule, so that touching objects stay apart. The argmax of this output is T1's class map, not those "
                "grown labels.")
    return "The network's softmax, as `predict` returns it; the argmax is `predict`'s labels."


def validation_section(differences: dict, test_shape, card_md: Path | None) -> str:
    """The documentation's Validation section: the export's own check and the figures of the model card."""
    _, channels, height, width = test_shape
    measured = ", ".join(f"{name} {value:.1e}" for name, value in sorted(differences.items()))
    text = (f"## Validation\n\nExport check: every weight format was run on the test input (a {height} x {width} "
            f"crop of the sample image, {channels} channel(s)) after the package's preprocessing, and compared with "
            f"napari-coarseseg's own `predict` (CPU, float32), whose probabilities are the test output. Largest "
            f"absolute differences: {measured} (the export refuses anything above {TOLERANCE:g}). "
            "`bioimageio test` reproduces the test output from the test input with each weight format.\n\n")
    figures = [line.strip("- ").strip() for line in card_md.read_text().splitlines()
               if re.search(r"Dice|F1|IoU|mAP|accuracy", line, re.IGNORECASE)] if card_md is not None else []
    if figures:
        text += "Accuracy, from the model card:\n\n" + "\n".join(f"- {line}" for line in figures) + "\n\n"
    else:
        text += "The model card records no accuracy figure.\n\n"
    return text + ("To validate the model on unseen data: predict images that were never drawn on during "
                   "training and that have expert masks, and score the argmax against them (e.g. "
                   "`napari_coarseseg.dice`); with bioimage.io tools, `bioimageio predict` gives the probabilities.\n")


def documentation(model: Model, name: str, differences: dict, test_shape, card_md: Path | None,
                  license: str = LICENSE) -> str:
    """The package's README.md."""
    norm = model.card["normalisation"]
    stacks = ("as napari-coarseseg normalises this model's stacks (slice by slice)." if norm.get("per") == "slice"
              else "napari-coarseseg takes them over the whole stack for this model, so stacks of drifting "
                   "brightness differ.")
    # The card's own headings go two levels down, under this section's.
    card_text = ("## Model card\n\n" + re.sub(r"^#", "###", card_md.read_text().strip(), flags=re.MULTILINE) + "\n\n"
                 if card_md is not None else "")
    citations = "\n".join(f"- {text} {url}" for text, url in CITATIONS)
    return f"""# {name}

A {model.method} model trained with napari-coarseseg (a napari plugin) from coarse
drawings, exported by napari-coarseseg {__version__}. Input: a 2-D image with {model.channels} channel(s)
({', '.join(channel_names(model))}); output: the probability of every class ({', '.join(label_names(model))}).

## Input and preprocessing

`{INPUT_ID}`, axes (batch, channel, y, x), float32, any intensity range. Height and width are
{min_side(int(model.network.divisor))} + n x {int(model.network.divisor)} px (the U-Net halves them
{int(model.network.depth)} times). The preprocessing, `zero_mean_unit_variance` over each channel of the image
(axes y, x), is napari-coarseseg's normalisation exactly: that maps the {norm['low']:g} and {norm['high']:g}
percentiles to 0 and 1 and then z-scores the result, and the z-score of an affine map of the image is the z-score of
the image. Nothing of it is folded into the network. A stack is predicted slice by slice (each slice a batch
entry) with the statistics of each slice: {stacks}

## Output

`{OUTPUT_ID}`, axes (batch, channel, y, x), float32 in [0, 1], the input's height and width; channels:
{', '.join(label_names(model))}. The argmax over channels is the class map.

{what_it_computes(model)}

## Training summary

{training_summary(model.card)}

{card_text}{validation_section(differences, test_shape, card_md)}
## Using it

`bioimageio test` checks the package; `bioimageio predict` (bioimageio.core), ilastik's neural-network workflow,
deepImageJ and QuPath open it. No halo is declared: tile with an overlap if you tile (napari-coarseseg predicts planes
of up to 512 x 512 px in one piece, larger ones in 512 px tiles blended over 64 px).

## Citations

{citations}

## Licence

{license} (this package's weights and files). napari-coarseseg itself is BSD-3-Clause; where the training data's
licence demands it, export with that licence instead (`coarseseg export --license`).
"""


def export_bioimageio(model, out, *, sample=None, channel_axis: int | None = None, authors=None,
                      license: str = LICENSE, name: str | None = None, tags=()) -> ExportReport:
    """Write ``model`` as a bioimage.io model package (format 0.5) to ``out``, a ``.zip`` file.

    Parameters
    ----------
    model : str, Path or Model
        A model file, the name of a shipped model, or a loaded model.
    out : str or Path
        The package to write; it appears only when everything succeeded
        (written under a temporary name, then renamed).
    sample : array_like, optional
        The image the test tensors and the cover are cut from (a centred crop
        of at most 256 x 256 px; a stack's middle slice); default the bundled
        nuclei image (grey models only).
    channel_axis : int, optional
        The axis of ``sample`` that holds its channels.
    authors : list of str, optional
        The package's authors; default ``["napari-coarseseg"]``.
    license : str
        SPDX identifier of the package's licence (default BSD-3-Clause; the
        training data's where that demands it).
    name : str, optional
        The package's name; default the model file's name.
    tags : sequence of str
        Tags added to the package's own (e.g. ``"nuclei"``,
        ``"fluorescence-light-microscopy"``).

    Returns
    -------
    ExportReport

    Raises
    ------
    ValueError
        If ``out`` cannot be written (not ``.zip``, a folder, a missing or
        unwritable folder), the licence is unknown, the model has no
        bioimage.io equivalent (a slice context), or a weight format's output
        differs from ``predict``'s by more than :data:`TOLERANCE`.
    ModelFileError
        If ``model`` names no model file or shipped model.

    Examples
    --------
    >>> report = export_bioimageio("dsb2018-nuclei-refineseg", "nuclei.zip")  # doctest: +SKIP
    >>> report.differences  # doctest: +SKIP
    {'pytorch_state_dict': 4.8e-07, 'torchscript': 4.8e-07, 'onnx': 6.0e-07}
    """
    from .methods import load_model, predict

    # Everything that can be refused is refused before any work.
    check_dependencies()
    out = check_output(out)
    check_license(license)
    path = None if isinstance(model, Model) else resolve_model_path(model)
    model = model if path is None else load_model(path, device="cpu")
    check_model(model)
    name = name or (path.stem if path is not None else f"napari-coarseseg {model.method} model")
    image = sample_crop(model, sample, channel_axis)
    probabilities = predict(model, image, device="cpu").probabilities[None].astype(np.float32)
    network = exported_network(model)
    raw, normalised = as_input_tensor(image), as_input_tensor(normalised_image(model, image))
    # A shipped model's card (models/NAME.md, with its measured accuracy); a user's NAME.md may be anything.
    shipped = path is not None and path.parent.resolve() == models_dir().resolve()
    card_md = path.with_suffix(".md") if shipped and path.with_suffix(".md").is_file() else None
    with tempfile.TemporaryDirectory(prefix="coarseseg-bioimageio-") as folder:
        folder = Path(folder)
        side = min_side(int(model.network.divisor))  # the smallest valid input traces fastest
        paths = write_weights(network, torch.from_numpy(normalised[..., :side, :side]), folder)
        differences = weight_differences(network, paths, normalised, probabilities)
        worst = max(differences, key=differences.get)
        if differences[worst] > TOLERANCE:
            raise ValueError(f"the exported {worst} network differs from napari-coarseseg's prediction by "
                             f"{differences[worst]:.2g} (more than {TOLERANCE:g}); nothing was written")
        write_tensors(folder, raw, probabilities)
        write_cover(image, probabilities[0], folder / "cover.png")
        (folder / "coarseseg_card.json").write_text(json.dumps(model.card, indent=1))
        (folder / "README.md").write_text(documentation(model, name, differences, raw.shape, card_md, license))
        description = model_description(model, name, folder, paths, list(authors or ["napari-coarseseg"]),
                                         license, list(tags))
        package = save_package(description, folder / "package.zip")
        atomic_write(out, lambda tmp: shutil.copyfile(package, tmp))
    return ExportReport(out, differences, tuple(raw.shape))


def save_package(description, path: Path) -> Path:
    """Write ``description`` and its files as a zip with ``bioimageio.spec`` (which validates what it wrote)."""
    from bioimageio.spec import save_bioimageio_package

    return Path(save_bioimageio_package(description, output_path=path))
