"""Distributed prediction: megapixels per second on a zarr volume, one process against one and two dask workers.

The volume: the bundled DSB 2018 nuclei image mirrored up to Y x X (default
2048 x 2048), each slice shifted by 37 px from the one before (so slices
differ), Z slices (default 16), uint16, stored as a zarr array in chunks of
(1, 512, 512) in a temporary folder. The model: the shipped
``dsb2018-nuclei-refineseg``. Labels only, as ``coarseseg predict`` writes
them without ``--probabilities``.

Cases, one after the other on the same volume:

- ``single process``: :func:`napari_coarseseg.predict` on the zarr array (read
  lazily, slice by slice), ``--threads`` torch threads: the reference;
- ``chunks, this process``: :func:`~napari_coarseseg.zarr_predict.predict_zarr`
  without a cluster, the same threads, writing a zarr store;
- ``1 worker``, ``2 workers``: ``predict_zarr(workers=N)``, a local cluster
  of N processes of one thread each, each using ``cores // N`` torch threads.

Each case's seconds run from its start until its labels are on disk (in
memory for the single process); for the clusters they include starting the
cluster, and the *run* column gives the statistics pass and the chunks alone
(the run summary's seconds). Megapixels per second are Z x Y x X over the
wall seconds. Every case's labels are compared with the single process's
(pixels differing: 0 expected).

Usage::

    python benchmarks/distributed_predict.py [--shape 16,2048,2048] [--chunks Z,Y,X] [--threads 2] [--note TEXT]
                                     [--out benchmarks/results]

Writes ``distributed.md`` and ``distributed.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from napari_coarseseg import load_model, predict  # noqa: E402
from napari_coarseseg.blockwise import default_block  # noqa: E402
from napari_coarseseg.samples import load_dsb_nuclei  # noqa: E402
from napari_coarseseg.zarr_predict import predict_zarr  # noqa: E402

from report import write_results  # noqa: E402

MODEL = "dsb2018-nuclei-refineseg"


def write_volume(path: Path, shape) -> None:
    """The nuclei image mirrored to (Y, X), one slice per shift of 37 px, as a zarr array."""
    import zarr

    image, _ = load_dsb_nuclei()
    z, y, x = shape
    big = np.pad(image, ((0, y + 37 * z), (0, x)), mode="symmetric")
    array = zarr.create_array(str(path), shape=shape, chunks=(1, 512, 512), dtype=image.dtype)
    for i in range(z):
        array[i] = big[37 * i : 37 * i + y, :x]


def time_case(name: str, run, reference=None) -> tuple[dict, np.ndarray]:
    start = time.perf_counter()
    labels, run_seconds = run()
    seconds = time.perf_counter() - start
    figures = {"case": name, "seconds": round(seconds, 1), "run_seconds": None if run_seconds is None
               else round(run_seconds, 1)}
    if reference is not None:
        figures["pixels_differing"] = int(np.count_nonzero(labels != reference))
    return figures, labels


def run_cases(volume: Path, work: Path, shape, chunks, threads: int) -> list[dict]:
    import zarr

    model = load_model(MODEL)
    torch.set_num_threads(threads)

    def single():
        return predict(model, zarr.open_array(str(volume), mode="r"), device="cpu",
                       keep_probabilities=False).labels, None

    def chunked(workers):
        def run():
            out = work / f"out-{workers}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            summary = predict_zarr(MODEL, volume, out, workers=workers, block=chunks, device="cpu")
            return zarr.open_array(str(out / "0"), mode="r")[...], summary["seconds"]
        return run

    results = []
    figures, reference = time_case("single process", single)
    results.append(figures)
    for name, workers in (("chunks, this process", None), ("1 worker", 1), ("2 workers", 2)):
        results.append(time_case(name, chunked(workers), reference)[0])
        print(results[-1], flush=True)
    megapixels = float(np.prod(shape)) / 1e6
    for figures in results:
        figures["megapixels_per_second"] = round(megapixels / figures["seconds"], 2)
        figures["speedup"] = round(results[0]["seconds"] / figures["seconds"], 2)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,2048,2048", help="Z,Y,X of the volume (default 16,2048,2048)")
    parser.add_argument("--chunks", help="Z,Y,X of the chunks (default the package's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process (default 2)")
    parser.add_argument("--note", default="", help="appended to the table's heading, e.g. 'machine shared'")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    chunks = tuple(int(s) for s in args.chunks.split(",")) if args.chunks else default_block(shape)
    work = Path(tempfile.mkdtemp(prefix="coarseseg-distributed-"))
    try:
        write_volume(work / "volume.zarr", shape)
        results = run_cases(work / "volume.zarr", work, shape, chunks, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [f"CPU, {cores} cores, {platform.processor() or platform.machine()}; `{MODEL}` on a zarr volume of "
             f"{' x '.join(map(str, shape))} (the nuclei image mirrored, {np.prod(shape) / 1e6:.1f} MP), chunks "
             f"{' x '.join(map(str, chunks))}; this process {args.threads} torch threads, each worker "
             f"cores / workers. Seconds until the labels are written (clusters: including their start; *run*: "
             f"statistics and chunks only).{' ' + args.note if args.note else ''}", "",
             "| case | seconds | run seconds | MP/s | speed-up | pixels differing from one process |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['seconds']} | {r['run_seconds'] if r['run_seconds'] is not None else ''} "
                     f"| {r['megapixels_per_second']} | {r['speedup']} x | {r.get('pixels_differing', '')} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, "distributed_predict", text, {"shape": list(shape), "chunks": list(chunks),
                                                  "threads": args.threads, "cores": cores, "note": args.note,
                                                  "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
