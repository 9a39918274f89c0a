"""Training-step time of each sharing mechanism as a ratio to the single-task baseline (JSON lines).

A step is what the trainer does per iteration: the real :func:`medmtl.training.step.train_step` on parts
built by :func:`medmtl.training.parts.build_training_parts` (the demo's weighting with its probe, its
loss section, precision and optimizer), for CT then MR forward and backward, the sharing penalties,
clipping and the optimizer step. Every mechanism runs on the same random batch
of the demo's size (``configs/demo.yaml``: 2 CT + 2 MR patches of 64x64x32, channels 8-16-32-64, one
residual unit) with the ``sharing`` section of the shipped config that names it. Mechanisms are
interleaved round by round, and each ratio is the median over rounds of (mechanism step time /
single-task step time in the same round), so a slow moment of a shared machine hits both. Time is
the process's CPU time with one intra-op thread by default (``--threads 1``): on a machine shared
with other jobs, wall time mostly measures them; the wall-time ratio is printed too.

Mixing units (cross-stitch, sluice) run each modality's batch through *both* columns (dual path, see
DESIGN.md): about twice the columns' forward and backward compute up to the last mixing depth. The
other column's stages after it, the loss, the heads and the optimizer step are not doubled, so the
step ratio stays below 2 (about 1.5 with the last unit at ``dec1``, about 1.7 with one at ``dec0``).
Penalties (soft sharing, sluice orthogonality) are timed on their own, forward plus backward, and
reported as a fraction of that mechanism's median step; the target is under 2%.

Parameters (``bench: sharing_params``): each net's parameters (tied ones once) as a fraction of two
separate columns (the single-task net), and its adapter parameters (LoRA deltas, routers: what
``medmtl adapt`` trains on a frozen base, and what a modality adds to a shared column) as that fraction.
Goal for ``lora``: adapters <= 10% of two columns, step <= 1.1x single-task.

    python benchmarks/sharing.py                 # about 2-3 minutes on 2 shared CPU cores
    python benchmarks/sharing.py --rounds 3      # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from medmtl.config import validate_config
from medmtl.modality import MODALITIES
from medmtl.models.two_column import TwoColumnNet
from medmtl.training.parts import TrainingParts, build_training_parts

ROOT = Path(__file__).resolve().parents[1]

# mechanism -> its sharing section, or the name of the config in configs/ whose sharing section it is
MECHANISMS: dict[str, str | list] = {
    "single_task": "baseline_single_task",
    "soft": "abdomen_soft",
    "cross_stitch": "abdomen_cross_stitch",
    "sluice": "abdomen_sluice",
    "hard": "baseline_hard",
    "shared_kernels": "baseline_shared_kernels",
    "lora": "abdomen_lora",
    "mtlora": "abdomen_mtlora",
    "mixture_of_lora": "abdomen_mixture_of_lora",
    "soft+cross_stitch": [
        {"kind": "soft", "depths": {"enc0": 1.0e-3, "enc1": 1.0e-3}},
        {"kind": "cross_stitch", "depths": ["enc2", "bottleneck", "dec2", "dec1"]},
    ],
}


def build(sharing: str | list, device: torch.device) -> TrainingParts:
    """The demo's training parts with the given sharing section (a config name in configs/ or a section)."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["sharing"] = yaml.safe_load((ROOT / "configs" / f"{sharing}.yaml").read_text())["sharing"] if isinstance(sharing, str) else sharing
    cfg = validate_config(raw, "benchmarks/sharing.py")
    return build_training_parts(cfg, device)


def penalty_seconds(net: TwoColumnNet, repeats: int) -> float:
    """Median time of computing and back-propagating the sharing penalties alone."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        torch.stack(list(net.penalties().values())).sum().backward()
        times.append(time.process_time() - t0)
    net.zero_grad(set_to_none=True)
    return statistics.median(times)


def _count(params) -> int:
    """Number of parameters, each tensor once (tied parameters are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def main() -> None:
    """Run the interleaved rounds and print one JSON line per mechanism and per penalty."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine, where spinning OpenMP threads of several processes collide)")
    ap.add_argument("--penalty-repeats", type=int, default=30, help="timed repeats of each penalty alone")
    ap.add_argument("--mechanisms", nargs="+", default=None, choices=list(MECHANISMS), help="time only these (single_task always runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    batch = {m: {"image": torch.randn(2, 1, 64, 64, 32, generator=g), "label": torch.randint(0, 5, (2, 1, 64, 64, 32), generator=g)}
             for m in MODALITIES}
    chosen = [n for n in MECHANISMS if args.mechanisms is None or n in args.mechanisms or n == "single_task"]
    built = {name: build(MECHANISMS[name], device) for name in chosen}

    times: dict[str, list[float]] = {name: [] for name in built}
    walls: dict[str, list[float]] = {name: [] for name in built}
    for r in range(args.rounds + 1):
        for name, parts in built.items():
            t0, w0 = time.process_time(), time.perf_counter()
            parts.step(batch)
            if r > 0:  # round 0 warms up allocators, kernels and the optimizer state
                times[name].append(time.process_time() - t0)
                walls[name].append(time.perf_counter() - w0)

    def ratio(t: dict[str, list[float]], name: str) -> float:
        return round(statistics.median(a / b for a, b in zip(t[name], t["single_task"])), 3)

    for name, parts in built.items():
        net = parts.net
        print(json.dumps({
            "bench": "sharing_step", "mechanism": name, "ratio_to_single_task": ratio(times, name),
            "wall_ratio_to_single_task": ratio(walls, name),
            "median_step_cpu_s": round(statistics.median(times[name]), 4), "dual_path": net.dual_path,
            "rounds": args.rounds, "threads": args.threads,
            "note": "dual path: each batch runs through both columns, ~2x the columns' forward and backward "
                    "(loss, heads and optimizer step are not doubled)" if net.dual_path else "",
        }))
    two_columns = _count(built["single_task"].net.parameters())
    for name, parts in built.items():
        net = parts.net
        adapters = _count(p for mech in net.sharing for p in mech.adapter_parameters())
        print(json.dumps({
            "bench": "sharing_params", "mechanism": name, "params": _count(net.parameters()),
            "fraction_of_two_columns": round(_count(net.parameters()) / two_columns, 4),
            "adapter_params": adapters, "adapter_fraction_of_two_columns": round(adapters / two_columns, 4),
        }))
    for name, parts in built.items():
        net = parts.net
        if net.penalties():
            sec = penalty_seconds(net, args.penalty_repeats)
            frac = sec / statistics.median(times[name])
            print(json.dumps({
                "bench": "penalty_cost", "mechanism": name, "terms": sorted(net.penalties()),
                "median_penalty_cpu_s": round(sec, 6), "fraction_of_step": round(frac, 5), "under_2_percent": frac < 0.02,
            }))


if __name__ == "__main__":
    main()
