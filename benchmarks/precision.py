"""Step time per precision mode as a ratio to fp32, on the demo model and patch size.

The step is the trainer's, built by :func:`medmtl.training.parts.build_training_parts` from the config
(its weighting, probe, loss and optimizer), with only ``train.precision`` varied.

Prints one JSON line per mode: ``{"bench": "precision", "mode": ..., "device": ..., "ratio_to_fp32": ...}``
with the median over interleaved repeats (modes alternate inside each repeat, so machine noise hits all
modes alike). Runs fp32 and bf16 on CPU; fp32, bf16 and fp16 (with a GradScaler) on a GPU when present.

    python benchmarks/precision.py [--repeats 5] [--steps 3] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from medmtl.config import load_config
from medmtl.modality import MODALITIES
from medmtl.training.parts import build_training_parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat and mode")
    args = ap.parse_args()
    cfg = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    modes = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    patch = cfg.preprocess.patch_size or (64, 64, 32)
    g = torch.Generator().manual_seed(0)
    batch = {m: {"image": torch.randn(cfg.train.batch_size[m], 1, *patch, generator=g),
                 "label": torch.randint(0, 1 + len(cfg.data.labels[m]), (cfg.train.batch_size[m], 1, *patch), generator=g)}
             for m in MODALITIES}
    setups = {}
    for mode in modes:
        torch.manual_seed(0)
        setups[mode] = build_training_parts(cfg, device, precision=mode)

    def run(mode: str, n: int) -> float:
        parts = setups[mode]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            parts.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    for mode in modes:  # warm-up (allocator, autotuning)
        run(mode, 1)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(run(mode, args.steps))
    base = statistics.median(times["fp32"])
    for mode in modes:
        med = statistics.median(times[mode])
        print(json.dumps({"bench": "precision", "mode": mode, "device": str(device), "config": args.config,
                          "ratio_to_fp32": round(med / base, 3), "median_step_s": round(med, 4), "repeats": args.repeats}))


if __name__ == "__main__":
    main()
