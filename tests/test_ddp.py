"""One model trained by several processes (issue 18, part 2): ``torchrun --nproc-per-node 2``, gloo on CPUs.

On the bundled DSB 2018 sample, drawings simulated on the left half as ``coarseseg demo`` does, the right half
held out:

- two processes, each training on its BATCH / 2 rows of the batch that both draw, train a model that segments the
  held-out half with a Dice within TOLERANCE of one process of BATCH patches, same seed and steps (the figures:
  :data:`MEASURED`);
- that run is killed right after its first checkpoint, refused (one line) when resumed on one process, and
  resumed on two to the last step;
- only rank 0 writes and reports: an audit hook in every process records each file it opens for writing,
  renames or removes, and rank 1's record is empty in both launches;
- on two spawned processes (the library without the command line): every trained parameter (the network and
  the transition heads; the recursive method's network and approximations) is the same on both after
  training; the synchronised batch norm of two half batches is that of the whole batch; a run cancelled after a
  checkpoint and resumed ends with the same weights, bit for bit, as the uninterrupted run; each process's
  augmented patches of a step are its half of one process's, bit for bit, and the trained weights are one
  process's up to the losses' normalisation over each half;
- one-line errors: a batch that 2 processes cannot share, NCCL without GPUs; one process is the one-process run.

Every process runs one torch thread (torchrun's default with several processes; the conftest's in-process).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from napari_coarseseg import load_model, predict, run_to_end, simulate, train_recursive, train_refineseg
from napari_coarseseg.checkpoint import checkpoint_step
from napari_coarseseg.cli import checkpoint_path, main
from napari_coarseseg.data import TrainingImages
from napari_coarseseg.data_parallel import LaunchError, Ranks, SyncedBatchNorm2d, joined_processes
from napari_coarseseg.methods.refineseg import RefinesegDrawings, RefinesegTraining
from napari_coarseseg.metrics import dice
from napari_coarseseg.samples import load_dsb_nuclei
from napari_coarseseg.training import TrainingConfig

NPROC = 2
BATCH = 8  # in all: 4 per process
STEPS = 400
EVOLUTION_EVERY = 100
CHECKPOINT_EVERY = 50
PRESET = {"steps": STEPS, "batch_size": BATCH, "patch_size": 64, "base_channels": 8, "depth": 3,
          "learning_rate": 0.003, "evolution_every": EVOLUTION_EVERY}
#: What the issue asks. Every process draws and augments the same whole batch of BATCH patches (one process's) and
#: trains on its own rows of it, so two processes take one process's steps up to float rounding and the losses'
#: normalisation (each process's masked means are over its half). Held-out Dice of this preset (with the prior
#: correction), one process of 8 patches against two of 4, per seed (on the 2 shared CPU cores, the two processes
#: run as the fixture's without the kill): differences -0.0008, -0.0039, +0.0004 (seeds 3 and 4: 0.9361 / 0.9329,
#: 0.9412 / 0.9413, -0.0032 and +0.0001). The test runs seed 0. Before, each process drew its own patches
#: (generators seeded seed + rank), and the two-process Dice moved by the seed noise: 0.9021, 0.9036, 0.9421,
#: differences -0.006, -0.006, +0.014, which only a tolerance of 0.02 passed (the seed noise at this size: one
#: process alone, the starting weights fixed and only the patches drawn anew, 0.909, 0.882, 0.878). A DDP that
#: broke the averaging costs more (batch norm on half batches, measured: 0.841 / 0.889 against 0.909 / 0.909).
TOLERANCE = 0.01
MEASURED = {0: (0.9085, 0.9077), 1: (0.9094, 0.9056), 2: (0.9282, 0.9285)}

# Every process reports the files it writes: opened for writing, renamed, removed (Python's audit events).
AUDITED_CLI = '''
import os, sys
RANK = os.environ.get("RANK", "?")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if mode else bool((flags or 0) & WRITE_FLAGS)
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            print(f"AUDIT rank {RANK} open {os.fsdecode(path)}", file=sys.__stderr__, flush=True)
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.link", "os.symlink",
                   "os.chmod", "shutil.rmtree", "shutil.move"):
        target = args[1] if event in ("os.rename", "shutil.move") else args[0]  # a rename: where it goes
        print(f"AUDIT rank {RANK} {event} {target}", file=sys.__stderr__, flush=True)

sys.addaudithook(audit)
from napari_coarseseg.cli import main
sys.exit(main())
'''


def torchrun(*arguments, nproc: int = NPROC) -> list[str]:
    """The command line of ``torchrun --standalone --nproc-per-node NPROC ARGUMENTS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *map(str, arguments)]


def environment() -> dict:
    # No bytecode caches: a process that writes nothing must not write those either.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def train_arguments(sample, out: Path, *extra) -> list[str]:
    return [str(a) for a in ("train", sample["image"], "--positive", sample["positive"], "--negative",
                             sample["negative"], "--preset", sample["preset"], "--out", out, "--device", "cpu",
                             "--seed", "0", *extra)]


def held_out_dice(model_path: Path, sample) -> float:
    prediction = predict(load_model(model_path), sample["test_image"], device="cpu")
    return dice(prediction.labels > 0, sample["test_labels"] > 0)


def audited_torchrun(script: Path, arguments: list, cwd: Path, logs: Path, name: str, stop_when=None) -> dict:
    """Run the audited command line under torchrun; with ``stop_when`` (a callable), SIGTERM torchrun (which stops
    its workers) as soon as it returns True. The exit code, the outputs and the audit lines."""
    import psutil  # a napari dependency

    out_log, err_log = logs / f"{name}.out", logs / f"{name}.err"
    with open(out_log, "w") as out, open(err_log, "w") as err:
        run = subprocess.Popen(torchrun(script, *arguments), cwd=cwd, env=environment(), stdout=out, stderr=err)
        workers = []
        try:
            while stop_when is not None and run.poll() is None and not stop_when():
                workers = psutil.Process(run.pid).children(recursive=True) or workers
                time.sleep(0.05)
            if stop_when is not None:
                run.send_signal(signal.SIGTERM)
            run.wait(timeout=600)
        finally:
            for worker in workers:  # only the processes this test started
                if worker.is_running():
                    worker.kill()
    stderr = err_log.read_text()
    audit = [line.split(" ", 4)[2:] for line in stderr.splitlines() if line.startswith("AUDIT rank")]
    # Importing torch._dynamo (DistributedDataParallel does) makes sure torch's compile cache folder exists
    # (``torchinductor_<user>`` in the temporary folder), in every process: torch's, not a file of this package.
    audit = [entry for entry in audit
             if not (entry[1] == "os.mkdir" and Path(entry[2]).name.startswith("torchinductor_"))]
    return {"code": run.returncode, "stdout": out_log.read_text(), "stderr": stderr, "audit": audit}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The left half of the sample with simulated drawings (files), the right half and its expert mask."""
    folder = tmp_path_factory.mktemp("sample")
    image, expert = load_dsb_nuclei()
    drawings = simulate(expert, instances=True, seed=0)
    left, right = np.s_[:, : image.shape[1] // 2], np.s_[:, image.shape[1] // 2 :]
    paths = {name: folder / f"{name}.tif" for name in ("image", "positive", "negative")}
    for name, array in (("image", image), ("positive", drawings.positive), ("negative", drawings.negative)):
        tifffile.imwrite(paths[name], array[left])
    (folder / "preset.json").write_text(json.dumps(PRESET))
    return {**paths, "preset": folder / "preset.json", "test_image": image[right], "test_labels": expert[right]}


@pytest.fixture(scope="module")
def one_process(sample, tmp_path_factory):
    """``coarseseg train`` in this process (one torch thread): the model to match."""
    out = tmp_path_factory.mktemp("one") / "model.safetensors"
    assert main(train_arguments(sample, out, "--quiet")) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(sample, tmp_path_factory):
    """``torchrun --nproc-per-node 2`` of the audited command line in an empty working folder: killed right after
    its first checkpoint, refused on one process, then resumed on two."""
    folder, work, logs = (tmp_path_factory.mktemp(name) for name in ("two", "work", "logs"))
    script = logs / "audited_cli.py"
    script.write_text(AUDITED_CLI)
    out = folder / "model.safetensors"
    arguments = train_arguments(sample, out, "--evolution", folder / "evolution.tif", "--checkpoint-every",
                                CHECKPOINT_EVERY)
    result = {"folder": folder, "work": work, "model": out}
    result["killed"] = audited_torchrun(script, arguments, work, logs, "killed", stop_when=checkpoint_path(out).is_file)
    result["reached"] = checkpoint_step(checkpoint_path(out))
    result["files when killed"] = sorted(p.name for p in folder.iterdir())
    with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(io.StringIO()) as errors:
        code = main([*arguments, "--resume"])  # on one process: this one
    result["refused"] = (code, printed.getvalue(), errors.getvalue())
    result["reached after refusal"] = checkpoint_step(checkpoint_path(out))
    result["resumed"] = audited_torchrun(script, [*arguments, "--resume"], work, logs, "resumed")
    assert result["resumed"]["code"] == 0, result["resumed"]["stderr"][-3000:]
    return result


# --------------------------------------------------------------------------- the command line under torchrun


def test_two_processes_train_a_model_as_good_as_one_process(sample, one_process, two_processes):
    card = load_model(two_processes["model"]).card["training"]
    assert card["processes"] == NPROC and card["backend"] == "gloo"
    assert card["config"]["batch_size"] == BATCH  # the batch of a step, over both processes
    single, distributed = held_out_dice(one_process, sample), held_out_dice(two_processes["model"], sample)
    assert single > 0.85, single
    assert abs(distributed - single) <= TOLERANCE, (single, distributed)


def test_a_killed_run_resumes_on_as_many_processes_to_the_last_step(two_processes):
    reached = two_processes["reached"]
    assert reached == CHECKPOINT_EVERY  # killed right after its first checkpoint, no model written
    assert two_processes["files when killed"] == ["model.safetensors.checkpoint"]
    code, out, error = two_processes["refused"]
    lines = error.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1, error
    assert lines[0].startswith("coarseseg train: error: the checkpoint was written by a run on 2 processes and this "
                               "one has 1"), lines
    assert two_processes["reached after refusal"] == reached  # the checkpoint is kept
    # The resumed run's evolution: a plane every EVOLUTION_EVERY steps after the checkpoint and at the last.
    planes = {step for step in range(reached + 1, STEPS + 1) if step % EVOLUTION_EVERY == 0} | {STEPS}
    assert len(tifffile.imread(two_processes["folder"] / "evolution.tif")) == len(planes)
    assert not checkpoint_path(two_processes["model"]).exists()  # removed once the model is written


def test_only_rank_0_writes_and_reports(two_processes):
    assert sorted(p.name for p in two_processes["folder"].iterdir()) == ["evolution.tif", "model.safetensors"]
    assert list(two_processes["work"].iterdir()) == []
    for launch in ("killed", "resumed"):
        audit = two_processes[launch]["audit"]
        assert audit and {rank for rank, _, _ in audit} == {"0"}, audit  # rank 1: nothing written, renamed, removed
    renamed = {Path(path).name for launch in ("killed", "resumed") for _, event, path in two_processes[launch]["audit"]
               if event == "os.rename"}
    assert renamed >= {"model.safetensors", "evolution.tif", "model.safetensors.checkpoint"}
    resumed = two_processes["resumed"]
    assert resumed["stdout"].count("wrote ") == 1 and resumed["stderr"].count("done in ") == 1


# --------------------------------------------------------------------------- the library on spawned processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _batch_norm_of_halves(rank: int) -> dict:
    """The synchronised batch norm on this rank's half of a batch, against nn.BatchNorm2d on the whole batch."""
    generator = torch.Generator().manual_seed(0)
    batch, weights = torch.randn(8, 3, 6, 6, generator=generator) * 3 + 1, torch.randn(8, 3, 6, 6, generator=generator)
    whole = nn.BatchNorm2d(3)
    nn.init.uniform_(whole.weight, generator=generator)
    nn.init.uniform_(whole.bias, generator=generator)
    synced = copy.deepcopy(whole)
    synced.__class__ = SyncedBatchNorm2d
    inputs = batch.clone().requires_grad_()
    expected = whole(inputs)
    (expected * weights).mean().backward()
    half = slice(4 * rank, 4 * rank + 4)
    mine = batch[half].clone().requires_grad_()
    output = synced(mine)
    # Each process's loss is the mean over its half; DDP averages the parameters' gradients over the processes.
    (output * weights[half]).mean().backward()
    gradient = synced.weight.grad.clone()
    torch.distributed.all_reduce(gradient)
    return {"output": float((output - expected[half]).abs().max()),
            "input gradient": float((mine.grad / 2 - inputs.grad[half]).abs().max()),
            "weight gradient": float((gradient / 2 - whole.weight.grad).abs().max()),
            "running mean": float((synced.running_mean - whole.running_mean).abs().max()),
            "running variance": float((synced.running_var - whole.running_var).abs().max())}


def _state(model) -> dict:
    return {"network": model.network.state_dict(), "heads": model.heads.state_dict(), "card": model.card,
            "batch norms": sorted({type(m).__name__ for m in model.network.modules() if isinstance(m, nn.BatchNorm2d)})}


#: The runs of the spawned processes: small enough for seconds, with two transition heads.
TINY = {"base_channels": 4, "depth": 2, "patch_size": 32, "batch_size": 4, "seed": 3, "transition_heads": "all"}
#: Mean absolute difference between the weights of two processes and of one after these runs (refineseg 8 steps,
#: recursive 2 x 3). Measured, seeds 3 (the test's), 1, 2: refineseg 0.00059, 0.00068, 0.00050; recursive 0.00021,
#: 0.00021, 0.00013. Not float rounding alone: each process's losses are normalised over its own half (its drawn
#: pixels; refineseg's Dice term pools its half), which moves the first step's gradients by up to the size of some
#: of them with these 4-patch batches. Processes that drew patches of their own (seeded seed + rank, as before
#: issue 18's fix): refineseg 0.00155, 0.00156, 0.00145; recursive 0.00212, 0.00200, 0.00165.
WEIGHTS_CLOSE = 1e-3


def _tiny_sample():
    """Two 128 x 128 crops of the sample: images, expert masks, simulated drawings."""
    image, expert = load_dsb_nuclei()
    crops = [np.s_[:128, :128], np.s_[128:256, :128]]
    return ([image[crop] for crop in crops], [expert[crop] for crop in crops],
            [simulate(expert[crop], instances=True, seed=0) for crop in crops])


def _tiny_refineseg(device, **options):
    images, _, drawings = _tiny_sample()
    return train_refineseg(images[0], [drawings[0].positive], [drawings[0].negative], steps=8, evolution_every=4,
                           device=device, **TINY, **options)


def _tiny_recursive(device):
    images, experts, drawings = _tiny_sample()
    return train_recursive(images, [d.partial for d in drawings], [(experts[0] > 0).astype(np.uint8), None],
                           iterations=2, steps=3, device=device, **TINY)


def _tiny_first_batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step's augmented images and targets of a tiny refineseg run: this process's rows of them."""
    images, _, drawings = _tiny_sample()
    planes = TrainingImages(images[0])
    config = TrainingConfig(**{k: v for k, v in TINY.items() if k != "seed"})
    loop = RefinesegTraining(planes, RefinesegDrawings(planes, [drawings[0].positive], [drawings[0].negative]),
                             config, TINY["seed"], device)
    return loop.own_batch()


def _train_on_rank(rank: int, port: int, folder: str) -> None:
    """One of two processes: refineseg (two transition heads), cancelled and resumed; recursive; a first batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    with joined_processes("cpu") as (ranks, device):
        results["ranks"] = (ranks.rank, ranks.world_size, ranks.backend)
        results["batch norm"] = _batch_norm_of_halves(rank)
        results["refineseg"] = _state(run_to_end(_tiny_refineseg(device)))
        # Cancelled after step 5 (checkpoint at 4: every process's generators, rank 0 writing), then resumed.
        checkpoint = Path(folder) / "run.checkpoint"
        run = _tiny_refineseg(device, checkpoint=checkpoint, checkpoint_every=2)
        for event in run:
            if event.step == 5:
                run.close()
        results["resumed"] = _state(run_to_end(_tiny_refineseg(device, checkpoint=checkpoint, checkpoint_every=2,
                                                               resume=True)))
        results["recursive"] = _state(run_to_end(_tiny_recursive(device)))
        # The first batch of one more run: each process's half of the batch that both drew.
        results["first batch"] = _tiny_first_batch(device)
    torch.save(results, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    """What each of two spawned processes (the library, no command line) trained and drew, by rank."""
    folder = tmp_path_factory.mktemp("spawned")
    torch.multiprocessing.spawn(_train_on_rank, args=(_free_port(), str(folder)), nprocs=2)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def _same(first: dict, second: dict) -> list[str]:
    """The tensors of the network and heads of two saved models that differ (by name)."""
    return [f"{part}.{key}" for part in ("network", "heads") for key, value in first[part].items()
            if not torch.equal(value, second[part][key])]


def _mean_difference(first: dict, second: dict) -> float:
    """The mean absolute difference between the trained parameters (network and heads) of two saved models."""
    differences = [(value - second[part][key]).abs().flatten() for part in ("network", "heads")
                   for key, value in first[part].items() if value.is_floating_point()]
    return float(torch.cat(differences).mean())


def test_every_trained_parameter_is_the_same_on_every_process(spawned):
    ranks = spawned
    assert [r["ranks"] for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    for result in ranks:
        assert all(value < 1e-5 for value in result["batch norm"].values()), result["batch norm"]
    for method in ("refineseg", "resumed", "recursive"):
        first, second = ranks[0][method], ranks[1][method]
        assert first["batch norms"] == second["batch norms"] == ["BatchNorm2d"]  # back from SyncedBatchNorm2d
        assert first["network"].keys() == second["network"].keys() and first["heads"].keys() == second["heads"].keys()
        assert _same(first, second) == [], method
    assert len(ranks[0]["refineseg"]["heads"]) == 2 * 2  # two heads (weight, bias), trained and synchronised
    recursive = [r["recursive"]["card"]["training"]["pixels_added_per_iteration"] for r in ranks]
    assert recursive[0] == recursive[1]  # both grew the same approximations
    assert ranks[0]["refineseg"]["card"]["training"]["processes"] == 2
    # Cancelled after a checkpoint and resumed on as many processes: the uninterrupted run's weights, bit for bit.
    for result in ranks:
        assert _same(result["resumed"], result["refineseg"]) == []
    assert ranks[0]["resumed"]["card"]["prior"] == ranks[0]["refineseg"]["card"]["prior"]


def test_two_processes_take_the_steps_of_one_process(spawned):
    """The processes draw the batch one process draws, each training on its half: the same augmented patches,
    bit for bit, and after the runs the one-process weights, within WEIGHTS_CLOSE."""
    images, targets = _tiny_first_batch("cpu")  # this process has no process group: one process, the whole batch
    assert len(images) == TINY["batch_size"]
    for rank, result in enumerate(spawned):
        own_images, own_targets = result["first batch"]
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(own_images, images[rows]) and torch.equal(own_targets, targets[:, rows]), rank
    for method, run in (("refineseg", _tiny_refineseg), ("recursive", _tiny_recursive)):
        alone = _state(run_to_end(run("cpu")))
        assert _mean_difference(spawned[0][method], alone) < WEIGHTS_CLOSE, method


# --------------------------------------------------------------------------- one-line errors; one process untouched


def test_a_batch_the_processes_cannot_share_is_one_line_and_writes_nothing(sample, tmp_path):
    out = tmp_path / "model.safetensors"
    done = subprocess.run(torchrun("-m", "napari_coarseseg.cli", *train_arguments(sample, out, "--batch-size", "5")),
                          env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    # The processes' own lines come before torchrun's report of the failure (its log lines and traceback).
    lines = done.stderr.splitlines()
    ours = lines[: next((i for i, line in enumerate(lines) if "torch/distributed" in line), len(lines))]
    assert len(ours) == 1 and ours[0].startswith("coarseseg train: error: batch_size 5 is not a multiple of the 2 "
                                                 "processes"), done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_without_gpus_is_one_line(rank, sample, tmp_path, capsys, monkeypatch):
    """Before any process waits for another. Rank 1 reports only after OTHER_RANKS_REPORT_AFTER_S (0 here): under
    torchrun, rank 0's report of the same error comes first and torchrun stops rank 1 (the test above)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for name, value in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("napari_coarseseg.data_parallel.OTHER_RANKS_REPORT_AFTER_S", 0.0)
    out = tmp_path / "model.safetensors"
    code = main([str(a) for a in train_arguments(sample, out, "--dist-backend", "nccl")])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    lines = captured.err.splitlines()
    who = "rank 1: " if rank else ""
    assert len(lines) == 1 and lines[0].startswith(f"coarseseg train: error: {who}the nccl backend needs CUDA GPUs")
    assert list(tmp_path.iterdir()) == []


def test_one_process_is_the_one_process_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with joined_processes("cpu") as (ranks, device):
        assert ranks == Ranks() and device == "cpu" and not torch.distributed.is_initialized()
    assert not Ranks.current().distributed
    assert Ranks().per_process(7) == 7 and Ranks().average({"total": 1.5}) == {"total": 1.5}
    with pytest.raises(LaunchError, match="batch_size 12 is not a multiple of the 5 processes"):
        Ranks(rank=0, world_size=5).per_process(12)
    with pytest.raises(LaunchError, match="nccl backend needs CUDA GPUs"):
        with joined_processes("cpu", "nccl"):
            pass
