"""One trainer for every model: AdamW, clipping, EMA, bf16 autocast, checkpoints, exact resume, DDP.

The loop is flat on purpose (nanoGPT's train.py): sample a batch, `model.loss(batch)`, backward,
step, maybe log, maybe checkpoint. Models with several optimizers (a GAN's generator and
discriminator) name their parameter groups; models trained in stages (a VQ-VAE then its prior)
name their stages, and each stage is trained, checkpointed and resumed in turn.

Resume is exact on CPU: the checkpoint holds the model, EMA and optimizer states; the data order
of an epoch is a pure function of (seed, stage, epoch) and the global torch RNG is re-seeded from
(seed, stage, step, rank) before every step, so an interrupted-and-resumed run ends with the same
weights as an uninterrupted one (tests/training/test_loop.py checks bit equality,
tests/training/test_faults.py after SIGKILLs at random moments). The checkpoint format belongs to
genbench.training.checkpoint, the run folder's to genbench.training.run_folder.

Several processes (`torchrun`, docs/distributed.md): every rank draws the same global batch and trains
on the images that lie in its shard (genbench.data.shard_range), its loss weighted by its share of
the batch, so the average of the ranks' gradients is the gradient of the global-batch mean; rank 0
alone reads and writes the run folder, and a checkpoint resumes with any number of processes.

Images may be uint8 (p / 255) or float32: a batch is converted to float32 in [0, 1] when it is
drawn (genbench.data.unit_float), so a dataset costs 1 byte a pixel, not 4.
"""

from __future__ import annotations

import copy
import hashlib
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from genbench.data import shard_range, unit_float
from genbench.errors import GenbenchError
from genbench.models.base import GenerativeModel, load_state
from genbench.utils import autocast, bf16_effective

from . import distributed
from .checkpoint import (check_like, check_position, checkpoint_name, has_checkpoint, load_checkpoint, prefixed,
                         restore_optimizer, save_checkpoint, training_state)
from .config import TrainConfig, check_world, lr_at
from .ema import EMA
from .flops import StepFlops
from .run_folder import RunFolder, TrainingLog


# prepare_stage and finish_training see every training image as float32 up to this size (see _full_set)
FULL_SET_BYTES = 2**30


class TrainingDiverged(GenbenchError):
    pass


class Interrupted(Exception):
    """Raised by the `interrupt_at` test hook after a checkpoint: simulates a killed process."""


def rng_seed(*parts) -> int:
    """A 63-bit seed hashed from `parts`, e.g. (seed, stage, step, rank).

    The trainer re-seeds torch's global RNG from (seed, stage, step, rank) before every `loss` call,
    so the random draws of a step depend on nothing else: a resumed run, with any number of
    processes, draws what an uninterrupted one draws, and nothing RNG-related needs checkpointing.
    Ranks draw differently (rank is hashed in), as independent shards of one big batch would.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _check_free_space(run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, stages: tuple[str, ...]) -> None:
    """Fail before training when the disk cannot hold two checkpoints (the previous one is kept
    until the next is complete) plus the exported model."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    ema = any(cfg.for_stage(s).ema_decay > 0 for s in stages)
    checkpoint = state * (2 if ema else 1) + 2 * params  # model (+ EMA) + Adam's two moments
    need = 2 * checkpoint + state + 2**20  # + JSON and log slack
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise GenbenchError(
            f"{run_dir}: only {free / 2**20:.1f} MiB free on its disk, training needs about {need / 2**20:.1f} MiB "
            "for checkpoints and the exported model; free some space or choose another --out"
        )


def make_optimizers(model: GenerativeModel, stage: str, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per parameter group the model names for `stage` ("main" first)."""
    groups = model.optimizer_groups(stage)
    if "main" not in groups:
        raise GenbenchError(f"{model.name}: optimizer_groups({stage!r}) must contain a 'main' group")
    return {
        g: torch.optim.AdamW(ps, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=True)  # one fused pass over all params: ~13% faster steps on CPU
        for g, ps in groups.items()
    }


@dataclass
class Session:
    """What stays the same while one `train` call goes through the stages."""

    model: GenerativeModel
    data: torch.Tensor  # this process's training images (uint8 or float32), on the device
    device: torch.device
    run: RunFolder
    log: TrainingLog | None  # rank 0 only
    summary: dict = field(default_factory=lambda: {"stages": {}})
    progress: bool = True
    interrupt_at: int | None = None
    num_images: int = 0  # the whole training set, of which `data` holds rows first_row .. first_row + len(data)
    first_row: int = 0
    step_flops: StepFlops | None = None
    probe: Callable[[GenerativeModel], dict] | None = None  # model -> {"fd": ...} (genbench.evaluation.probe)


@dataclass
class StageState:
    """One stage in progress: everything a checkpoint of it saves, and where it stands."""

    name: str
    cfg: TrainConfig  # the stage's config (train.stages.<name> applied)
    step: int
    optimizers: dict[str, torch.optim.Optimizer]
    ema: EMA | None
    global_offset: int  # steps of the earlier stages
    elapsed: float = 0.0  # wall seconds this stage trained in earlier processes
    cpu_elapsed: float = 0.0  # process CPU seconds, likewise
    flops: int = 0  # training FLOPs of this stage so far (genbench.training.flops)


# ---------------------------------------------------------------- the loop


def train(
    model: GenerativeModel,
    train_images: torch.Tensor,
    cfg: TrainConfig,
    run_dir: str | Path,
    progress: bool = True,
    interrupt_at: int | None = None,
    probe: Callable[[GenerativeModel], dict] | None = None,
    num_images: int | None = None,
) -> dict:
    """Train `model` through all its stages inside `run_dir`, resuming from its latest checkpoint.

    `train_images`: (N, C, H, W), uint8 pixels p standing for p / 255 or float32 in [0, 1]; the
    whole training set, or with `num_images` this process's shard of a set of `num_images` (the
    rows `shard_range(num_images, rank, world)`, as `load_dataset(shard=...)` gives them). Under
    torchrun every process calls this; each trains on the images of every global batch that lie
    in its shard, gradients are averaged across processes and only rank 0 touches `run_dir` (see
    genbench.training.distributed). Returns a summary dict (wall time, images/s per stage, peak
    memory, device, training FLOPs and CPU seconds). `interrupt_at` (tests only) raises
    `Interrupted` right after the checkpoint of that global step is written.

    Every step adds its FLOPs (counted once per kind of step, genbench.training.flops) to the logged
    `train_flops`. With `cfg.fd_every` > 0, every fd_every steps of the last stage and after it,
    `probe` scores a copy of the model as exported then (`_probe`), logged with the compute spent so
    far (train_flops, train_s, train_cpu_s; counting and probing excluded).
    """
    run = RunFolder(run_dir)
    world = distributed.init()
    device = distributed.select_device(cfg.device)
    stages = tuple(model.stages)
    n = train_images.shape[0] if num_images is None else num_images
    start, stop = shard_range(n, world.rank, world.world_size)
    if num_images is None:
        train_images = train_images[start:stop]  # given the whole set: this process keeps its shard
    elif train_images.shape[0] != stop - start:
        raise GenbenchError(
            f"train: {train_images.shape[0]} images given as process {world.rank}'s shard of {n}, which holds "
            f"{stop - start}: load the dataset with shard=({world.rank}, {world.world_size})"
        )
    check_world(cfg, stages, n, world.world_size)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if any(cfg.for_stage(s).fd_every > 0 for s in stages) and probe is None:
        raise GenbenchError("train config: fd_every > 0 needs a quality probe (genbench.evaluation.probe.FDProbe; "
                            "`genbench train --fd-every N` makes one)")
    session = Session(model, train_images.to(device), device, run, log=None, progress=progress,
                      interrupt_at=interrupt_at, num_images=n, first_row=start, probe=probe,
                      step_flops=StepFlops(model, bf16=bf16_effective(device, cfg.bf16)))

    def read_and_prepare():  # rank 0 alone reads the checkpoint and writes the log
        found = load_checkpoint(run.checkpoints)
        if found:
            check_position(found[1], stages, lambda s: cfg.for_stage(s).steps)
        _check_free_space(run.path, model, cfg, stages)
        done = _global_step(cfg, stages, found[1]["stage"], found[1]["step"]) if found else 0
        session.log = run.open_log(done)
        return found

    found = distributed.on_main(read_and_prepare, what=f"reading the checkpoint in {run.checkpoints}")
    try:
        meta = distributed.share_json(found[1] if found else None)
        tensors = distributed.share_tensors(found[0] if found else None)
        first = 0
        if meta is not None:
            load_state(model, prefixed(tensors, "model."), meta["where"])
            first, session.summary = stages.index(meta["stage"]), meta["summary"]
        for stage in stages[first:]:
            scfg = cfg.for_stage(stage)
            resuming = meta is not None and stage == meta["stage"]
            state = _resume_stage(session, stage, scfg, meta, tensors) if resuming else _start_stage(session, stage, scfg)
            state.global_offset = _global_step(cfg, stages, stage, 0)
            _train_stage(session, state, last_stage=stage == stages[-1])
            if state.ema is not None:
                state.ema.copy_to(model)  # later stages (and the export) continue from the averaged weights
        model.eval()
        torch.manual_seed(rng_seed(cfg.seed, "finish"))
        with torch.no_grad():
            model.finish_training(_full_set(session))
        distributed.broadcast_module_(model)
    finally:
        if session.log is not None:
            session.log.close()
    summary = session.summary
    summary["peak_memory_mb"] = _peak_memory_mb(device)
    summary["wall_time_s"] = sum(s["wall_time_s"] for s in summary["stages"].values())
    summary["cpu_time_s"] = sum(s.get("cpu_time_s", 0.0) for s in summary["stages"].values())
    summary["train_flops"] = sum(s.get("flops", 0) for s in summary["stages"].values())
    summary["device"] = str(device)
    summary["world_size"] = world.world_size
    # per stage (a preset may use bf16 in one stage only): true if any stage trained in bf16
    summary["bf16_used"] = any(s.get("bf16_used", False) for s in summary["stages"].values())
    return summary


def _full_set(session: Session) -> torch.Tensor:
    """The training images prepare_stage and finish_training see, float32 on the device: all of them,
    as always, when that takes at most FULL_SET_BYTES (every dataset genbench ships: Fashion-MNIST is
    188 MB), else an evenly spaced subset of that size (the 90,000 training images of a 100,000-image
    64x64 colour folder would take 4.4 GB). The models estimate statistics from these images (a
    variance, a latent Gaussian, a codebook initialisation, a latent scale; VQ-GAN trains its small
    perceptual network on them), for which 20,000 images serve about as well. The subset is the same
    for any number of processes: each contributes the rows of its shard, and all receive all of them."""
    n, data, first = session.num_images, session.data, session.first_row
    m = min(n, max(1, FULL_SET_BYTES // (4 * data[0].numel())))
    index = torch.arange(m) * n // m  # evenly spaced and sorted, so the rank order is the index order
    if len(data) == n:  # one process: convert straight from the data
        return unit_float(data, None if m == n else index.to(data.device))
    index = index[(index >= first) & (index < first + len(data))] - first
    mine = data.index_select(0, index.to(data.device))
    return unit_float(distributed.all_gather_rows(mine)).to(session.device)


def _global_step(cfg: TrainConfig, stages: tuple[str, ...], stage: str, step: int) -> int:
    """Steps of the stages before `stage`, plus `step`: the position in the whole run."""
    return sum(cfg.for_stage(s).steps for s in stages[: stages.index(stage)]) + step


def _start_stage(session: Session, stage: str, cfg: TrainConfig) -> StageState:
    model = session.model
    optimizers = make_optimizers(model, stage, cfg)
    torch.manual_seed(rng_seed(cfg.seed, stage, "prepare"))  # the same on every rank
    with torch.no_grad():
        model.prepare_stage(stage, _full_set(session))
    distributed.broadcast_module_(model)  # identical on all ranks, even after nondeterministic kernels
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None  # after prepare_stage: it may set weights
    return StageState(stage, cfg, 0, optimizers, ema, global_offset=0)


def _resume_stage(session: Session, stage: str, cfg: TrainConfig, meta: dict, tensors: dict) -> StageState:
    model, where = session.model, meta["where"]
    optimizers = make_optimizers(model, stage, cfg)
    for g, opt in optimizers.items():
        restore_optimizer(g, opt, tensors, meta["optimizers"].get(g), where)
    unknown = sorted(set(meta["optimizers"]) - set(optimizers))
    if unknown:
        raise GenbenchError(f"{where}: optimizer state for unknown group(s) {unknown}")
    ema = None
    if cfg.ema_decay > 0:
        ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
        shadow = prefixed(tensors, "ema.")
        check_like(ema.shadow, shadow, f"{where}: EMA weights")
        ema.shadow = {k: v.to(device=session.device, dtype=ema.shadow[k].dtype) for k, v in shadow.items()}
    done = session.summary["stages"].get(stage, {})
    return StageState(stage, cfg, meta["step"], optimizers, ema, global_offset=0,
                      elapsed=float(done.get("wall_time_s", 0.0)), cpu_elapsed=float(done.get("cpu_time_s", 0.0)),
                      flops=int(done.get("flops", 0)))


def _train_stage(session: Session, st: StageState, last_stage: bool = True) -> None:
    model, data, device, cfg, stage = session.model, session.data, session.device, st.cfg, st.name
    world, rank = distributed.world_size(), distributed.rank()
    n, first, last = session.num_images, session.first_row, session.first_row + data.shape[0]
    bs = min(cfg.batch_size, n)  # the global batch; each rank trains on its part of it
    batches_per_epoch = n // bs
    bf16 = bf16_effective(device, cfg.bf16)
    # each epoch's order is a pure function of (seed, stage, epoch): nothing to restore on resume
    stage_seed = cfg.seed * 1_000_003 + sum(map(ord, stage))
    perm, perm_epoch = None, -1
    model.train()
    bar = tqdm(total=cfg.steps, initial=st.step, desc=f"{model.name}:{stage}", unit="step",
               disable=not (session.progress and rank == 0), dynamic_ncols=True, leave=False)
    window_t, window_steps = time.perf_counter(), 0
    stage_summary = session.summary["stages"].setdefault(stage, {})
    stage_summary.update(  # a resumed run may have been given more steps
        steps=cfg.steps, batch_size=bs, bf16_used=bf16, channels_last=cfg.channels_last)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    overhead = [0.0, 0.0]  # wall and CPU seconds of FLOP counting and probes: not training
    earlier_flops = int(_earlier(session, stage, "flops"))
    probing = last_stage and session.probe is not None and cfg.fd_every > 0
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=layout)  # in place (param.data): the optimizers and the EMA keep their tensors

    def spent() -> tuple[float, float]:
        return (st.elapsed + time.perf_counter() - t_start - overhead[0],
                st.cpu_elapsed + time.process_time() - cpu_start - overhead[1])

    try:
        while st.step < cfg.steps:
            step = st.step
            epoch, pos = divmod(step, batches_per_epoch)
            if epoch != perm_epoch:
                gen = torch.Generator().manual_seed((stage_seed * 100_003 + epoch) % 2**63)
                perm, perm_epoch = torch.randperm(n, generator=gen), epoch
            # every rank draws the global batch and keeps the images in its shard: all of them with one process
            idx = perm[pos * bs: (pos + 1) * bs]
            idx = idx[(idx >= first) & (idx < last)] - first
            share = len(idx) * world / bs  # the weight that makes the mean over ranks the global-batch mean
            if len(idx) == 0:  # none of this batch is in this shard: run one image with weight 0 (it adds nothing)
                idx = torch.zeros(1, dtype=torch.int64)
            batch = unit_float(data, idx.to(device))
            batch = batch.contiguous(memory_format=layout) if batch.dim() == 4 else batch  # no copy in NCHW
            if not session.step_flops.known(stage, step):  # counted once per kind of step, not training time
                with _excluded(overhead):
                    session.step_flops(stage, step, batch)
            st.flops += session.step_flops(stage, step, batch, global_batch=bs)
            torch.manual_seed(rng_seed(cfg.seed, stage, step, rank))
            lr = lr_at(cfg, step)
            for opt in st.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
            with autocast(device, bf16):
                out = model.loss(batch, step=step, stage=stage)
            names = list(st.optimizers)
            losses = {}
            for i, g in enumerate(names):
                loss = out["loss"] if g == "main" else out[f"loss_{g}"]
                if world > 1:
                    loss = loss * share
                params = [p for grp in st.optimizers[g].param_groups for p in grp["params"]]
                loss.backward(inputs=params, retain_graph=i < len(names) - 1)
                # the mean over ranks of per-rank mean gradients = the gradient of the global-batch mean
                losses[g] = distributed.average_gradients(params, loss.detach())
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            # every rank sees the same averaged losses, so all stop together (no rank left waiting)
            if not all(torch.isfinite(v).all() for v in losses.values()):
                bad = {g: float(v) for g, v in losses.items()}
                kept = (f"the last good checkpoint in {session.run.checkpoints} is kept"
                        if has_checkpoint(session.run.checkpoints) else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"{model.name}: stage {stage!r} step {step}: loss is not finite ({bad}); training stopped, "
                    f"{kept} (try a lower lr or clipping: --resume --set train.lr=... / --set train.grad_clip=1.0)"
                )
            for opt in st.optimizers.values():
                opt.step()
            distributed.broadcast_buffers_(model)
            if st.ema is not None:
                st.ema.update(model, step + 1)
            st.step = step = step + 1
            window_steps += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                ips = window_steps * bs / max(now - window_t, 1e-9)
                window_t, window_steps = now, 0
                scalars = {k: v * share if world > 1 else v  # weighted like the losses
                           for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
                values = distributed.all_reduce_mean(scalars)  # global-batch means (per-sample means average exactly)
                record = {"stage": stage, "step": step, "global_step": st.global_offset + step, "lr": lr,
                          "images_per_s": round(ips, 2), "train_flops": earlier_flops + st.flops, **values}
                if world > 1:
                    record["world_size"] = world
                distributed.on_main(lambda: session.log.append(record), what="writing the training log")
                bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{ips:.0f}")
            bar.update(1)
            if probing and (step % cfg.fd_every == 0 or step == cfg.steps):
                wall_s, cpu_s = spent()
                with _excluded(overhead):
                    record = {"stage": stage, "step": step, "global_step": st.global_offset + step,
                              "train_flops": earlier_flops + st.flops,
                              "train_s": round(wall_s + _earlier(session, stage, "wall_time_s"), 3),
                              "train_cpu_s": round(cpu_s + _earlier(session, stage, "cpu_time_s"), 3),
                              **_probe(session, st)}
                    distributed.on_main(lambda: session.log.append(record), what="writing the training log")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                stage_summary["wall_time_s"], stage_summary["cpu_time_s"] = spent()
                stage_summary["flops"] = st.flops
                stage_summary["images_per_s"] = step * bs / max(stage_summary["wall_time_s"], 1e-9)
                distributed.on_main(lambda: _save(session, st), what=f"saving the checkpoint of step {step}")
                if session.interrupt_at is not None and st.global_offset + step == session.interrupt_at:
                    raise Interrupted(f"interrupted after step {session.interrupt_at}")
    finally:
        bar.close()
        model.to(memory_format=torch.contiguous_format)


@contextmanager
def _excluded(overhead: list[float]):
    """Adds the wall and CPU seconds spent inside to `overhead` ([wall, cpu]): work that is not training."""
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        overhead[0] += time.perf_counter() - w0
        overhead[1] += time.process_time() - c0


def _earlier(session: Session, stage: str, key: str) -> float:
    """`key` summed over the stages before `stage` (their summaries are final)."""
    return sum(float(s.get(key, 0.0)) for name, s in session.summary["stages"].items() if name != stage)


def _probe(session: Session, st: StageState) -> dict:
    """The probe's result on a copy of the model as exported now (EMA weights, eval mode, finish_training);
    the training model, its RNG streams and the data order are untouched."""
    images = _full_set(session)  # a collective under torchrun: every rank takes part
    if distributed.rank() != 0:
        return {}
    model = copy.deepcopy(session.model)
    if st.ema is not None:
        st.ema.copy_to(model)
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(rng_seed(st.cfg.seed, st.name, st.step, "probe"))
        model.finish_training(images)
        result = session.probe(model)
    return result


def _save(session: Session, st: StageState) -> None:
    tensors, groups = training_state(session.model, st.optimizers, st.ema.shadow if st.ema is not None else None)
    meta = {"stage": st.name, "step": st.step, "optimizers": groups, "summary": session.summary}
    save_checkpoint(session.run.checkpoints, checkpoint_name(st.name, st.step), tensors, meta)
