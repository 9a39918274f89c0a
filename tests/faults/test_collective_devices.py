"""Every tensor handed to a ``torch.distributed`` collective lives on the process group's device (issue 12, item 2).

Old failure: the step averaged the task losses in a CPU float64 tensor; NCCL refuses CPU tensors, so
multi-GPU training died on step 1 while CI (gloo, CPU) stayed green. The rule asserted here is NCCL's:
``tensor.device == ctx.device``, where :attr:`DistributedContext.device` is ``cuda:<local_rank>`` under NCCL
and the CPU under gloo. The gloo test runs two real ranks through real training steps (GradNorm, so the
probe's all-reduce runs too) with every collective recorded; the CUDA test runs the same steps on a GPU with
a recording two-rank stand-in for NCCL and is the one that fails on the old code (it needs a GPU).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medmtl.training.distributed import DistributedContext, all_reduce_mean, check_in_sync

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter")


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def record_collectives(monkeypatch, calls: list, fake_world: int | None = None) -> None:
    """Wrap every collective of ``torch.distributed`` (and its c10d module) to append ``(name, device)``.

    With ``fake_world`` the collective is not run: ``all_reduce`` multiplies by ``fake_world`` (identical
    ranks), which is what a real group of that many identical replicas returns.
    """
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        real = getattr(c10d, name, None)
        if real is None:
            continue

        def wrapper(*args, _name=name, _real=real, **kwargs):
            calls.extend((_name, str(t.device)) for t in _tensors(args, kwargs))
            if fake_world is None:
                return _real(*args, **kwargs)
            if _name != "all_reduce":
                raise AssertionError(f"{_name} not simulated")
            args[0].mul_(fake_world)
            return None

        monkeypatch.setattr(dist, name, wrapper)
        monkeypatch.setattr(c10d, name, wrapper)


def _steps(device: torch.device, ctx: DistributedContext) -> None:
    """Two real training steps (GradNorm: the probe's all-reduce runs too), built as training builds them."""
    from medmtl.config import validate_config
    from medmtl.training.parts import build_training_parts

    torch.manual_seed(0)
    cfg = validate_config({"model": {"channels": [4, 8, 16], "num_res_units": 0}, "weighting": {"method": "gradnorm"},
                           "train": {"grad_clip": 1.0}})
    parts = build_training_parts(cfg, device, ctx)
    assert parts.probe is not None
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(2):
        parts.step({m: {"image": torch.randn(1, 1, 16, 16, 8, generator=g), "label": torch.randint(0, 5, (1, 1, 16, 16, 8), generator=g)}
                    for m in ("ct", "mr")})
    all_reduce_mean(torch.tensor([1.0, 2.0], dtype=torch.float64), ctx)  # a CPU float64 value, as the step's losses


def _gloo_rank(rank: int, world: int, init_file: str, out: str) -> None:
    calls: list = []
    mp_ = pytest.MonkeyPatch()
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        ctx = DistributedContext(rank=rank, world_size=world, local_rank=rank, backend="gloo")
        record_collectives(mp_, calls)
        _steps(torch.device("cpu"), ctx)
        check_in_sync({"x": torch.ones(3)}, ctx, "probe tensors")
        Path(out).with_suffix(f".{rank}.json").write_text(json.dumps({"ctx_device": str(ctx.device), "calls": calls}))
        # both ranks past their last collective before either tears the group down: a gloo group destroyed
        # while the peer still talks to it aborts the process ("terminate called without an active exception")
        dist.barrier()
    finally:
        mp_.undo()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_gloo_collectives_get_tensors_on_the_context_device(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_gloo_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "calls")), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        rec = json.loads((tmp_path / f"calls.{rank}.json").read_text())
        names = {n for n, _ in rec["calls"]}
        assert {"all_reduce", "all_gather"} <= names, names  # the step's reductions and check_in_sync's gather
        assert rec["ctx_device"] == "cpu"
        assert {d for _, d in rec["calls"]} == {rec["ctx_device"]}, rec["calls"]


def test_context_device_is_the_backends_device():
    assert DistributedContext(rank=1, world_size=2, local_rank=1, backend="nccl").device == torch.device("cuda", 1)
    assert DistributedContext(rank=1, world_size=2, local_rank=1, backend="gloo").device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the NCCL rule on a GPU needs a GPU (hardware, not a dependency)")
def test_nccl_rule_on_a_gpu(monkeypatch):
    calls: list = []
    record_collectives(monkeypatch, calls, fake_world=2)
    ctx = DistributedContext(rank=0, world_size=2, local_rank=torch.cuda.current_device(), backend="nccl")
    _steps(ctx.device, ctx)
    assert calls and {d for _, d in calls} == {str(ctx.device)}, calls
