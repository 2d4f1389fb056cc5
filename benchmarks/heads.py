"""What the transition heads learn from a biased annotator: do they absorb the bias, or does the network?

RefineSeg's claim: with ``q = A p``, a head ``A`` can take up an annotator's
systematic error so that ``p`` learns the true classes. This script trains the
``refineseg`` preset with its heads (``transition_heads="all"``) on the DSB
training quadrants with scribble drawings whose positive strokes are dilated
by ``--bias`` px (``benchmarks/realdata.py``'s annotator), then reads, on the
training images, the positive layer's head and the network per pixel group:

- ``spill``: drawn positive but truly background (the bias ring: where a head
  should say "observed object | true background", ``A[1, 0]`` high, while
  ``p(object)`` stays low);
- ``stroke``: drawn positive and truly object;
- ``undrawn background``, ``undrawn object``.

Usage::

    python benchmarks/heads.py [--bias 4] [--seed 0] [--steps 500] [--threads 2]

Writes ``heads.md`` and ``heads.json`` into ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import drawings_of, load_dataset  # noqa: E402

from napari_coarseseg import load_preset, run_to_end, train_refineseg  # noqa: E402
from napari_coarseseg.data import iter_normalized_planes  # noqa: E402
from napari_coarseseg.inference import predict_planes  # noqa: E402

from report import write_results  # noqa: E402


def head_maps(heads):
    """Per pixel: p(object), then each head's ``A[1, 0]`` (observed object | true background) and ``A[0, 1]``."""

    def maps(output):
        logits, features = output
        probabilities = torch.softmax(logits.float(), dim=1)
        columns = [probabilities[:, 1:2]]
        for head in heads:
            a = head(features).float()
            columns += [a[:, 1, 0][:, None], a[:, 0, 1][:, None]]
        return torch.cat(columns, dim=1)

    return maps


def groups(positive: np.ndarray, truth: np.ndarray) -> dict:
    """The pixel groups of one training image."""
    drawn, inside = positive > 0, truth > 0
    return {"spill": drawn & ~inside, "stroke": drawn & inside, "undrawn background": ~drawn & ~inside,
            "undrawn object": ~drawn & inside}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bias", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("dsb2018_nuclei")
    positive, negative, _ = drawings_of(data, args.seed, args.bias)
    images = data.images["train"]
    # The paper's model: the preset ships without heads now.
    config = load_preset("refineseg").replace(transition_heads="all")
    model = run_to_end(train_refineseg(images, positive, negative, config=config, seed=args.seed,
                                       steps=args.steps, device="cpu"))
    network = model.network.eval()
    heads = model.heads.eval()
    rows = {}
    for i, image in enumerate(images):
        (maps,) = predict_planes(network, list(iter_normalized_planes(image)), torch.device("cpu"),
                                 head_maps(heads))
        for name, where in groups(positive[0][i], data.labels["train"][i]).items():
            row = rows.setdefault(name, {"pixels": 0, "p_object": 0.0, "A10": 0.0, "A01": 0.0})
            row["pixels"] += int(where.sum())
            row["p_object"] += float(maps[0][where].sum())
            row["A10"] += float(maps[1][where].sum())
            row["A01"] += float(maps[2][where].sum())
    for row in rows.values():
        for key in ("p_object", "A10", "A01"):
            row[key] = row[key] / max(row["pixels"], 1)
    lines = [f"Positive head of the refineseg preset ({args.steps} steps, seed {args.seed}) on the DSB training "
             f"quadrants, positive strokes dilated by {args.bias} px; means per pixel group.", "",
             "| pixels | count | p(object) | A[object drawn, true background] | A[background drawn, true object] |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['pixels']} | {r['p_object']:.3f} | {r['A10']:.3f} | {r['A01']:.3f} |"
              for name, r in rows.items()]
    write_results(args.out, "heads", "\n".join(lines) + "\n",
                  {"bias": args.bias, "seed": args.seed, "steps": args.steps, "groups": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
