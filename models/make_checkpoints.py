"""Train the model checkpoints shipped in ``models/`` from the bundled sample, with the presets' defaults.

- ``dsb2018-nuclei-refineseg.safetensors``: RefineSeg on the whole 512 x 512
  DSB 2018 image from the sample's simulated positive and negative drawings
  (what "Nuclei with coarse drawings" opens in napari);
- ``dsb2018-nuclei-recursive.safetensors``: the recursive method on the 16
  tiles of "Nuclei tiles with partial masks": partial masks on every tile,
  the expert mask on one.

Weights are stored as float16 (half the size; loading casts them back), the
card in the file's header. Next to each file a short model card
``<name>.md`` states what it was trained on, how, and its Dice against the
expert mask of the sample. Seed 0; about 3 minutes on 2 CPU cores.

Usage::

    python models/make_checkpoints.py [--threads 2] [--out models]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from napari_coarseseg import predict, run_to_end, save_model, train_recursive, train_refineseg
from napari_coarseseg.demo import dice
from napari_coarseseg.samples import STRONG_TILE, dsb_nuclei_layers, dsb_nuclei_tiles_layers

SOURCE = ("the DSB 2018 nuclei image bundled in `sample_data/dsb2018_nuclei` (512 x 512 fluorescence, "
          "125 nuclei, CC0; see its SOURCE.md)")


def model_card(name: str, model, what: str, score: float, scored_on: str) -> str:
    training = model.card["training"]
    return f"""# {name}

- Method: {model.card['method']} ({model.card['n_classes']} class: nucleus; {model.card['channels']} channel).
- Trained on {SOURCE}: {what}
- Settings: the `{model.card['method']}` preset of `models/`, seed {training['seed']},
  {training['seconds']:.0f} s on {training['device']}.
- Foreground Dice against the expert mask: **{score:.3f}** ({scored_on}).
- Use: a starting point for fluorescence nuclei like the sample's, and a way to try the Predict widget and
  `coarseseg predict {name} IMAGE --out PRED.tif` at once. It has seen one image: for other images, train on
  your own drawings.
- Made by `python models/make_checkpoints.py`. Weights are float16; the file's header holds the full card
  (`napari_coarseseg.read_card("{name}")`).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    (image, _, _), (positive, _, _), (negative, _, _), (expert, _, _) = dsb_nuclei_layers()
    model = run_to_end(train_refineseg(image, [positive], [negative], device="cpu", seed=0))
    score = dice(predict(model, image, device="cpu").labels > 0, expert > 0)
    name = "dsb2018-nuclei-refineseg"
    save_model(model, out / f"{name}.safetensors", half=True)
    (out / f"{name}.md").write_text(model_card(
        name, model, "positive and negative strokes from `coarseseg simulate --instances` (no exact mask).",
        score, "the training image; the model never saw the expert mask, only drawings simulated from it"))
    print(f"{name}: Dice {score:.3f}", flush=True)

    (tiles, _, _), (partial, _, _), (strong, _, _), (expert_tiles, _, _) = dsb_nuclei_tiles_layers()
    model = run_to_end(train_recursive(tiles, partial, strong, device="cpu", seed=0))
    held = [i for i in range(len(tiles)) if i != STRONG_TILE]
    labels = predict(model, tiles, device="cpu").labels
    score = dice(labels[held] > 0, expert_tiles[held] > 0)
    name = "dsb2018-nuclei-recursive"
    save_model(model, out / f"{name}.safetensors", half=True)
    (out / f"{name}.md").write_text(model_card(
        name, model, f"the image cut into 16 tiles of 128 x 128, partial masks (inner ~45 % of every nucleus, "
        f"`coarseseg simulate --instances`) on all of them and the expert mask on tile {STRONG_TILE} only.",
        score, "the 15 tiles whose exact masks it did not see; their partial masks it did see"))
    print(f"{name}: Dice {score:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
