"""Data parallelism across processes started by torchrun: process group, devices, collectives.

`torchrun --nproc_per_node=N -m genbench train ...` starts N copies of the program with RANK,
WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) in their environment. `init()` reads them and
joins the process group; without them (a plain `genbench train`) everything here is a no-op and
the trainer runs in one process exactly as before.

Backend: gloo for CPU tensors; when CUDA is present the group is created as "cpu:gloo,cuda:nccl",
so gradients living on a GPU travel over NCCL while small control messages (configs, checkpoint
manifests, error reports: JSON bytes in uint8 tensors on the CPU) travel over gloo. Each process
drives the GPU numbered LOCAL_RANK.

Why a manual all-reduce instead of wrapping the model in DistributedDataParallel: models expose
`loss(batch, step, stage)`, not `forward`; GAN-style models step several optimizer groups, each with
`loss_g.backward(inputs=params_g, retain_graph=...)`; two-stage models freeze whole sub-networks
(the prior stage leaves the autoencoder without gradients). DDP's reducer fires on every backward
and needs `find_unused_parameters=True` for the frozen parts, and its hooks would mix the groups'
gradients. Averaging each group's gradients right after its own backward,

    g  <-  (1/W) sum_r g_r,

in one all-reduce per dtype over a flattened buffer, is what DDP computes (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training") minus the overlap of communication with backward, which is worth nothing at
these model sizes. Because every rank then holds the same averaged gradient and runs the same
optimizer step, parameters stay bit-identical across ranks without being re-broadcast.

Buffers are not gradients: a VQ codebook moved by EMA, or dead-code restarts drawn from each rank's
own batch, would drift apart across ranks. `broadcast_buffers_` copies rank 0's buffers to every
rank after each optimizer step, the same rule DDP applies by default (`broadcast_buffers=True`):
statistics kept in buffers follow rank 0's shard of the batch (an EMA over 1/W of the data per step,
unbiased but noisier). A model wanting statistics over the whole global batch must all-reduce them
itself inside `loss` (torch.distributed.all_reduce when `world_size() > 1`), as SyncBatchNorm does.

Only rank 0 touches the run folder: it reads run.json and checkpoints and shares them
(`share_json`, `share_tensors`), and it alone writes logs, checkpoints and the exported model.
Work done on rank 0 alone goes through `on_main`, which tells the other ranks whether it failed,
so an error (a full disk, a corrupt checkpoint) stops every process with a message instead of
leaving the others waiting at the next collective.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from genbench.errors import GenbenchError
from genbench.utils import select_device as _select_local_device

T = TypeVar("T")
EXIT_GRACE_S = 0.5  # see shutdown()


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise GenbenchError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def env_world() -> WorldInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; a single process when absent."""
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return WorldInfo()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if world < 1:
        raise GenbenchError(f"environment variable WORLD_SIZE={world} must be >= 1")
    if rank is None:
        raise GenbenchError("WORLD_SIZE is set but RANK is not: start distributed runs with torchrun")
    if not 0 <= rank < world:
        raise GenbenchError(f"environment variable RANK={rank} is outside [0, WORLD_SIZE={world})")
    local_rank = rank if local_rank is None else local_rank
    if not 0 <= local_rank <= rank:
        raise GenbenchError(f"environment variable LOCAL_RANK={local_rank} must be in [0, RANK={rank}]")
    return WorldInfo(rank, world, local_rank)


_world = WorldInfo()


def init() -> WorldInfo:
    """Join the process group described by torchrun's environment (once per process; idempotent).

    The group lives until the process exits: torch cannot re-create a default group reliably in the
    same process after destroying it, so `shutdown` runs at exit.
    """
    global _world
    if dist.is_available() and dist.is_initialized():
        return _world
    info = env_world()
    if info.world_size == 1:
        _world = info
        return info
    if not dist.is_available():
        raise GenbenchError("this torch build has no torch.distributed; cannot train with several processes")
    cuda = torch.cuda.is_available()
    if cuda and info.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(info.local_rank)  # NCCL needs each process on its own GPU before init
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    except (ValueError, RuntimeError) as e:
        raise GenbenchError(
            f"cannot join the process group (rank {info.rank} of {info.world_size}, backend {backend}): {e}; "
            "start distributed runs with torchrun, which sets MASTER_ADDR and MASTER_PORT"
        ) from None
    _world = info
    atexit.register(shutdown)
    return info


def shutdown() -> None:
    """Leave the process group (called at exit).

    A gloo worker thread destroys each finished collective after the caller has seen it complete;
    destroying one that held a tensor made in Python needs the GIL. If the main thread is already
    finalising the interpreter by then, the worker is killed inside a destructor and the process
    aborts ("terminate called without an active exception": seen under load at the end of
    tests/training/test_distributed.py, gdb: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    ~AsyncAllreduceWork -> decref -> take_gil during Py_FinalizeEx). No API tells when the workers
    are done, so after the group is destroyed this thread gives up the GIL for a moment (the
    workers need it for microseconds) before the interpreter shuts down."""
    global _world
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
        time.sleep(EXIT_GRACE_S)
    _world = WorldInfo()


def world_size() -> int:
    return _world.world_size


def rank() -> int:
    return _world.rank


def local_rank() -> int:
    return _world.local_rank


def is_main_process() -> bool:
    """True on rank 0, and in a plain single-process run."""
    return _world.rank == 0


def select_device(requested: str) -> torch.device:
    """The device of this process for `train.device` = auto | cpu | cuda | cuda:N.

    One process: as `genbench.utils.select_device`. Several: auto/cuda give cuda:LOCAL_RANK (one GPU
    per process), auto falls back to the CPU without CUDA; an explicit cuda:N is refused because
    every process would pick the same GPU.
    """
    if _world.world_size == 1:
        device = _select_local_device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GenbenchError(f"train.device={requested!r} but CUDA is not available in this torch build/machine")
        return device
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested.startswith("cuda:"):
        raise GenbenchError(
            f"train.device={requested!r} pins every process to one GPU; under torchrun use 'cuda' or 'auto' "
            "(each process takes cuda:LOCAL_RANK)"
        )
    if not torch.cuda.is_available():
        raise GenbenchError(f"train.device={requested!r} but CUDA is not available on this machine")
    n = torch.cuda.device_count()
    if _world.local_rank >= n:
        raise GenbenchError(
            f"LOCAL_RANK {_world.local_rank} has no GPU: this machine has {n}; start at most {n} processes "
            "per node (--nproc_per_node) or train on the CPU (--set train.device=cpu)"
        )
    return torch.device("cuda", _world.local_rank)


# ---------------------------------------------------------------- collectives (no-ops for one process)


def barrier() -> None:
    """Wait for every rank (a gloo all-reduce of one CPU number: no NCCL device guessing)."""
    if _world.world_size > 1:
        dist.all_reduce(torch.zeros(1))


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: scalar tensor} -> {name: mean over ranks} as floats, in one all-reduce.

    Every rank must pass the same names in the same order (they come from the same code)."""
    if not values:
        return {}
    # on the CPU (gloo): scalars may live on different devices, and this runs at log steps only
    flat = torch.stack([v.detach().reshape(()).double().cpu() for v in values.values()])
    if _world.world_size > 1:
        dist.all_reduce(flat)
        flat /= _world.world_size
    return dict(zip(values, flat.tolist()))


def _collective_device(t: torch.Tensor) -> torch.device:
    # NCCL carries CUDA tensors, gloo CPU ones: keep a tensor where it is unless it is on another accelerator
    return t.device if t.device.type in ("cpu", "cuda") else torch.device("cpu")


def average_gradients(params: list[torch.nn.Parameter], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """p.grad <- (1/W) sum_r p.grad_r for every p in `params`; returns `extra` averaged the same way.

    One all-reduce per gradient dtype over a flattened buffer. A gradient that is None on some ranks
    counts as zero there (the loss did not depend on it), and stays None only when it is None on
    every rank, as in a single process: the optimizer then skips it. `extra` (the loss) rides in
    the same buffer so the NaN check sees the global value without another collective.
    """
    if _world.world_size == 1:
        return extra
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    extra_dtype = torch.float32 if torch.float32 in by_dtype or not by_dtype else next(iter(by_dtype))
    result = extra
    order = list(by_dtype)  # the same order on every rank: collectives must match one to one
    if extra is not None and extra_dtype not in by_dtype:
        order.append(extra_dtype)
    for dtype in order:
        ps = by_dtype.get(dtype, [])
        device = ps[0].device if ps else (extra.device if extra is not None else torch.device("cpu"))
        parts = [p.grad.detach().reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in ps]
        present = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=device)
        carry = extra is not None and dtype == extra_dtype
        if carry:
            parts.append(extra.detach().reshape(1).to(device=device, dtype=dtype))
        flat = torch.cat(parts + [present])
        dist.all_reduce(flat)
        counts = flat[flat.numel() - len(ps):]
        flat = flat[: flat.numel() - len(ps)] / _world.world_size
        if carry:
            result = flat[-1].to(extra.dtype)
        offset = 0
        for p, count in zip(ps, counts.tolist()):
            seg = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is not None:
                p.grad.copy_(seg)
            elif count > 0:
                p.grad = seg.clone()
    return result


def _as_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _from_bytes_(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel() * t.element_size()
            # clone: a fresh, aligned storage (a byte offset may not be a multiple of the element size)
            t.copy_(flat[offset: offset + n].clone().view(t.dtype).view(t.shape))
            offset += n


def _broadcast_tensors_(tensors: list[torch.Tensor]) -> None:
    """Overwrite `tensors` on every rank with rank 0's values: bytes in one broadcast per device."""
    if _world.world_size == 1 or not tensors:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for device, ts in by_device.items():
        flat = _as_bytes(ts)
        moved = flat.to(_collective_device(flat))
        dist.broadcast(moved, src=0)
        _from_bytes_(ts, moved.to(device))


def broadcast_buffers_(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (DDP's broadcast_buffers rule); called after each step."""
    _broadcast_tensors_(list(module.buffers()))


def broadcast_module_(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (after init, prepare_stage, finish_training)."""
    _broadcast_tensors_([p.data for p in module.parameters()] + list(module.buffers()))


# ---------------------------------------------------------------- rank 0 does, the others learn


def share_json(obj: Any = None) -> Any:
    """Rank 0's JSON-able `obj` on every rank (sent as UTF-8 JSON bytes: nothing is unpickled)."""
    if _world.world_size == 1:
        return obj
    if is_main_process():
        data = json.dumps(obj).encode()
        size = torch.tensor([len(data)], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if is_main_process() else torch.empty(
        int(size), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return json.loads(buf.numpy().tobytes()) if not is_main_process() else obj


def share_tensors(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Rank 0's {name: tensor} (or None) on every rank, on the CPU: a JSON manifest, then the bytes."""
    if _world.world_size == 1:
        return tensors
    manifest = None
    if is_main_process() and tensors is not None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        manifest = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()]
    manifest = share_json(manifest)
    if manifest is None:
        return None
    if not is_main_process():
        tensors = {k: torch.empty(shape, dtype=getattr(torch, dtype)) for k, dtype, shape in manifest}
    order = list(tensors.values())
    if order:
        flat = _as_bytes(order) if is_main_process() else torch.empty(
            sum(t.numel() * t.element_size() for t in order), dtype=torch.uint8)
        dist.broadcast(flat, src=0)
        if not is_main_process():
            _from_bytes_(order, flat)
    return tensors


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` rows (one dtype and row shape; the counts may differ) concatenated in
    rank order, on the CPU of every rank: the counts in one all-reduce, then one broadcast per rank.
    One process: `local` itself."""
    if _world.world_size == 1:
        return local
    counts = torch.zeros(_world.world_size, dtype=torch.int64)
    counts[_world.rank] = local.shape[0]
    dist.all_reduce(counts)
    parts = []
    for src, count in enumerate(counts.tolist()):
        if src == _world.rank:
            part = local.detach().to("cpu").contiguous()
        else:
            part = torch.empty((count, *local.shape[1:]), dtype=local.dtype)
        if count:
            dist.broadcast(part, src=src)
        parts.append(part)
    return torch.cat(parts)


def on_main(fn: Callable[[], T], what: str, share: bool = False) -> T | None:
    """Run `fn` on rank 0 only; every other rank learns whether it failed and then fails too.

    Returns fn()'s result on rank 0, and on the other ranks None, or with `share=True` the result
    itself (it must be JSON-able). One process: just fn().
    """
    if _world.world_size == 1:
        return fn()
    if is_main_process():
        try:
            result = fn()
            status = {"error": None, "result": result if share else None}
            json.dumps(status)  # must be sendable before the others are told to wait for it
        except Exception as e:
            message = str(e) if isinstance(e, GenbenchError) else f"{type(e).__name__}: {e}"
            share_json({"error": message})
            raise
        share_json(status)
        return result
    status = share_json()
    if status["error"] is not None:
        raise GenbenchError(f"{what} failed on rank 0: {status['error']}")
    return status["result"]
