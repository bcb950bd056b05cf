"""Running under ``torchrun``: the process group, each rank's share of a global batch, and the
sums of metrics across ranks.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process it starts. With
``WORLD_SIZE`` above 1, :func:`start` joins the process group (NCCL on CUDA, Gloo otherwise);
without them the run is a single process and every helper here is a no-op.

Sharding: every rank builds the same :class:`fastdl.data.TensorBatches` of *global* batches
(the same seeded shuffle generator, the same seeded augmentation generator), augments the whole
global batch, then keeps its own contiguous slice (:class:`ShardedBatches`). So the images a
step sees, and their augmentation, do not depend on the number of processes, and a run can
resume with another one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data import TensorBatches

__all__ = ["Context", "start", "stop", "ShardedBatches", "shard_range", "all_reduce_sum", "broadcast_buffers"]


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_group: bool = False  # this run created the process group (and ends it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints and writes files."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def from_environment() -> Context:
    """The rank and world size torchrun put in the environment (one process without them)."""
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local = _env_int("LOCAL_RANK")
    return Context(rank, world, rank if local is None else local)


def start(device: torch.device) -> Context:
    """Join the process group torchrun describes, if there is one; returns the context."""
    context = from_environment()
    if not context.distributed:
        return context
    if dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), context.local_rank, started_group=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Context(dist.get_rank(), dist.get_world_size(), context.local_rank, started_group=True)


def stop(context: Context) -> None:
    if context.started_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, context: Context) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous share of ``n`` items (sizes differ by at
    most one, the first ranks taking the larger shares)."""
    base, extra = divmod(n, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return start, start + base + (1 if context.rank < extra else 0)


class ShardedBatches:
    """This rank's share of each global batch of ``batches``.

    Yields ``(images, labels, global_size)``: the rank's slice of the transformed global batch
    and the number of images in the whole global batch (to scale the loss so that DDP's
    gradient average is the global batch's mean, even when the slices differ in size).

    A last global batch too small to give every rank ``min_per_rank`` images is skipped (a
    training BatchNorm needs more than one value per channel); :meth:`__len__` counts the
    batches yielded.
    """

    def __init__(self, batches: TensorBatches, context: Context, min_per_rank: int = 1):
        self.batches, self.context, self.min_per_rank = batches, context, min_per_rank

    def _last_is_skipped(self) -> bool:
        n, size = self.batches.images.size(0), self.batches.batch_size
        last = n % size if not self.batches.drop_last else 0
        return 0 < last < self.min_per_rank * self.context.world_size

    def __len__(self) -> int:
        return len(self.batches) - (1 if self._last_is_skipped() else 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        # zip stops before drawing a skipped last batch (its shuffle was drawn with the others)
        for _, (images, labels) in zip(range(len(self)), self.batches):
            start, stop = shard_range(labels.size(0), self.context)
            yield images[start:stop], labels[start:stop], labels.size(0)


def all_reduce_sum(values: Tensor, context: Context) -> Tensor:
    """``values`` summed over the ranks (in place), unchanged for one process."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def broadcast_buffers(module: nn.Module, context: Context) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Plain DDP updates them
    per rank in training and copies rank 0's at the start of each forward; evaluation calls the
    module directly, so this makes every rank evaluate rank 0's model."""
    if not context.distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)
