"""Data parallelism over ranks started by torchrun: one process per GPU (or per CPU share, gloo).

Each rank runs its own backend and env rows; what the ranks must agree on goes through the helpers
here, which are the identity on a single rank so that one code path serves both. Every collective
runs inside `collective(what)`: a rank that dies or stalls makes the others fail within the
process group's timeout with a `RankFailure` naming what was being exchanged, never a hang.
"""
from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from envs.machine import resolve_device

# torch's own default for the process group's collectives.
DEFAULT_TIMEOUT_S = 600.0
# Spacing of the per-rank seeds (rank 0 keeps the run's seed, so one rank is a plain run).
_RANK_SEED_STRIDE = 100_003
_STEP_SEED_STRIDE = 10_000_019


class RankFailure(RuntimeError):
    """A collective failed: another rank died, stalled past the timeout, or its connection broke."""


@dataclass(frozen=True)
class RankContext:
    """Where this process sits in the run: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or no torchrun), known before the process group exists: who prints what every rank would."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: str | torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                     field: str = "--device") -> RankContext:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL on cuda:LOCAL_RANK for a CUDA device, gloo for CPU. A single rank joins nothing."""
    resolved = resolve_device(device, field)
    world = launched_world_size()
    if world == 1:
        return RankContext(device=resolved, timeout_s=timeout_s)
    if not timeout_s > 0:
        raise ValueError(f"train.collective_timeout_s={timeout_s}: expected a time > 0 (seconds a rank waits "
                         f"for the others)")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"{field}={device!r}: LOCAL_RANK {local} needs cuda:{local}, but this machine has "
                             f"{count} CUDA device(s); start at most {count} processes per node "
                             f"(torchrun --nproc_per_node {count})")
        resolved = torch.device("cuda", local)
        torch.cuda.set_device(resolved)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    return RankContext(rank, world, local, resolved, timeout_s)


def close_distributed(ctx: RankContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _is_collective_error(err: BaseException) -> bool:
    # NCCL raises DistError subclasses; gloo raises a plain RuntimeError carrying its source path.
    return isinstance(err, dist.DistError) or "gloo" in str(err)


@contextmanager
def collective(ctx: RankContext, what: str):
    """Run a block that talks to the other ranks; its communication errors become a RankFailure."""
    try:
        yield
    except RuntimeError as err:
        if not (ctx.distributed and _is_collective_error(err)):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankFailure(
            f"rank {ctx.rank} of {ctx.world_size}: {what} with the other ranks failed ({reason}). Another rank "
            f"died, or stalled for longer than the {ctx.timeout_s:g} s collective timeout; this rank stops too"
        ) from err


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's generators: the run's seed on rank 0; `step` gives a rank that joins
    a resumed run a stream of its own."""
    return (int(seed) + _RANK_SEED_STRIDE * int(rank) + _STEP_SEED_STRIDE * int(step)) % 2**32


def shard(n: int, ctx: RankContext) -> slice:
    """This rank's contiguous part of n items (the first n % world ranks take one more)."""
    base, extra = divmod(int(n), ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (1 if ctx.rank < extra else 0))


def all_gather_cat(ctx: RankContext, tensor: torch.Tensor, what: str) -> tuple[torch.Tensor, int]:
    """Every rank's tensor concatenated along dim 0 in rank order (lengths may differ), and where
    this rank's rows start in it."""
    if not ctx.distributed:
        return tensor, 0
    with collective(ctx, what):
        sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(ctx.world_size)]
        dist.all_gather(sizes, torch.tensor(tensor.shape[0], device=tensor.device))
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[: ctx.rank])


def all_gather_objects(ctx: RankContext, obj, what: str) -> list:
    """Every rank's (picklable) object, in rank order."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    with collective(ctx, what):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: RankContext, obj, what: str):
    """Rank 0's object on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    with collective(ctx, what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(ctx: RankContext, flag: bool, what: str) -> bool:
    """True on every rank when the flag is true on any (so that all take the same branch)."""
    if not ctx.distributed:
        return bool(flag)
    value = torch.tensor(float(flag), device=ctx.device)
    with collective(ctx, what):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value > 0)


def weighted_mean_over_ranks(ctx: RankContext, values: dict[str, float], weight: float, what: str) -> dict[str, float]:
    """Each value's mean over ranks weighted by `weight` (a rank's rows): the global batch's mean
    of per-rank means."""
    if not ctx.distributed:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(weight)] + [float(weight) * float(values[k]) for k in keys],
                          dtype=torch.float64, device=ctx.device)
    with collective(ctx, what):
        dist.all_reduce(packed)
    return {k: float(packed[i + 1] / packed[0]) for i, k in enumerate(keys)}


def broadcast_module_state(ctx: RankContext, module: torch.nn.Module, what: str) -> None:
    """Rank 0's parameters and buffers into every rank's module."""
    if not ctx.distributed:
        return
    with collective(ctx, what), torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def wrap_ddp(ctx: RankContext, module: torch.nn.Module, find_unused_parameters: bool = False,
             what: str = "the initial weights' broadcast"):
    """The module in DistributedDataParallel (rank 0's weights broadcast to every rank, gradients
    averaged in backward); the module itself on one rank.

    device_ids stays None: the inputs (rollouts) already live on the rank's device, and DDP would
    otherwise try to move a TensorDict input itself.
    """
    if not ctx.distributed:
        return module
    with collective(ctx, what):
        return DistributedDataParallel(module, device_ids=None, find_unused_parameters=find_unused_parameters)
