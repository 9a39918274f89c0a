"""The gradient-level hook: ``adjust_gradients`` gets each task's own gradient on the shared parameters,
and what it returns is the gradient the optimizer applies."""

import pytest
import torch

from medmtl.config import EqualWeightingConfig, validate_config
from medmtl.modality import MODALITIES
from medmtl.models.deep_supervision import deep_supervision_loss
from medmtl.training.parts import build_training_parts
from medmtl.training.step import TaskGradients
from medmtl.weighting.equal import EqualWeighting

SMALL = {"model": {"channels": [4, 8, 16], "num_res_units": 1, "deep_supervision_depths": ["dec1"]},
         "train": {"grad_clip": None}}


class SharedGradientsConfig(EqualWeightingConfig):
    """Equal weighting that asks for the per-task gradients on the shared parameters (test only)."""

    @property
    def gradient_parameters(self):
        return "shared"


class Recording(EqualWeighting):
    """Records the per-task gradients it is handed and returns ``g_ct + 0.5 g_mr``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, list[torch.Tensor]] = {}

    def adjust_gradients(self, task_grads):
        self.seen = {t: [g.clone() for g in gs] for t, gs in task_grads.items()}
        return [a + 0.5 * b for a, b in zip(task_grads["ct"], task_grads["mr"])]


def _batch():
    g = torch.Generator().manual_seed(3)
    return {m: {"image": torch.randn(2, 1, 16, 16, 8, generator=g),
                "label": torch.randint(0, 5, (2, 1, 16, 16, 8), generator=g)} for m in MODALITIES}


def _alone(parts, batch, task, params):
    """``torch.autograd.grad`` of task's loss alone (the term the step back-propagates, weight 1)."""
    net = parts.net
    out = net.forward_with_aux(batch[task]["image"], task)
    loss = deep_supervision_loss(parts.loss_fn, out, batch[task]["label"], net.deep_supervision_weights)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _parts(sharing):
    torch.manual_seed(0)
    cfg = validate_config({**SMALL, "sharing": sharing})
    parts = build_training_parts(cfg, torch.device("cpu"))
    parts.weighting = Recording(cfg=SharedGradientsConfig(), tasks=MODALITIES)
    parts.task_gradients = TaskGradients(parts.net.shared_parameters())
    return parts


@pytest.mark.parametrize("sharing", [
    [{"kind": "hard", "depths": "all"}],
    [{"kind": "hard", "depths": ["enc0", "enc1"]}],
    [{"kind": "cross_stitch", "depths": ["enc1", "bottleneck"]}],
], ids=["hard-all", "hard-encoder", "cross-stitch"])
def test_hook_gets_each_tasks_own_gradient_and_its_result_is_applied(sharing):
    parts = _parts(sharing)
    batch = _batch()
    shared = parts.net.shared_parameters()
    assert shared
    everything = [p for g in parts.optimizer.param_groups for p in g["params"]]
    ref = {t: _alone(parts, batch, t, everything) for t in MODALITIES}
    res = parts.step(batch)
    assert res.applied
    # the hook saw task i's gradient alone on every shared parameter, read between the backward passes
    for t in MODALITIES:
        by_id = {id(p): g for p, g in zip(everything, ref[t])}
        for p, got in zip(shared, parts.weighting.seen[t]):
            torch.testing.assert_close(got, by_id[id(p)], rtol=1e-5, atol=1e-7)
    # what it returned is the gradient the optimizer applied; other parameters keep the plain sum
    shared_ids = {id(p) for p in shared}
    for i, p in enumerate(everything):
        expected = ref["ct"][i] + (0.5 if id(p) in shared_ids else 1.0) * ref["mr"][i]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)


def test_collect_divides_out_the_loss_scale_and_write_scales_back():
    p = torch.nn.Parameter(torch.zeros(3))
    tg = TaskGradients([p])
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-0.5, 0.25, 4.0])
    p.grad = 8.0 * a
    tg.record()
    p.grad += 8.0 * b
    grads = tg.collect(("ct", "mr"), scale=8.0)
    torch.testing.assert_close(grads["ct"][0], a)
    torch.testing.assert_close(grads["mr"][0], b)
    tg.write([a - b], scale=8.0)
    torch.testing.assert_close(p.grad, 8.0 * (a - b))


def test_methods_without_the_hook_get_no_gradient_copies():
    cfg = validate_config({**SMALL, "sharing": [{"kind": "hard", "depths": "all"}]})
    parts = build_training_parts(cfg, torch.device("cpu"))
    assert parts.task_gradients is None and parts.probe is None


def test_a_method_on_shared_parameters_is_refused_at_config_time_without_any():
    soft = validate_config({**SMALL, "sharing": [{"kind": "soft", "depths": {"enc0": 1.0}}]})
    assert soft.shared_depths == []
    with pytest.raises(ValueError, match=r"weighting\.method: equal acts on the parameters both tasks.*\(soft\) has none"):
        SharedGradientsConfig().check(soft)
    hard = validate_config({**SMALL, "sharing": [{"kind": "hard", "depths": ["enc0"]}]})
    SharedGradientsConfig().check(hard)  # enc0 is shared: accepted


def _rank_batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return {m: {"image": torch.randn(1, 1, 16, 16, 8, generator=g),
                "label": torch.randint(0, 5, (1, 1, 16, 16, 8), generator=g)} for m in MODALITIES}


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from medmtl.training.distributed import DistributedContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = validate_config({**SMALL, "sharing": [{"kind": "hard", "depths": ["enc0", "enc1"]}]})
        ctx = DistributedContext(rank=rank, world_size=world, backend="gloo")
        parts = build_training_parts(cfg, torch.device("cpu"), ctx)
        parts.weighting = Recording(cfg=SharedGradientsConfig(), tasks=MODALITIES)
        parts.task_gradients = TaskGradients(parts.net.shared_parameters(), ctx)
        parts.step(_rank_batch(rank))
        torch.save(parts.weighting.seen, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_data_parallelism_each_task_gradient_is_the_rank_average_and_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # reference: each rank's task gradient computed alone on the same initial net, averaged over ranks
    refs = []
    for r in range(world):
        torch.manual_seed(0)
        cfg = validate_config({**SMALL, "sharing": [{"kind": "hard", "depths": ["enc0", "enc1"]}]})
        parts = build_training_parts(cfg, torch.device("cpu"))
        shared = parts.net.shared_parameters()
        refs.append({t: _alone(parts, _rank_batch(r), t, shared) for t in MODALITIES})
    for t in MODALITIES:
        for i in range(len(refs[0][t])):
            assert torch.equal(seen[0][t][i], seen[1][t][i])  # bit-identical on every rank
            mean = sum(ref[t][i] for ref in refs) / world
            torch.testing.assert_close(seen[0][t][i], mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["metabalance", "pcgrad", "cagrad"])
@pytest.mark.parametrize("sharing", [
    [{"kind": "hard", "depths": ["enc0", "enc1"]}],
    [{"kind": "cross_stitch", "depths": ["enc1", "bottleneck"]}],
], ids=["hard-encoder", "cross-stitch"])
def test_a_gradient_level_method_applies_its_combination_of_each_tasks_gradient_alone(method, sharing):
    import copy

    torch.manual_seed(0)
    cfg = validate_config({**SMALL, "sharing": sharing, "weighting": {"method": method}})
    parts = build_training_parts(cfg, torch.device("cpu"))
    assert parts.task_gradients is not None
    batch = _batch()
    shared = parts.net.shared_parameters()
    everything = [p for g in parts.optimizer.param_groups for p in g["params"]]
    ref = {t: _alone(parts, batch, t, everything) for t in MODALITIES}
    by_id = {t: {id(p): g for p, g in zip(everything, ref[t])} for t in MODALITIES}
    # the method's own combination of the gradients computed alone, from a copy in the same state
    expected = copy.deepcopy(parts.weighting).adjust_gradients({t: [by_id[t][id(p)].clone() for p in shared] for t in MODALITIES})
    # spy on the optimizer: the gradient it is handed (clip is off, no penalties here)
    seen = {}
    parts.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.update({id(p): p.grad.clone() for p in everything}))
    res = parts.step(batch)
    assert res.applied
    for p, e in zip(shared, expected):
        torch.testing.assert_close(seen[id(p)], e, rtol=1e-4, atol=1e-6)
    shared_ids = {id(p) for p in shared}
    for i, p in enumerate(everything):  # task-specific parameters keep the plain sum
        if id(p) not in shared_ids:
            torch.testing.assert_close(seen[id(p)], ref["ct"][i] + ref["mr"][i], rtol=1e-5, atol=1e-7)
    assert set(parts.weighting.log_values()) >= {"gradients/norm/ct", "gradients/cosine/ct_mr", "gradients/conflict_fraction"}


def _ddp_method_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from medmtl.training.distributed import DistributedContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ctx = DistributedContext(rank=rank, world_size=world, backend="gloo")
        for method in GRADIENT_METHODS:
            torch.manual_seed(0)
            cfg = validate_config({**SMALL, "sharing": [{"kind": "hard", "depths": ["enc0", "enc1"]}], "weighting": {"method": method}})
            parts = build_training_parts(cfg, torch.device("cpu"), ctx)
            for step in range(2):
                parts.step(_rank_batch(rank + 10 * step))
            torch.save({"net": parts.net.state_dict(), "weighting": parts.weighting.state_dict()}, f"{out_dir}/{method}{rank}.pt")
    finally:
        dist.destroy_process_group()


GRADIENT_METHODS = ["metabalance", "pcgrad", "cagrad"]


@pytest.mark.slow
def test_under_data_parallelism_gradient_level_methods_keep_the_ranks_bit_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_method_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for method in GRADIENT_METHODS:
        a, b = (torch.load(tmp_path / f"{method}{r}.pt", weights_only=True) for r in range(2))
        for part in ("net", "weighting"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), f"{method}: {part}.{k}"
        assert int(a["weighting"]["observed_steps"]) == 2
