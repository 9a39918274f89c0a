"""Training-loader throughput beside the demo model's step rate, and albumentations vs MONAI (JSON lines).

A synthetic demo-like dataset (CT 96x96 and MR 80x80 matrices, as ``medmtl demo``) is written and
ingested in a temporary folder, planned, and split like the demo (``configs/demo.yaml``: 64x64x32
patches, 2 CT + 2 MR per step, MONAI 3D augmentation on). Then, round by round (interleaved, so a
busy moment of a shared machine hits every variant alike), medians over rounds of:

- ``demo_step``: steps/s of the real :func:`medmtl.training.step.train_step` on the demo model, built by
  :func:`medmtl.training.parts.build_training_parts` as training builds it (the demo's precision,
  weighting with its probe, loss; CPU), on one batch taken from the loader (so the loader does not slow it down).
- ``loader``: steps/s of the unpaired stream (one step = one CT batch + one MR batch) with 0, 1 and 2
  worker processes per modality; ``cold`` = a fresh stream, cache fill and worker start included,
  for the first ``--batches`` steps; ``warm`` = the next ``--batches`` steps served from the cache;
  ``nocache`` = ``data.cache=none`` (every step loads and resamples whole volumes).
  ``ratio_to_step_rate`` = loader steps/s / demo steps/s; the loader is not the bottleneck when the warm
  ratio is >= 2.
- ``augment``: milliseconds per 64x64x32 patch of the slice-consistent albumentations transform (affine,
  grid distortion, brightness/contrast, gamma, noise, each with p=1) and of its MONAI equivalent
  (RandAffined in-plane, RandGridDistortiond, RandScaleIntensityd, RandAdjustContrastd, RandGaussianNoised,
  each with prob=1), and their time ratio.

    python benchmarks/loader.py --threads 1        # ~3 minutes on 2 CPU cores
    python benchmarks/loader.py --rounds 2 --batches 10

Worker processes run the transforms with one torch thread each (PyTorch's default in workers); with 0
workers they run in the training process, between steps, so there the ratio says what fraction of the
step time the loader adds (1 / ratio).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.transforms import (
    Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised, RandGridDistortiond, RandScaleIntensityd,
)

from medmtl.config import AlbumentationsConfig, load_config
from medmtl.data.augment import SliceConsistentAlbumentationsd
from medmtl.ingest.run import ingest
from medmtl.data.loaders import build_training_stream, load_split
from medmtl.data.plan import compute_plan
from medmtl.synth import synthesize_exports
from medmtl.training.parts import build_training_parts

ROOT = Path(__file__).resolve().parents[1]


def emit(**fields) -> None:
    """One JSON line on stdout."""
    print(json.dumps(fields), flush=True)


def demo_step_time(cfg, batch: dict, steps: int) -> float:
    """Median seconds of one demo training step on ``batch``."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    parts = build_training_parts(cfg, device)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        parts.step(batch)
        if i:  # the first step pays for allocations
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def loader_rates(cfg, plan, split, data_dir: Path, n: int) -> tuple[float, float]:
    """(cold, warm) steps/s of a fresh stream: the first ``n`` steps (build included), then the next ``n``."""
    t0 = time.perf_counter()
    stream = build_training_stream(cfg, plan, split, data_dir=data_dir, device=None)
    for _ in range(n):
        next(stream)
    t1 = time.perf_counter()
    for _ in range(n):
        next(stream)
    t2 = time.perf_counter()
    del stream  # ends the worker processes before the next variant starts its own
    gc.collect()
    return n / (t1 - t0), n / (t2 - t1)


def augment_pair() -> tuple[SliceConsistentAlbumentationsd, Compose]:
    """The albumentations transform and its MONAI equivalent, every part always applied."""
    alb = SliceConsistentAlbumentationsd.from_config(AlbumentationsConfig(
        enabled=True, p=1.0, affine_p=1.0, grid_distortion_p=1.0, elastic_p=0.0, brightness_contrast_p=1.0, gamma_p=1.0, noise_p=1.0))
    keys = ["image", "label"]
    monai = Compose([
        RandAffined(keys=keys, prob=1.0, rotate_range=(0.0, 0.0, math.radians(15)), scale_range=(0.1, 0.1, 0.0),
                    translate_range=(3.2, 3.2, 0.0), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGridDistortiond(keys=keys, prob=1.0, distort_limit=0.2, mode=("bilinear", "nearest")),
        RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
        RandAdjustContrastd(keys="image", gamma=(0.8, 1.2), prob=1.0),
        RandGaussianNoised(keys="image", std=0.05, prob=1.0),
    ])
    alb.set_random_state(seed=0)
    monai.set_random_state(seed=0)
    return alb, monai


def median_ms(fn, data: dict, calls: int) -> float:
    """Median milliseconds per call."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn(dict(data))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    """Run every measurement and print JSON lines (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=int, default=8, help="synthetic CT patients")
    ap.add_argument("--mr", type=int, default=8, help="synthetic MR patients")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians over rounds)")
    ap.add_argument("--batches", type=int, default=16, help="loader steps timed per cold and per warm measurement")
    ap.add_argument("--steps", type=int, default=2, help="demo training steps timed per round (after one untimed)")
    ap.add_argument("--calls", type=int, default=10, help="augmentation calls timed per round and transform")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of this process (0 = torch's default); "
                    "1 gives stable numbers on a machine shared with other jobs")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker processes per modality to measure")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="medmtl-bench-loader-") as tmp:
        t = time.perf_counter()
        synth = synthesize_exports(Path(tmp) / "synth", n_ct=args.ct, n_mr=args.mr, seed=0)
        data_dir = Path(tmp) / "data"
        ingest(synth.export_dir, data_dir, labels_dir=synth.labels_dir, progress=False)
        base = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data_dir}"])
        _, split = load_split(base)
        plan = compute_plan(data_dir, base)
        emit(bench="setup", ct=args.ct, mr=args.mr, train_images={m: len(v) for m, v in split.train.items()},
             patch_size=list(base.preprocess.patch_size), batch_size=dict(base.train.batch_size), seconds=round(time.perf_counter() - t, 1),
             torch_threads=torch.get_num_threads())

        batch = next(build_training_stream(base, plan, split, data_dir=data_dir, device=None))
        cfgs = {w: load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data_dir}", f"data.num_workers={w}"]) for w in args.workers}
        nocache = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data_dir}", "data.cache=none"])
        patch = {k: v[0] for k, v in batch["ct"].items() if k in ("image", "label")}
        alb, monai = augment_pair()
        step_t, cold, warm, none, alb_ms, monai_ms = [], {w: [] for w in args.workers}, {w: [] for w in args.workers}, [], [], []
        for _ in range(args.rounds):
            step_t.append(demo_step_time(base, batch, args.steps))
            for w in args.workers:
                c, wa = loader_rates(cfgs[w], plan, split, data_dir, args.batches)
                cold[w].append(c)
                warm[w].append(wa)
            none.append(loader_rates(nocache, plan, split, data_dir, max(2, args.batches // 4))[1])
            alb_ms.append(median_ms(alb, patch, args.calls))
            monai_ms.append(median_ms(monai, patch, args.calls))

        step_rate = 1.0 / statistics.median(step_t)
        emit(bench="demo_step", steps_per_s=round(step_rate, 3), seconds_per_step=round(1 / step_rate, 3))
        for w in args.workers:
            for kind, rates in (("cold", cold[w]), ("warm", warm[w])):
                r = statistics.median(rates)
                emit(bench="loader", workers=w, cache=kind, steps_per_s=round(r, 2), ratio_to_step_rate=round(r / step_rate, 2))
        r = statistics.median(none)
        emit(bench="loader", workers=0, cache="nocache", steps_per_s=round(r, 2), ratio_to_step_rate=round(r / step_rate, 2))
        a, m = statistics.median(alb_ms), statistics.median(monai_ms)
        emit(bench="augment", patch=list(patch["image"].shape), albumentations_ms=round(a, 2), monai_ms=round(m, 2),
             time_ratio_albumentations_over_monai=round(a / m, 2))
        worst = min(statistics.median(warm[w]) for w in args.workers) / step_rate
        emit(bench="verdict", min_warm_ratio_to_step_rate=round(worst, 2), target=2.0, loader_not_bottleneck=worst >= 2.0)


if __name__ == "__main__":
    main()
