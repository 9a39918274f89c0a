"""Training-step time of every loss-weighting method as a ratio to equal weighting (JSON lines).

A step is the real :func:`medmtl.training.step.train_step` (CT then MR forward and backward, the
GradNorm probe between them when the method asks for it, penalties, clipping, AdamW, the method's
``after_step``) on the demo model (``configs/demo.yaml``: channels 8-16-32-64, one residual unit,
soft sharing on enc0/enc1, 2 CT + 2 MR random patches of 64x64x32, DiceCE, fp32). GradNorm's ``W`` is
the bottleneck (its default). Methods are interleaved round by round; each ratio is the median over
rounds of (method's median step time / equal weighting's median step time in the same round), so a
slow moment of a shared machine hits every method alike. Target: GradNorm <= 1.05x equal.

Each line also gives ``weighting_overhead_fraction``: the time spent inside the method's hooks and the
probe's reads as a fraction of the step (the task terms include the weighted losses' multiply); unlike
the ratio it is measured within each step, so a busy machine disturbs it much less.

MetaBalance, PCGrad and CAGrad act on the parameters both tasks put gradient on, which the demo's soft
sharing has none of: they are skipped there (one line says so) and measured with ``--sharing baseline_hard``
or ``--sharing abdomen_cross_stitch``. Their step reads each task's gradient on the shared parameters
between the backward passes (one copy, no extra backward; LibMTL runs one backward per task). Target:
each <= 1.10x equal.

DST starts with nothing to drop (drop probabilities grow with progress and stalls); its line reports
the fraction of task forwards it actually ran, since dropping saves whole forward/backward passes.

    python benchmarks/weighting.py               # ~2-3 minutes on 2 CPU cores
    python benchmarks/weighting.py --rounds 3    # quicker, noisier
    python benchmarks/weighting.py --sharing baseline_hard          # hard sharing: the gradient-level rows
    python benchmarks/weighting.py --sharing abdomen_cross_stitch   # cross-stitch (dual path)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from medmtl.config import ConfigError, validate_config
from medmtl.modality import MODALITIES
from medmtl.training.parts import build_training_parts
from medmtl.weighting import METHODS

ROOT = Path(__file__).resolve().parents[1]


class Setup:
    """One method's training parts (net, weighting, optimizer, loss, probe, per-task gradients), built from the
    demo config by :func:`medmtl.training.parts.build_training_parts`, exactly as the trainer builds them."""

    def __init__(self, method: str, device: torch.device, sharing: list | None = None) -> None:
        raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        raw["weighting"] = {"method": method}
        raw["train"] = {**raw.get("train", {}), "precision": "fp32"}
        if sharing is not None:
            raw["sharing"] = sharing
        self.cfg = cfg = validate_config(raw, "benchmarks/weighting.py")
        torch.manual_seed(cfg.seed)  # the same initial net for every method
        self.parts = build_training_parts(cfg, device)
        self.forwards = 0
        # seconds spent inside the weighting machinery (hooks, probe reads, per-task gradient copies),
        # summed since the last reset
        self.overhead = 0.0
        w, probe, grads = self.parts.weighting, self.parts.probe, self.parts.task_gradients
        for owner, name in ((w, "select_tasks"), (w, "task_terms"), (w, "adjust_gradients"), (w, "after_step"),
                            (probe, "read"), (grads, "record"), (grads, "collect"), (grads, "write")):
            if owner is not None:
                object.__setattr__(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.overhead += time.perf_counter() - t0
        return wrapper

    def step(self, batch: dict) -> None:
        """One training step (the schedule is not advanced: every round sees the same learning rate)."""
        res = self.parts.step(batch)
        self.forwards += len(res.losses)


def random_batches(cfg, n: int, device: torch.device) -> list[dict]:
    """``n`` random batches of the demo's patch size and label count (made once, outside the timing)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b = {}
        for m in MODALITIES:
            shape = (cfg.train.batch_size[m], 1, *cfg.preprocess.patch_size)
            b[m] = {"image": torch.randn(shape, generator=g).to(device),
                    "label": torch.randint(0, 1 + len(cfg.data.labels[m]), shape, generator=g).to(device)}
        out.append(b)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (each runs every method)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the first round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=None, help="comma-separated methods to time (equal is always included); default all")
    ap.add_argument("--sharing", default=None, help="use the sharing section of configs/NAME.yaml (e.g. baseline_hard) instead of the demo's")
    args = ap.parse_args()
    device = torch.device(args.device)
    sharing = None
    if args.sharing is not None:
        sharing = yaml.safe_load((ROOT / "configs" / f"{args.sharing}.yaml").read_text())["sharing"]
    setups: dict[str, Setup] = {}
    chosen = sorted(METHODS) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = set(chosen) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose among {', '.join(sorted(METHODS))}")
    for m in ["equal"] + sorted(m for m in chosen if m != "equal"):
        try:
            setups[m] = Setup(m, device, sharing)
        except ConfigError as err:  # e.g. a gradient-level method on the demo's soft sharing (nothing shared)
            print(json.dumps({"benchmark": "weighting_step", "method": m, "skipped": str(err).splitlines()[-1].strip(),
                              "sharing": args.sharing or "demo"}), flush=True)
    methods = list(setups)
    batches = random_batches(setups["equal"].cfg, 4, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for s in setups.values():
        for i in range(args.warmup):
            s.step(batches[i % len(batches)])
        s.forwards = 0
    times: dict[str, list[float]] = {m: [] for m in methods}  # per round: median step seconds
    overhead: dict[str, list[float]] = {m: [] for m in methods}  # per round: weighting seconds / step seconds
    for r in range(args.rounds):
        # rotate the order so no method always runs right after another
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            step_times = []
            setups[m].overhead = 0.0
            for i in range(args.steps):
                sync()
                t0 = time.perf_counter()
                setups[m].step(batches[i % len(batches)])
                sync()
                step_times.append(time.perf_counter() - t0)
            times[m].append(statistics.median(step_times))
            overhead[m].append(setups[m].overhead / sum(step_times))
    for m in methods:
        ratios = [a / b for a, b in zip(times[m], times["equal"])]
        line = {
            "benchmark": "weighting_step", "method": m, "ratio_to_equal": round(statistics.median(ratios), 4),
            "median_step_s": round(statistics.median(times[m]), 4), "rounds": args.rounds, "steps_per_round": args.steps,
            "weighting_overhead_fraction": round(statistics.median(overhead[m]), 5),
            "forwarded_fraction": round(setups[m].forwards / (2 * args.rounds * args.steps), 3),
            "sharing": args.sharing or "demo", "device": device.type, "threads": torch.get_num_threads(),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
