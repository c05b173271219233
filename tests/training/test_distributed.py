"""Data-parallel training with real processes: torchrun, 2 CPU ranks over gloo.

Starting a torchrun job costs several seconds of interpreter and torch start-up per process (10-30 s
on a loaded 2-core machine), so ONE launch does everything, driven by `_DRIVER` on each rank:

1. `python -m genbench train ae ...` (genbench/__main__.py run by runpy, exactly what `-m genbench` runs), fresh;
2. the same for the VAE;
3. `--resume` of an AE run that one process interrupted after step 10 (1 -> 2 processes);
4. an AE run interrupted after step 10 by the `interrupt_at` hook (later resumed here with 1 process);
5. a config whose batch does not split over 2 ranks: both ranks must exit with the clear error;
6. batches of 2 images, so that in about half the steps one rank's shard holds none of them;
7. the collectives of genbench.training.distributed checked directly against hand-computed values,
   and the shard of the training images each rank loads.

The single-process references are trained in this pytest process with the same seed and global batch.

Tolerances. The AE's loss has no random draw, so the only difference between 1 and 2 processes is
float32 rounding: a rank averages 16 per-image losses and gradients instead of 32, and the two
halves are averaged afterwards ((a + b)/2 instead of one sum), a relative change of a few float32
ulps (eps = 1.2e-7) per step, which 20 Adam steps carry forward. Measured: at most 8e-8
relative on the logged losses and 3e-8 on the weights. We allow 5e-6 relative on every loss and
1e-6 absolute on the weights (~40 ulps: room for other CPUs' SIMD reduction orders), and show the
tolerance is tight: a run that trains on the per-rank batch alone (16 images, i.e. no gradient
averaging) misses it by more than 100x (measured 3.5e-2). The VAE's loss draws z ~ q(z|x) from each
rank's own stream (seeded by rank), so its loss sequence matches only up to Monte-Carlo noise: we
require the RMS deviation from the 1-process run to be at most 3x that of a 1-process run whose
random draws are re-seeded (same data, init and batch: only the noise differs). Measured: 4.4
against 6.3 nats (rank 0 seeds its stream as the single process does, so part of the draws coincide).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from genbench.training import loop as trainer_mod
from genbench.data import DatasetSpec
from genbench.files import read_tensors
from genbench.training.checkpoint import load_checkpoint
from genbench.training.loop import Interrupted
from genbench.training.run import train_run

STEPS = 20
SETS = ["arch=mlp", "latent_dim=4", "width=32", f"train.steps={STEPS}", "train.batch_size=32",
        "train.log_every=1", "train.ckpt_every=5", "train.lr=1e-3"]
CLI_SETS = [a for s in SETS for a in ("--set", s)]
# a folder of 8x8 PNGs (144 train images): unlike `digits` it loads without scikit-learn/scipy,
# whose imports cost each of the launched processes ~2.5 s of CPU
N_IMAGES = 160
AE_LOSS_RTOL = 5e-6
AE_WEIGHT_ATOL = 1e-6

_DRIVER = '''
import json, os, runpy, sys
import torch
from genbench.training import distributed
from genbench.data import load_dataset
from genbench.errors import GenbenchError
from genbench.training.loop import Interrupted
from genbench.training.run import load_training_data, train_run
from genbench.data import DatasetSpec

jobs = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
result = {"cli": [], "checks": {}}

def cli(argv):
    sys.argv = ["genbench", *argv]
    try:
        runpy.run_module("genbench", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code
    return None

for argv in jobs["cli"]:
    result["cli"].append(cli(argv))

try:
    train_run("ae", load_dataset("folder", data_dir=jobs["data"], image_size=8), jobs["interrupt_dir"],
              sets=jobs["sets"], progress=False, interrupt_at=10)
    result["interrupted"] = False
except Interrupted:
    result["interrupted"] = True

# the collectives, against hand-computed values (rank r contributes r + 1)
world = distributed.world_size()
c = result["checks"]
c["world"] = [distributed.rank(), world, distributed.is_main_process()]
a = torch.nn.Parameter(torch.zeros(3))
b = torch.nn.Parameter(torch.zeros(2))
n = torch.nn.Parameter(torch.zeros(1))
a.grad = torch.full((3,), float(rank + 1))
b.grad = torch.full((2,), 4.0) if rank == 0 else None  # used on rank 0 only
loss = distributed.average_gradients([a, b, n], torch.tensor(float(10 * (rank + 1))))
c["grad_a"], c["grad_b"], c["grad_n_is_none"], c["loss"] = a.grad.tolist(), b.grad.tolist(), n.grad is None, float(loss)
m = torch.nn.BatchNorm1d(2)
m.running_mean.fill_(rank + 1.0)
m.num_batches_tracked.fill_(rank + 7)
distributed.broadcast_buffers_(m)
c["buffers"] = [m.running_mean.tolist(), int(m.num_batches_tracked)]
lin = torch.nn.Linear(2, 2)
torch.nn.init.constant_(lin.weight, rank + 1.0)
distributed.broadcast_module_(lin)
c["module"] = lin.weight.flatten().tolist()
c["mean"] = distributed.all_reduce_mean({"x": torch.tensor(rank + 1.0), "y": torch.tensor(2 * (rank + 1))})
c["json"] = distributed.share_json({"from": "rank0", "pi": 3.5} if rank == 0 else None)
shared = distributed.share_tensors({"w": torch.arange(6.0).reshape(2, 3), "flag": torch.tensor([True, False]),
                                    "i": torch.tensor(7)} if rank == 0 else None)
c["tensors"] = {k: [str(v.dtype), v.tolist()] for k, v in shared.items()}
c["none"] = distributed.share_tensors(None) is None
c["on_main_result"] = distributed.on_main(lambda: {"answer": 42}, what="test", share=True)
c["gathered"] = distributed.all_gather_rows(torch.full((rank + 1, 2), rank, dtype=torch.uint8)).tolist()
ds = load_training_data(DatasetSpec("folder", jobs["data"], 8), progress=False)
c["shard"] = [len(ds.train_pixels), ds.num_train, ds.train_pixels.float().sum().item()]

def fail():
    raise GenbenchError("disk on fire")

try:
    distributed.on_main(fail, what="writing something")
    c["on_main_error"] = None
except GenbenchError as e:
    c["on_main_error"] = str(e)
distributed.barrier()
with open(os.path.join(jobs["out"], f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
'''


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return read_tensors(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_digits):
    from PIL import Image

    from genbench.data import load_dataset

    folder = tmp_path_factory.mktemp("images")
    for i, x in enumerate(tiny_digits.train[:N_IMAGES]):
        Image.fromarray((x[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(folder / f"{i:03d}.png")
    return folder, load_dataset("folder", data_dir=folder, image_size=8)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, images):
    """References in this process, then the one torchrun launch; returns the paths and outputs."""
    folder, ds = images
    tmp = tmp_path_factory.mktemp("ddp")
    refs = {m: train_run(m, ds, tmp / f"ref_{m}", sets=SETS, progress=False) for m in ("ae", "vae")}
    refs["pairs"] = train_run("ae", ds, tmp / "ref_pairs", sets=SETS + ["train.batch_size=2"], progress=False)
    with pytest.raises(Interrupted):  # to be resumed by 2 processes
        train_run("ae", ds, tmp / "cut1", sets=SETS, progress=False, interrupt_at=10,
                  dataset_spec=DatasetSpec("folder", str(folder), 8))
    DATA = ["--dataset", "folder", "--data-dir", str(folder), "--image-size", "8", "--no-progress"]
    jobs = {
        "cli": [
            ["train", "ae", *DATA, "--out", str(tmp / "ae2"), *CLI_SETS],
            ["train", "vae", *DATA, "--out", str(tmp / "vae2"), *CLI_SETS],
            ["train", "ae", *DATA, "--out", str(tmp / "cut1"), "--resume"],
            ["train", "ae", *DATA, "--out", str(tmp / "odd"), *CLI_SETS, "--set", "train.batch_size=33"],
            ["train", "ae", *DATA, "--out", str(tmp / "pairs"), *CLI_SETS, "--set", "train.batch_size=2"],
        ],
        "interrupt_dir": str(tmp / "cut2"),
        "data": str(folder),
        "sets": SETS,
        "out": str(tmp),
    }
    (tmp / "driver.py").write_text(textwrap.dedent(_DRIVER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp / "driver.py"), json.dumps(jobs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "refs": refs, "ranks": ranks, "stdout": proc.stdout, "stderr": proc.stderr}


def test_two_process_ae_matches_one_process(launched, images, tmp_path):
    tmp, ref = launched["tmp"], launched["refs"]["ae"]
    assert [r["cli"][0] for r in launched["ranks"]] == [0, 0]
    one, two = _losses(ref), _losses(tmp / "ae2")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert all(r["world_size"] == 2 for r in two)
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two))
    assert worst < AE_LOSS_RTOL, worst
    wa, wb = _weights(ref), _weights(tmp / "ae2")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=AE_WEIGHT_ATOL, msg=k)
    # the tolerance has teeth: training on one rank's half-batch alone breaks it by far
    half = train_run("ae", images[1], tmp_path / "half", sets=SETS + ["train.batch_size=16"], progress=False)
    miss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, _losses(half)))
    assert miss > 100 * AE_LOSS_RTOL, miss


def test_only_rank_zero_writes(launched):
    tmp = launched["tmp"]
    run = tmp / "ae2"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "log.jsonl", "model", "reconstructions.png", "run.json", "samples.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", f"main-{STEPS:08d}"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["summary"]["world_size"] == 2
    assert info["summary"]["stages"]["main"]["batch_size"] == 32  # the global batch, as configured
    # the final line is printed once per command, by rank 0
    assert launched["stdout"].count("trained ae on folder with 2 processes") == 3
    assert launched["stdout"].count("trained vae on folder with 2 processes") == 1


def test_two_process_vae_matches_within_monte_carlo_noise(launched, images, tmp_path, monkeypatch):
    tmp, ref = launched["tmp"], launched["refs"]["vae"]
    seed = trainer_mod.rng_seed
    monkeypatch.setattr(trainer_mod, "rng_seed", lambda *parts: seed(*parts, "other noise"))
    reseeded = train_run("vae", images[1], tmp_path / "reseeded", sets=SETS, progress=False)
    one, two, other = (torch.tensor([r["loss"] for r in _losses(d)]) for d in (ref, tmp / "vae2", reseeded))
    noise = (other - one).pow(2).mean().sqrt()
    deviation = (two - one).pow(2).mean().sqrt()
    assert noise > 0 and deviation > 0  # each rank really draws its own noise
    assert deviation <= 3 * noise, (deviation, noise)


def test_resume_with_more_processes(launched):
    tmp, ref = launched["tmp"], launched["refs"]["ae"]
    assert [r["cli"][2] for r in launched["ranks"]] == [0, 0]
    one, resumed = _losses(ref), _losses(tmp / "cut1")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed[:10]] == [r["loss"] for r in one[:10]]  # the 1-process part
    assert all("world_size" not in r for r in resumed[:10]) and all(r["world_size"] == 2 for r in resumed[10:])
    for a, b in zip(one[10:], resumed[10:]):
        assert abs(a["loss"] - b["loss"]) / abs(a["loss"]) < AE_LOSS_RTOL
    wa, wb = _weights(ref), _weights(tmp / "cut1")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=AE_WEIGHT_ATOL, msg=k)


def test_resume_with_fewer_processes(launched, images):
    tmp, ref = launched["tmp"], launched["refs"]["ae"]
    assert all(r["interrupted"] for r in launched["ranks"])
    _, meta = load_checkpoint(tmp / "cut2" / "checkpoints")
    assert meta["step"] == 10
    train_run("ae", images[1], tmp / "cut2", resume=True, progress=False)
    one, resumed = _losses(ref), _losses(tmp / "cut2")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert all(r["world_size"] == 2 for r in resumed[:10]) and all("world_size" not in r for r in resumed[10:])
    for a, b in zip(one, resumed):
        assert abs(a["loss"] - b["loss"]) / abs(a["loss"]) < AE_LOSS_RTOL
    wa, wb = _weights(ref), _weights(tmp / "cut2")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=AE_WEIGHT_ATOL, msg=k)


def test_config_error_stops_every_rank_with_the_message(launched):
    tmp = launched["tmp"]
    assert [r["cli"][3] for r in launched["ranks"]] == [2, 2]
    # every rank checks the request itself, before the run folder is created (rank 0's errors that
    # only it can find reach the others through on_main: test_collectives)
    assert launched["stderr"].count("batch_size 33 does not split evenly over 2 processes") == 2
    assert not (tmp / "odd").exists()


def test_a_rank_without_images_in_a_batch_adds_nothing(launched):
    """With 2 images a batch, both lie in one rank's shard in about half the steps: that rank weighs its
    loss by 2, the other runs one image with weight 0, and the mean is the one-process loss."""
    tmp, ref = launched["tmp"], launched["refs"]["pairs"]
    assert [r["cli"][4] for r in launched["ranks"]] == [0, 0]
    one, two = _losses(ref), _losses(tmp / "pairs")
    assert len(one) == len(two) == STEPS
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, two))
    assert worst < AE_LOSS_RTOL, worst
    for k, w in _weights(ref).items():
        torch.testing.assert_close(_weights(tmp / "pairs")[k], w, rtol=0, atol=AE_WEIGHT_ATOL, msg=k)


def test_each_rank_loads_only_its_shard(launched, images):
    r0, r1 = (r["checks"] for r in launched["ranks"])
    train = images[1].train_pixels.float()
    assert r0["shard"] == [72, 144, train[:72].sum().item()] and r1["shard"] == [72, 144, train[72:].sum().item()]


def test_collectives(launched):
    r0, r1 = (r["checks"] for r in launched["ranks"])
    assert r0["world"] == [0, 2, True] and r1["world"] == [1, 2, False]
    for c in (r0, r1):
        assert c["grad_a"] == [1.5, 1.5, 1.5]  # (1 + 2) / 2
        assert c["grad_b"] == [2.0, 2.0]  # (4 + 0) / 2: a rank that did not use b counts as zero
        assert c["grad_n_is_none"]  # no gradient anywhere stays None, as in one process
        assert c["loss"] == 15.0
        assert c["buffers"] == [[1.0, 1.0], 7]  # rank 0's buffers everywhere
        assert c["module"] == [1.0] * 4
        assert c["mean"] == {"x": 1.5, "y": 3.0}
        assert c["json"] == {"from": "rank0", "pi": 3.5}
        assert c["tensors"] == {"w": ["torch.float32", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]],
                                "flag": ["torch.bool", [True, False]], "i": ["torch.int64", 7]}
        assert c["none"] and c["on_main_result"] == {"answer": 42}
        assert c["gathered"] == [[0, 0], [1, 1], [1, 1]]  # rank 0's one row, then rank 1's two
    assert r0["on_main_error"] == "disk on fire"
    assert r1["on_main_error"] == "writing something failed on rank 0: disk on fire"


def test_world_from_environment(monkeypatch):
    from genbench.training import distributed
    from genbench.errors import GenbenchError

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_world() == distributed.WorldInfo(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(GenbenchError, match="RANK=5 is outside"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(GenbenchError, match="not an integer"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_world() == distributed.WorldInfo(3, 4, 1)


def test_device_selection_one_process(monkeypatch):
    from genbench.training import distributed
    from genbench.errors import GenbenchError

    assert distributed.select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.select_device("auto") == torch.device("cpu")
    with pytest.raises(GenbenchError, match="CUDA is not available"):
        distributed.select_device("cuda")


def test_device_selection_several_processes(monkeypatch):
    """Without GPUs here, the CUDA rules are checked with torch.cuda's answers patched."""
    from genbench.training import distributed
    from genbench.errors import GenbenchError

    monkeypatch.setattr(distributed, "_world", distributed.WorldInfo(rank=3, world_size=4, local_rank=1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.select_device("auto") == torch.device("cuda", 1)
    assert distributed.select_device("cuda") == torch.device("cuda", 1)
    assert distributed.select_device("cpu") == torch.device("cpu")
    with pytest.raises(GenbenchError, match="pins every process to one GPU"):
        distributed.select_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GenbenchError, match="LOCAL_RANK 1 has no GPU"):
        distributed.select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.select_device("auto") == torch.device("cpu")


def test_batch_must_split_over_ranks():
    from genbench.errors import GenbenchError
    from genbench.training.config import TrainConfig, check_world

    check_world(TrainConfig(batch_size=32), ("main",), 1000, 4)
    check_world(TrainConfig(batch_size=512), ("main",), 300, 4)  # the batch is capped at the 300 images
    with pytest.raises(GenbenchError, match="batch_size 30 does not split evenly over 4 processes"):
        check_world(TrainConfig(batch_size=30), ("main",), 1000, 4)
    cfg = TrainConfig(batch_size=32, stages={"prior": {"batch_size": 6}})
    with pytest.raises(GenbenchError, match=r"batch_size 6 \(stage 'prior'\)"):
        check_world(cfg, ("autoencoder", "prior"), 1000, 4)
