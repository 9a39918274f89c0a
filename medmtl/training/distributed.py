"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``.

Each rank draws its own shard of the CT and MR streams; gradients are averaged across ranks once per
step, after both tasks' backward passes. This is done explicitly rather than by
``DistributedDataParallel``'s per-backward hooks because a step runs two disjoint forward/backward
graphs (CT, then MR), each touching only part of the parameters when the columns are not mixed, and
GradNorm reads each task's gradient on ``W`` between them: DDP would need ``find_unused_parameters``
and would all-reduce twice per step. Here a step costs one all-reduce of one flat buffer of all
gradients, plus one of ``W``'s per-task slice when GradNorm asks for it.

The per-task losses handed to the weighting method are averaged across ranks too, so every rank runs
the same weighting update on the same numbers and the task weights stay bit-identical.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["DistributedContext", "init_distributed", "average_gradients", "all_reduce_mean", "state_digest", "check_in_sync"]


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and backend of this process (world size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """The device of every tensor handed to a collective: ``cuda:<local_rank>`` under NCCL, else the CPU.

        NCCL refuses CPU tensors ("No backend type associated with device type cpu"), gloo handles CPU
        tensors; values computed on another device are moved here for the collective and back after it.
        """
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints and talks to MLflow."""
        return self.rank == 0


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (nccl on GPUs, gloo on CPU).

    Without ``WORLD_SIZE`` > 1 in the environment this is a single-process context and does nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def average_gradients(params: list[torch.nn.Parameter], ctx: DistributedContext) -> None:
    """Average ``p.grad`` over ranks in one all-reduce of a flat buffer (parameters without a grad get zeros).

    Every rank must hold a gradient for the same parameters in the same order, so missing grads are
    materialized as zeros first (a column unused by this step's batches on one rank may be used on another).
    """
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads).to(ctx.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(ctx.world_size)
    for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(avg)


def all_reduce_mean(t: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Mean of ``t`` over ranks, on ``t``'s device (returns ``t`` itself in a single process).

    The reduction runs on :attr:`DistributedContext.device` (e.g. the step's CPU float64 task losses go
    to the GPU under NCCL and come back).
    """
    if not ctx.enabled:
        return t
    out = t.to(ctx.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(ctx.world_size).to(t.device)


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the bytes of named tensors (bit-level identity, not closeness)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_in_sync(tensors: dict[str, torch.Tensor], ctx: DistributedContext, what: str) -> str:
    """Raise if ``tensors`` differ in any bit between ranks; returns this rank's digest.

    Called at every checkpoint: replicas that drift apart silently would make the checkpoint (rank 0's
    copy) differ from what the other ranks train.
    """
    digest = state_digest(tensors)
    if ctx.enabled:
        digests: list = [None] * ctx.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"{what} differ between ranks at a checkpoint (digests {digests}); the replicas diverged")
    return digest
