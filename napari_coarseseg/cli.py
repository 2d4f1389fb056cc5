"""The ``coarseseg`` command: simulate drawings, train, predict, run the demo.

Every sub-command is a thin wrapper around a Python function of the core, so
``coarseseg train ...`` and :func:`napari_coarseseg.train_refineseg` do the
same thing. Images and drawings are TIFFs or NIfTI volumes (``.nii``,
``.nii.gz``; :mod:`napari_coarseseg.nifti`): an output named ``.nii``/``.nii.gz``
is written on the grid (affine, header) of its NIfTI image, a NIfTI drawing
must lie on its image's grid. ``--channel-axis N`` names the axis of the images
that holds their channels (a 4-D NIfTI, read as (Z, Y, X, C), needs
``--channel-axis 3``); drawings and outputs have the images' shape without it.
Methods that measure distances between pixels (the recursive method's level
set) take the pixel size: a NIfTI's voxel size from its header automatically,
a TIFF's from ``--spacing SY,SX`` (or ``Z,Y,X``), which also overrides a
header's; refineseg measures none and refuses ``--spacing``.
``--method`` and the drawing options (``--positive``, ``--partial``, ...) come
from the method registry (:data:`napari_coarseseg.methods.METHODS`). Errors print one line on stderr
and exit with status 1 (2 for misuse of the command line, as argparse does);
outputs are written only when everything succeeded.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np

from ._version import __version__
from .annotations import MARK_ROLES, MAX_CLASSES, AnnotationError
from .data import NORMALISATIONS
from .io import (
    LABEL_SUFFIXES,
    InputError,
    StagedWrites,
    check_output_folder,
    check_paths,
    check_suffix,
    is_nifti,
    made_folder,
    match_by_name,
    read_tiff,
    resolve_inputs,
    same_file,
)
from .methods import DEFAULT_METHOD, METHODS, check_roles, drawing_roles, get_method, load_model
from .model_io import ModelFileError
from .nifti import NiftiInfo, check_same_grid, nifti_writer, read_nifti
from .resources import check_free_space
from .training import MAX_SLICE_CONTEXT, NETWORKS, PRIOR_STRENGTH_MAX

#: Exceptions that mean "the user's input is wrong": reported in one line.
USER_ERRORS = (AnnotationError, InputError, ModelFileError, ValueError, OSError, FloatingPointError)

#: The seeds numpy and torch both take (torch.manual_seed overflows beyond 2**64 - 1 in its own words).
SEED_MAX = 2**32 - 1


class _Parser(argparse.ArgumentParser):
    """argparse, with misuse reported like every other error: one line, no usage block (``--help`` has it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def _whole(low: int, high: int | None = None, what: str = "a whole number"):
    """An argparse type: a whole number in [low, high], or a message naming the range."""
    bounds = f"from {low} to {high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value
    return parse


def _number(low: float, high: float = float("inf")):
    """An argparse type: a finite number in [low, high], or a message naming the range."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, got {text!r}"
                                             if np.isfinite(high) else f"expected a number >= {low:g}, got {text!r}")
        return value
    return parse


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--spacing -1,1`` as ``--spacing=-1,1``: argparse takes a value starting with '-' for an option unless it
    is a plain negative number, and would answer "expected one argument" instead of checking the value."""
    joined, i = [], 0
    while i < len(argv):
        token = argv[i]
        if (token.startswith("--") and "=" not in token and i + 1 < len(argv) and len(argv[i + 1]) > 1
                and argv[i + 1][0] == "-" and (argv[i + 1][1].isdigit() or argv[i + 1][1] == ".")):
            joined.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            joined.append(token)
            i += 1
    return joined


def _parse_erode(text: str) -> tuple[float, float]:
    """``"3"`` -> (3, 3); ``"2-4"`` -> (2, 4)."""
    try:
        parts = [float(p) for p in text.split("-")] if "-" in text.strip("-") else [float(text)] * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a radius like 3 or a range like 2-4, got {text!r}") from None
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected a radius like 3 or a range like 2-4, got {text!r}")
    return parts[0], parts[1]


def _range_of(what: str, example: str):
    """An argparse type reading ``"3"`` or ``"3-8"`` as (low, high), saying ``what`` is expected if not."""
    def parse(text: str) -> tuple[float, float]:
        try:
            return _parse_erode(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {what} like {example.split('-')[0]} or a range like "
                                             f"{example}, got {text!r}") from None
    return parse


def _add_channel_axis(parser, what: str) -> None:
    """The ``--channel-axis`` option of the sub-commands that read images."""
    parser.add_argument("--channel-axis", type=int, metavar="N",
                        help="the axis of IMAGE that holds its channels (microscopy: 0 for (C, Y, X), 1 for (Z, C, Y, "
                             "X)), counted in the array as read, negative from the end; drawings and outputs have "
                             "the image's shape without it. A 4-D NIfTI (X, Y, Z, C) is read as (Z, Y, X, C): pass 3 "
                             f"(or -1). {what}")


def _add_spacing(parser, what: str) -> None:
    """The ``--spacing`` option of train and predict."""
    parser.add_argument("--spacing", metavar="SY,SX",
                        help="recursive: the pixel size along Y and X, or Z,Y,X (any one unit; Z is not used: "
                             "stacks are grown slice by slice), so that the level set measures physical distances "
                             "on non-square pixels. A NIfTI image gives its voxel size automatically (this "
                             f"overrides it); without either, distances are in pixels. {what}")


def parse_spacing(text: str) -> tuple[float, ...]:
    """``"0.5,1"`` -> (0.5, 1.0): 2 or 3 positive numbers; an ``InputError`` in one line otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 3) or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--spacing must be 2 or 3 positive numbers separated by commas (SY,SX or Z,Y,X), "
                         f"got {text!r}")
    return values


def spacing_option(text: str | None, method: str, function, grids: list = (), files: list = ()) -> dict:
    """``{"spacing": ...}`` for ``function`` (the ``method``'s train or predict) where it takes one (methods that
    measure distances): ``--spacing`` (``text``) if given, else each NIfTI's voxel size (None for a TIFF); ``{}``
    when there is none or the method takes none (``--spacing`` is then refused)."""
    takes = "spacing" in inspect.signature(function).parameters
    given = parse_spacing(text) if text is not None else None
    if given is not None and not takes:
        raise InputError(f"--spacing: the {method} method measures no distances between pixels (no level set); "
                         "leave --spacing out")
    if not takes:
        return {}
    if given is not None:
        return {"spacing": given}
    for grid, file in zip(grids, files, strict=True):
        if grid is not None and not all(np.isfinite(s) and s > 0 for s in grid.spacing):
            raise InputError(f"{Path(file).name}: its header gives voxel size {grid.spacing}, not positive numbers; "
                             "give the pixel size with --spacing SY,SX")
    spacing = [None if grid is None else grid.spacing for grid in grids]
    return {} if all(s is None for s in spacing) else {"spacing": spacing}


def _add_simulate_parser(sub) -> None:
    """The ``simulate`` subcommand and its options (both drawing styles)."""
    sim = sub.add_parser("simulate", help="simulate coarse drawings from a full mask",
                         description="Write positive.tif, negative.tif and partial.tif simulated from a full mask "
                                     "(.nii.gz files on the mask's grid for a NIfTI mask).")
    sim.add_argument("labels", help="full mask TIFF or NIfTI (0 = background, 1..K = classes, or instances)")
    sim.add_argument("--out-dir", required=True, help="folder for positive.tif, negative.tif, partial.tif "
                     "(.nii.gz for a NIfTI mask)")
    sim.add_argument("--style", choices=["eroded", "scribble"], default="eroded",
                     help="eroded: eroded expert masks (clean); scribble: brush strokes as a person draws "
                          "them (default eroded)")
    sim.add_argument("--erode", type=_parse_erode,
                     help="eroded style: erosion radius of positive drawings, a number or a range low-high "
                          "(default 2-4)")
    sim.add_argument("--margin", type=_number(0), default=4.0,
                     help="negative drawings start this many pixels outside a class (default 4)")
    sim.add_argument("--partial-fraction", type=_range_of("a fraction", "0.3-0.6"),
                     help="fraction of each object's area kept in the partial mask, a number or a range drawn "
                          "per object (default 0.45 eroded, 0.3-0.6 scribble)")
    sim.add_argument("--instances", action="store_true",
                     help="the mask is an instance mask (one value per object, all of class 1)")
    sim.add_argument("--seed", type=_whole(0, SEED_MAX), default=0, help="seed of every random choice (default 0)")
    sim.add_argument("--binary", action="store_true",
                     help="every non-zero value of the mask is class 1 (a 0/255 mask saved by an image tool)")
    # The scribble style's options; None = the default of annotations.simulate (refused with --style eroded).
    sim.add_argument("--coverage", type=_number(0, 1),
                     help="scribble: fraction of each drawn object covered by positive strokes (default 0.3)")
    sim.add_argument("--brush-width", type=_range_of("a width", "3-8"),
                     help="scribble: brush diameter in pixels, a number or a range drawn per stroke (default 3-8)")
    sim.add_argument("--edge-noise", type=_number(0),
                     help="scribble: amplitude in pixels of the wobble of stroke ends near borders (default 2)")
    sim.add_argument("--undrawn", type=_number(0, 1),
                     help="scribble: fraction of objects left without positive strokes (default 0.15)")
    sim.add_argument("--sloppy", type=_number(0, 1),
                     help="scribble: fraction of objects whose strokes spill 2-3 pixels over the border "
                          "(default 0.1)")
    sim.add_argument("--negative-coverage", type=_number(0, 1),
                     help="scribble: fraction of the region beyond --margin covered by negative strokes "
                          "(default 0.05)")
    sim.add_argument("--bias", type=int,
                     help="scribble: annotator bias, positive strokes dilated (>0) or eroded (<0) by this many "
                          "pixels (default 0)")


def _add_export_parser(sub) -> None:
    """The ``export`` subcommand: a model as a package other tools open (bioimage.io)."""
    exp = sub.add_parser("export", help="write a model as a bioimage.io package (ilastik, deepImageJ, QuPath)",
                         description="Write MODEL as a bioimage.io model package (format 0.5): ONNX, TorchScript "
                                     "and PyTorch weights, the normalisation as preprocessing, test tensors from "
                                     "napari-coarseseg's own prediction, a cover and documentation. "
                                     "'bioimageio test OUT.zip' checks it. Needs napari-coarseseg[bioimageio].")
    exp.add_argument("model", help="model file written by 'coarseseg train', or the name of a model shipped in "
                     "models/ (e.g. dsb2018-nuclei-refineseg)")
    exp.add_argument("--format", default="bioimageio", help="package format: bioimageio (the only one; default)")
    exp.add_argument("--out", required=True, help="the package to write (.zip)")
    exp.add_argument("--sample", metavar="IMAGE",
                     help="image (TIFF or NIfTI) the test tensors and the cover are cut from (a centred crop of up "
                          "to 256 x 256 px; a stack's middle slice); default the bundled nuclei image (grey models)")
    _add_channel_axis(exp, "Of --sample; it needs the model's channels.")
    exp.add_argument("--author", action="append", default=[], metavar="NAME",
                     help="an author of the package; repeat for several (default: napari-coarseseg)")
    exp.add_argument("--license", default="BSD-3-Clause", metavar="SPDX",
                     help="licence of the package (default BSD-3-Clause); the training data's where it demands one")
    exp.add_argument("--name", help="the package's name (default: the model file's name)")
    exp.add_argument("--tag", action="append", default=[],
                     help="a bioimage.io tag, e.g. nuclei or fluorescence-light-microscopy; repeat for several")


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a model from an image and its coarse drawings",
                           description="Train a model. IMAGE and drawings are TIFFs of identical shape, NIfTI "
                                       "volumes (.nii, .nii.gz) on the same grid, or folders of them matched by "
                                       "file name.")
    train.add_argument("image", help="training image (TIFF or NIfTI) or folder of them")
    train.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD,
                       help="; ".join(f"{method.name}: {method.title}" for method in METHODS.values())
                       + f" (default {DEFAULT_METHOD})")
    # One option per drawing role of the registered methods, e.g. --positive, --partial.
    for role, takers in drawing_roles().items():
        several = any(taker.several for _, taker in takers)
        train.add_argument(f"--{role}", action="append", default=[], metavar=f"{role.upper()}.tif",
                           help=f"{' and '.join(method.name for method, _ in takers)}: {takers[0][1].meaning}"
                           + ("; repeat for several annotators" if several else ""))
    train.add_argument("--out", required=True, help="model file to write (.safetensors)")
    train.add_argument("--preset", help="settings preset from models/ or a JSON file (default: the method's)")
    train.add_argument("--steps", type=_whole(1),
                       help="training steps (per iteration where a method has iterations; default from the preset)")
    train.add_argument("--iterations", type=_whole(1),
                       help="iterations K of methods that have them (recursive; default from the preset)")
    train.add_argument("--slice-context", type=_whole(0, MAX_SLICE_CONTEXT), metavar="K",
                       help="stacks, 2.5-D: each slice also sees the K slices above and below it as extra "
                            "channels (0: slice-wise 2-D; default from the preset: 0); predict reads it from "
                            "the model")
    train.add_argument("--network", choices=NETWORKS,
                       help="refineseg's network: 'unet' (2-D, slice-wise or 2.5-D) or 'unet3d' (an anisotropic 3-D "
                            "encoder over the slab of 2K + 1 slices that --slice-context K >= 1 gives; default from "
                            "the preset: unet); predict reads it from the model")
    train.add_argument("--normalisation", choices=sorted(NORMALISATIONS),
                       help="what intensities are normalised over: 'image' (the whole image or volume) or "
                            "'slice' (each slice on its own: serial sections whose brightness drifts; default "
                            "from the preset: image); predict reads it from the model")
    train.add_argument("--classes", type=_whole(1, MAX_CLASSES),
                       help=f"number of classes K, 1..{MAX_CLASSES} (default: the largest drawn value)")
    train.add_argument("--binary", action="store_true",
                       help="every non-zero value of a drawing of classes (positive, negative, partial, strong) is "
                            "class 1: for 0/255 masks saved by image tools")
    train.add_argument("--seed", type=_whole(0, SEED_MAX), default=0, help="random seed (default 0)")
    train.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    train.add_argument("--batch-size", type=_whole(1), metavar="B",
                       help="patches per optimiser step (default from the preset); with several processes "
                            "(torchrun) the total over all of them, each taking B / N")
    train.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
                       help="under torchrun with several processes: how they exchange gradients (auto: nccl on "
                            "GPUs, gloo on CPUs)")
    train.add_argument("--evolution", metavar="EVO.tif",
                       help="write the masks on the training image at each checkpoint, iteration 0 first "
                            "(.nii.gz for a NIfTI image: iterations on the fourth axis)")
    train.add_argument("--checkpoint-every", type=_whole(1), metavar="N",
                       help="write MODEL.checkpoint every N steps (default from the preset: 50); a killed run "
                            "loses at most N steps; the file is removed once the model is written")
    train.add_argument("--init", metavar="MODEL",
                       help="start from the weights of this model (a file or a shipped model's name) of the same "
                            "method, classes and channels, instead of at random")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from MODEL.checkpoint (same inputs and options); "
                            "--evolution then holds the planes from the resumed part on")
    _add_channel_axis(train, "Default: no channel axis (grey, or colour on a last axis of 3 or 4).")
    _add_spacing(train, "The model card records it. refineseg measures no distances: refused there.")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_predict_parser(sub) -> None:
    pred = sub.add_parser("predict", help="segment images with a trained model")
    pred.add_argument("model", help="model file written by 'coarseseg train', or the name of a model shipped "
                      "in models/ (e.g. dsb2018-nuclei-refineseg)")
    pred.add_argument("image", help="image (TIFF or NIfTI) or folder of them")
    pred.add_argument("--out", required=True, help="output TIFF, or NIfTI (.nii, .nii.gz) on the grid of a NIfTI "
                      "image (a folder, for a folder of images: files named like the images)")
    pred.add_argument("--probabilities", metavar="PROB.tif", nargs="?", const=True,
                      help="also write class probabilities (classes first); single image only; for a zarr input "
                           "without a file name: into OUT.zarr/probabilities")
    pred.add_argument("--reliability", metavar="REL.tif",
                      help="also write the annotation-reliability map; single image only")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    pred.add_argument("--flips", action="store_true",
                      help="test-time augmentation: average over the four mirror images (4x the time)")
    pred.add_argument("--prior-strength", type=_number(0, PRIOR_STRENGTH_MAX), metavar="TAU",
                      help=f"refineseg models: exponent of the class-prior correction, 0 (off) to "
                           f"{PRIOR_STRENGTH_MAX:g} (default the model's, 1: Bayes' rule); "
                           "3 helps sparse scribbles whose background strokes stay far from the objects")
    _add_channel_axis(pred, "The image needs the model's channels, in the order it was trained on.")
    _add_spacing(pred, "Default for a TIFF: the model card's (the training images' pixel size). Refused for "
                       "refineseg models.")
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    # Zarr inputs, chunk by chunk, on a dask cluster (napari_coarseseg.zarr_predict).
    pred.add_argument("--scheduler", metavar="ADDRESS",
                      help="zarr input: run the chunks on the workers of this dask scheduler (tcp://HOST:PORT)")
    pred.add_argument("--workers", type=_whole(1), metavar="N",
                      help="zarr input: run the chunks on a local cluster of N processes (one thread each)")
    pred.add_argument("--resume", action="store_true",
                      help="zarr input: continue --out OUT.zarr, skipping the chunks already written")
    pred.add_argument("--chunks", metavar="Z,Y,X",
                      help="zarr input: the output's chunks, one task each (default about 4 M pixels, planes up "
                           "to 3072 px on a side whole)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coarseseg",
        description="Train segmentation networks from coarse drawings (RefineSeg, recursive approximation) "
                    "and apply them.",
    )
    parser.add_argument("--version", action="version", version=f"napari-coarseseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_simulate_parser(sub)

    _add_train_parser(sub)
    _add_predict_parser(sub)

    demo = sub.add_parser("demo", help="run the whole pipeline on the bundled sample image",
                          description="Simulate drawings on the bundled DSB 2018 nuclei image, train on its "
                                      "left half, segment the whole image, score the right half against the "
                                      "expert mask and write outputs plus a figure.")
    demo.add_argument("--out-dir", default="coarseseg-demo", help="output folder (default ./coarseseg-demo)")
    demo.add_argument("--steps", type=_whole(1), help="training steps (default from the preset)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_export_parser(sub)
    return parser


class _Progress:
    """A tqdm bar fed by training events (silent when not on a terminal or quiet)."""

    def __init__(self, total: int, quiet: bool, description: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit="step", disable=quiet or None, leave=True,
                        dynamic_ncols=True)

    def __call__(self, event) -> None:
        if event.step > self.bar.n:
            self.bar.update(event.step - self.bar.n)
        if event.losses:
            self.bar.set_postfix(loss=f"{event.losses['total']:.3f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def read_image(path, channel_axis: int | None = None) -> tuple[np.ndarray, NiftiInfo | None]:
    """A TIFF (grid ``None``) or a NIfTI volume in (Z, Y, X) order with its grid.

    With ``channel_axis`` a NIfTI must have four axes, (X, Y, Z, C), read as
    (Z, Y, X, C): its channel axis is 3 (or -1), which is refused otherwise.
    A TIFF is read as it is; the caller moves its channel axis.
    """
    if not is_nifti(path):
        return read_tiff(path), None
    if channel_axis is not None and channel_axis not in (3, -1):
        raise InputError(f"--channel-axis {channel_axis}: {Path(path).name} is a NIfTI, read as (Z, Y, X, C) with "
                         "its channels on the fourth axis; pass --channel-axis 3")
    return read_nifti(path, channels=channel_axis is not None)


def check_outputs(outputs: list[tuple[Path, Path]]) -> None:
    """Refuse, before any work, an (output, image) pair with a NIfTI output and a TIFF image: no affine to take."""
    for target, image in outputs:
        if is_nifti(target) and not is_nifti(image):
            raise InputError(f"{str(target)!r} is a NIfTI name but its image {Path(image).name} is a TIFF: a NIfTI "
                             "output takes the grid of a NIfTI image; name it .tif")


def stage(staged: StagedWrites, target: Path, array: np.ndarray, grid: NiftiInfo | None) -> None:
    """Stage one output: a NIfTI on the image's grid when ``target`` is named .nii/.nii.gz, else a TIFF."""
    if is_nifti(target):
        staged.add(target, write=nifti_writer(array, grid, compressed=target.name.lower().endswith(".gz")))
    else:
        staged.add(target, array)


def _as_binary(array: np.ndarray) -> np.ndarray:
    """``--binary``: every non-zero value is class 1."""
    return (np.asarray(array) != 0).astype(np.uint8)


def cmd_simulate(args) -> int:
    from .annotations import SCRIBBLE_DEFAULTS, simulate

    # Every path checked before the mask is read: the folder, and that no output overwrites the mask.
    if Path(args.labels).is_dir():
        raise InputError(f"LABELS {args.labels!r} is a folder; simulate takes one mask file")
    labels_path = resolve_inputs(args.labels)[0]
    out_dir = check_output_folder(args.out_dir, "--out-dir", create=True)
    suffix = ".nii.gz" if is_nifti(labels_path) else ".tif"  # drawings of a NIfTI mask lie on its grid
    targets = {name: out_dir / f"{name}{suffix}" for name in ("positive", "negative", "partial")}
    check_paths([("LABELS", labels_path)], [(f"--out-dir's {path.name}", path) for path in targets.values()])
    labels, grid = read_image(labels_path)
    if args.binary:
        labels = _as_binary(labels)
    scribble = {name: getattr(args, name) for name in SCRIBBLE_DEFAULTS}  # None where not given
    drawings = simulate(labels, erode=args.erode, margin=args.margin, partial_fraction=args.partial_fraction,
                        instances=args.instances, seed=args.seed, style=args.style, **scribble)
    with made_folder(out_dir), StagedWrites() as staged:
        for name, target in targets.items():
            stage(staged, target, getattr(drawings, name), grid)
    print(f"wrote {', '.join(str(p) for p in staged.paths)}")
    return 0


def _training_files(args, method) -> tuple[list[Path], dict[str, list[list[Path | None]]]]:
    """The image files and, per role given, each layer's file per image (None where it has none), resolved
    before anything is read; a drawing that is the image itself is refused."""
    # The options are checked before any file is read.
    given = {role: getattr(args, role) for role in drawing_roles() if getattr(args, role)}
    check_roles(method, given, spell=lambda role: f"--{role}")
    image_files = resolve_inputs(args.image)
    files = {role: [match_by_name(image_files, path, role) for path in paths] for role, paths in given.items()}
    for role, layers in files.items():
        for layer in layers:
            for drawing, image in zip(layer, image_files, strict=True):
                if drawing is not None and same_file(drawing, image):
                    raise InputError(f"--{role} {str(drawing)!r} is the image itself; a drawing is a Labels layer "
                                     "saved as a file of its own (0: not drawn, k: class k)")
    return image_files, files


def _read_training_set(args, image_files, files):
    """The images, their NIfTI grids (None for a TIFF) and the drawing layers per role, matched to the images
    (None where missing); ``--binary`` makes every non-zero value of a drawing of classes class 1."""
    images, grids = zip(*(read_image(p, args.channel_axis) for p in image_files), strict=True)

    def drawing(path, role, grid):
        array, own = read_image(path)
        if own is not None and grid is not None:
            check_same_grid(own, grid, f"{role} drawing")  # a drawing elsewhere in space is refused, not trained on
        return _as_binary(array) if args.binary and role not in MARK_ROLES else array

    layers = {role: [[None if p is None else drawing(p, role, grid) for p, grid in zip(layer, grids, strict=True)]
                     for layer in per_role] for role, per_role in files.items()}
    return list(images), list(grids), layers


def checkpoint_path(model_path) -> Path:
    """Where ``coarseseg train --out MODEL`` keeps its checkpoint: ``MODEL.checkpoint``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".checkpoint")


def _initial_model(path, method):
    """The model ``--init`` names, checked against the method before any training."""
    try:
        model = load_model(path, device="cpu")
    except (ModelFileError, OSError) as error:
        raise InputError(f"--init: {error}") from error
    if model.method != method.name:
        raise InputError(f"--init: {path} is a {model.method} model; this run trains {method.name} "
                         f"(pick a {method.name} model or --method {model.method})")
    if "init" not in inspect.signature(method.train).parameters:
        raise InputError(f"--init: the {method.name} method cannot start from a model; leave --init out")
    return model


def cmd_train(args) -> int:
    """``coarseseg train``; under ``torchrun --nproc-per-node N`` one model trained by the N processes, rank 0 writing
    it and reporting (:mod:`napari_coarseseg.data_parallel`)."""
    from .data_parallel import OTHER_RANKS_REPORT_AFTER_S, joined_processes, launched_rank

    rank = launched_rank()
    if rank:
        args.quiet = True  # the progress bar and the timing line are rank 0's
    try:
        with joined_processes(args.device, args.dist_backend) as (ranks, device):
            return _train(args, ranks, device)
    except KeyboardInterrupt:
        if not rank:
            raise
        return 130  # Ctrl-C reaches every process: rank 0 says how to resume
    except USER_ERRORS as error:
        if not rank:
            raise
        # Every process reads the same inputs and settings, so rank 0 meets the same error and reports it, and
        # torchrun then stops this process. An error of this process's own (a file it alone cannot read) it
        # reports itself, after that while.
        time.sleep(OTHER_RANKS_REPORT_AFTER_S)
        raise InputError(f"rank {rank}: {error}") from error


def _train(args, ranks, device) -> int:
    from .model_io import save_model
    from .training import load_preset, run_to_end

    method = get_method(args.method)
    # Options first, then every path, then the files are read: nothing is read or written for a run that would be
    # refused later, and no output may overwrite an input.
    spacing_option(args.spacing, method.name, method.train)  # a bad --spacing is refused before any file is read
    config = load_preset(args.preset or method.preset)
    config = config.replace(steps=args.steps, iterations=args.iterations, checkpoint_every=args.checkpoint_every,
                            slice_context=args.slice_context, normalisation=args.normalisation,
                            network=args.network)
    config = config.replace(batch_size=args.batch_size).validate()
    out = check_suffix(args.out, (".safetensors",), "--out", "a model")
    if out.is_dir():
        raise InputError(f"--out {str(out)!r} is a folder; give the model file's name (e.g. "
                         f"{str(out / 'model.safetensors')!r})")
    check_output_folder(out, "--out")
    if args.resume and not checkpoint_path(out).is_file():
        raise InputError(f"--resume: there is no checkpoint {str(checkpoint_path(out))!r}; start without --resume")
    image_files, files = _training_files(args, method)
    evolution_targets = []
    if args.evolution:
        evolution_path = Path(args.evolution)
        if len(image_files) > 1 and not evolution_path.is_dir():
            raise InputError("--evolution needs a folder when training on a folder of images")
        evolution_targets = [evolution_path / file.name if evolution_path.is_dir() else evolution_path
                             for file in image_files]
        for target in evolution_targets:
            check_suffix(target, LABEL_SUFFIXES, "--evolution", "a stack of masks")
            check_output_folder(target, "--evolution")
    check_outputs([(target, image_files[i]) for i, target in enumerate(evolution_targets)])
    inputs = [("IMAGE", file) for file in image_files]
    inputs += [(f"--{role}", file) for role, layers in files.items() for layer in layers for file in layer if file]
    inputs += [(option, Path(value)) for option, value in (("--preset", args.preset), ("--init", args.init))
               if value and Path(value).is_file()]
    check_paths(inputs, [("--out", out), ("the checkpoint", checkpoint_path(out)),
                         *(("--evolution", target) for target in evolution_targets)])
    init = _initial_model(args.init, method) if args.init else None
    images, grids, layers = _read_training_set(args, image_files, files)
    spacing = spacing_option(args.spacing, method.name, method.train, grids, image_files)
    # NIfTI voxels are grey values: a volume whose X happens to be 3 or 4 long is no RGB picture. Channels come
    # through --channel-axis, which implies them.
    if args.channel_axis is not None:
        channels = {"channel_axis": args.channel_axis}
    else:
        channels = {"rgb": False} if all(grid is not None for grid in grids) else {}
    if evolution_targets:
        # One plane per evolution step, at most two bytes a pixel (labels), uncompressed.
        planes = method.total_steps(config) // max(config.evolution_every, 1) + 2
        check_free_space(evolution_targets[0].parent, 2 * planes * sum(image.size for image in images),
                         "--evolution")

    evolution: list[list[np.ndarray]] = []

    def collect(event):
        progress(event)
        if event.masks is not None and ranks.main:
            evolution.append(event.masks)

    progress = _Progress(method.total_steps(config), args.quiet or not ranks.main, "training")
    try:
        training = method.start(images, layers, config=config, n_classes=args.classes, seed=args.seed,
                                device=device, names=[p.name for p in image_files],
                                checkpoint=checkpoint_path(out), resume=args.resume, **channels, **spacing,
                                **({"init": init} if init is not None else {}))
        model = run_to_end(training, collect)
    finally:
        progress.close()
    if not ranks.main:
        return 0  # one model, written once: by rank 0
    # The model goes last so that a failing evolution write leaves no model.
    with StagedWrites() as staged:
        for i, target in enumerate(evolution_targets):
            stage(staged, target, np.stack([masks[i] for masks in evolution]), grids[i])
    save_model(model, out)
    checkpoint_path(out).unlink(missing_ok=True)  # the run is complete
    summary = model.card["training"]
    print(f"wrote {out} ({method.describe_length(config)} in {summary['seconds']:.1f} s on {summary['device']})")
    return 0


def _prediction_targets(args, image_files: list[Path]) -> tuple[list[Path], dict[str, Path]]:
    """The label files a TIFF/NIfTI prediction writes (one per image) and the extra maps asked for, checked before
    anything is read: names a format can take, folders that exist and can be written to."""
    out = Path(args.out)
    if len(image_files) > 1 or Path(args.image).is_dir():
        if not out.is_dir():
            raise InputError(f"--out {str(out)!r} must be an existing folder when IMAGE is a folder")
        if args.probabilities or args.reliability:
            raise InputError("--probabilities and --reliability need a single image, not a folder")
        targets = [out / p.name for p in image_files]
    elif out.is_dir():
        targets = [out / image_files[0].name]
    else:
        targets = [check_suffix(out, LABEL_SUFFIXES, "--out", "a prediction")]
    extras = {option: check_suffix(path, LABEL_SUFFIXES, option, "a map")
              for option, path in (("--probabilities", args.probabilities), ("--reliability", args.reliability))
              if path}
    for option, path in [*(("--out", target) for target in targets[:1]), *extras.items()]:
        check_output_folder(path, option)
    check_outputs([*zip(targets, image_files, strict=True), *((extra, image_files[0]) for extra in extras.values())])
    return targets, extras


def cmd_predict(args) -> int:
    from .methods import predict
    from .model_io import resolve_model_path

    model_path = resolve_model_path(args.model)
    from .zarr_predict import check_zarr_arguments, predict_zarr_command, zarr_requested

    zarr = zarr_requested(args)
    if zarr:
        block = check_zarr_arguments(args)  # reads no model and no store
    else:
        if args.probabilities is True:
            raise InputError("--probabilities needs a file name (PROB.tif) for TIFF and NIfTI images")
        image_files = resolve_inputs(args.image)
        targets, extras = _prediction_targets(args, image_files)
        check_paths([("MODEL", model_path), *(("IMAGE", file) for file in image_files)],
                    [*(("--out", target) for target in targets), *extras.items()])
    model = load_model(model_path)
    predict_function = get_method(model.method).predict
    spacing_option(args.spacing, model.method, predict_function)  # a bad --spacing is refused before any image is read
    options = {}
    if args.prior_strength is not None:
        # Only methods whose predict takes a prior strength (refineseg's) accept the flag.
        if "prior_strength" not in inspect.signature(predict_function).parameters:
            raise InputError(f"--prior-strength is not an option of {model.method} models ({args.model}); "
                             "leave it out")
        options["prior_strength"] = args.prior_strength
    if args.reliability and not len(model.heads):
        raise InputError(f"--reliability: {args.model} (a {model.method} model) has no transition heads, so no "
                         "reliability map; leave --reliability out")
    if zarr:
        return predict_zarr_command(args, {**options, **spacing_option(args.spacing, model.method, predict_function)},
                                    block)
    from tqdm.auto import tqdm

    # All outputs appear together at the end, or none if any image fails.
    with StagedWrites() as staged:
        for file, target in tqdm(list(zip(image_files, targets, strict=True)), desc="predicting", unit="image",
                                 disable=args.quiet or None):
            image, grid = read_image(file, args.channel_axis)
            # The image's own pixel size (--spacing, or a NIfTI's, the one entry of the per-image list); a TIFF
            # without --spacing gets none here, and the method takes the card's.
            spacing = {key: value[0] if isinstance(value, list) else value
                       for key, value in spacing_option(args.spacing, model.method, predict_function, [grid],
                                                        [file]).items()}
            prediction = predict(model, image, device=args.device, name=file.name,
                                 keep_probabilities="--probabilities" in extras, flips=args.flips,
                                 channel_axis=args.channel_axis, **options, **spacing)
            stage(staged, target, prediction.labels, grid)
            # Probabilities have the classes first: in a NIfTI, on the fourth axis.
            if "--probabilities" in extras:
                stage(staged, extras["--probabilities"], prediction.probabilities.astype(np.float32), grid)
            if "--reliability" in extras:
                stage(staged, extras["--reliability"], prediction.reliability.astype(np.float32), grid)
    print(f"wrote {len(targets)} prediction{'s' if len(targets) > 1 else ''} to "
          f"{targets[0] if len(targets) == 1 else args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    check_output_folder(args.out_dir, "--out-dir", create=True)  # before two minutes of training, not after
    result = run_demo(args.out_dir, steps=args.steps, device=args.device, quiet=args.quiet)
    print(f"Dice on the held-out right half: {result['dice']:.3f}; outputs in {result['out_dir']}")
    return 0


def cmd_export(args) -> int:
    from .bioimageio_export import EXPORT_FORMATS, check_dependencies, check_output, export_bioimageio
    from .model_io import resolve_model_path

    # Refused before any file is read or written: the format, the output, the model's name and card.
    if args.format not in EXPORT_FORMATS:
        raise InputError(f"--format {args.format!r} is not a package format this napari-coarseseg writes; use "
                         f"{' or '.join(EXPORT_FORMATS)}")
    check_output(args.out)
    model = resolve_model_path(args.model)
    check_paths([("MODEL", model), *((("--sample", Path(args.sample)),) if args.sample else ())],
                [("--out", Path(args.out))])
    load_model(model, device="cpu")  # its card checked in a moment, before bioimage.io's libraries load (seconds)
    check_dependencies()
    sample = read_image(args.sample, args.channel_axis)[0] if args.sample else None
    report = export_bioimageio(model, args.out, sample=sample, channel_axis=args.channel_axis,
                               authors=args.author or None, license=args.license, name=args.name, tags=args.tag)
    worst = max(report.differences.values())
    print(f"wrote {report.path} (bioimage.io model: weights {', '.join(sorted(report.differences))}; largest "
          f"difference to coarseseg predict on the test image {worst:.1e})")
    return 0


COMMANDS = {"simulate": cmd_simulate, "train": cmd_train, "predict": cmd_predict, "demo": cmd_demo,
            "export": cmd_export}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    start = time.perf_counter()
    try:
        status = COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"coarseseg {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "train" and checkpoint_path(args.out).is_file():
            print(f"coarseseg train: interrupted; no model was written. Continue with the same command and "
                  f"--resume (checkpoint {checkpoint_path(args.out)})", file=sys.stderr)
        else:
            print(f"coarseseg {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"coarseseg {args.command}: error: out of memory; use smaller images or --device cpu",
              file=sys.stderr)
        return 1
    if not getattr(args, "quiet", False):
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
