"""Training-step time: medmtl's single-task step against plain PyTorch and MONAI loops, torch.compile, channels-last.

Run: ``python benchmarks/train_step.py`` (``--quick``: 2 rounds, no torch.compile; what ``make bench`` runs).
``--device cuda`` on a GPU adds the precision rows (bf16 and fp16 against fp32, goal >= 1.8x).

One config (``configs/baseline_single_task.yaml``: the demo's model, two independent columns, equal weights),
one fixed batch of random patches at its patch size (2 CT + 2 MR patches of 64x64x32), AdamW, DiceCE, clip 12,
and, per variant, the median wall time of a step over ``--rounds`` interleaved rounds of ``--steps`` steps
(after one warm-up round; variants alternate inside each round so a busy moment hits all alike). One torch
thread by default (``--threads``): steadier on a shared machine. JSON lines, ``ratio`` = median over rounds of
(variant / ``medmtl_step``) in the same round:

* ``medmtl_step``: :meth:`medmtl.training.parts.TrainingParts.step`, what ``medmtl train`` runs;
* ``plain_same_blocks``: the same two columns and heads (``TwoColumnNet``'s own modules) in a plain PyTorch
  loop (forward, loss, backward per modality, clip, AdamW): what the routing and the step machinery cost;
  goal ``medmtl_step`` <= 1.05x of it (``ratio`` here is plain / medmtl, so goal >= 0.95);
* ``monai_unet``: two MONAI ``UNet`` of the same channels, strides 2, the same residual units, norm and
  activation, in the same plain loop. MONAI's UNet starts with a stride-2 convolution and has no
  full-resolution stage, so it does less work: ``gflops_per_step`` (forward + backward, counted with
  ``torch.utils.flop_counter``) is printed for both, and ``ratio_per_gflop`` compares time per GFLOP;
* ``medmtl_step_compiled`` (not in ``--quick``): ``train.compile=true`` (``nn.Module.compile``), compile time
  reported separately as ``compile_s`` (first two steps);
* ``medmtl_step_channels_last``: network and patches in ``torch.channels_last_3d`` memory format.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from medmtl.config import load_config  # noqa: E402
from medmtl.modality import MODALITIES  # noqa: E402
from medmtl.training.parts import build_loss, build_training_parts  # noqa: E402


def emit(record: dict) -> None:
    """Print one JSON line."""
    print(json.dumps(record), flush=True)


class PlainLoop:
    """A plain PyTorch training step over one (network, head-less or not) pair per modality."""

    def __init__(self, nets: dict[str, torch.nn.Module], cfg, device: torch.device) -> None:
        self.nets, self.cfg = nets, cfg
        params = [p for n in nets.values() for p in n.parameters()]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)
        self.loss = build_loss(cfg.loss).to(device)

    def step(self, batch) -> None:
        """Forward, loss and backward per modality, then clip and one AdamW step."""
        self.opt.zero_grad(set_to_none=True)
        for m in MODALITIES:
            self.loss(self.nets[m](batch[m]["image"]), batch[m]["label"]).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.opt.step()


class ColumnWithHead(torch.nn.Module):
    """One column of a ``TwoColumnNet`` and its head, called as a plain network."""

    def __init__(self, column: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.column, self.head = column, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W) -> (B, 1 + n, D, H, W)``."""
        return self.head(self.column(x))


def monai_unet(cfg, n_out: int) -> torch.nn.Module:
    """MONAI's UNet with the config's channels, residual units, norm and PReLU."""
    from monai.networks.nets import UNet

    from medmtl.models.column import norm_spec

    ch = tuple(cfg.model.channels)
    return UNet(spatial_dims=3, in_channels=cfg.model.in_channels, out_channels=n_out, channels=ch, strides=(2,) * (len(ch) - 1),
                num_res_units=cfg.model.num_res_units, norm=norm_spec(cfg.model.norm), act="PRELU")


def gflops(step_fn) -> float:
    """GFLOPs of one call of ``step_fn`` (forward and backward; ``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_fn()
    return counter.get_total_flops() / 1e9


def make_batch(cfg, device: torch.device, channels_last: bool = False) -> dict:
    """Fixed random patches and labels per modality at the config's patch and batch size."""
    g = torch.Generator().manual_seed(0)
    patch = tuple(cfg.preprocess.patch_size or (64, 64, 32))
    out = {}
    for m in MODALITIES:
        b, n = cfg.train.batch_size[m], len(cfg.data.labels[m])
        img = torch.randn(b, 1, *patch, generator=g).to(device)
        if channels_last:
            img = img.contiguous(memory_format=torch.channels_last_3d)
        out[m] = {"image": img, "label": torch.randint(0, 1 + n, (b, 1, *patch), generator=g).to(device)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Build every variant, time them in interleaved rounds, print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "baseline_single_task.yaml"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (its compilation takes minutes on CPU)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 steps, no torch.compile (make bench)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.no_compile = 2, 2, True
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    n_out = {m: 1 + len(cfg.data.labels[m]) for m in MODALITIES}
    emit({"bench": "train_step_setup", "config": Path(args.config).name, "device": str(device), "threads": args.threads,
          "patch": list(cfg.preprocess.patch_size or (64, 64, 32)), "batch": cfg.train.batch_size,
          "load_avg_1min": round(os.getloadavg()[0], 2)})

    batch = make_batch(cfg, device)
    variants: dict[str, callable] = {}
    torch.manual_seed(0)
    parts = build_training_parts(cfg, device)
    variants["medmtl_step"] = lambda: parts.step(batch)
    torch.manual_seed(0)
    twin = build_training_parts(cfg, device).net  # same initial weights, own copy
    plain = PlainLoop({m: ColumnWithHead(twin.columns[m], twin.heads[m]) for m in MODALITIES}, cfg, device)
    variants["plain_same_blocks"] = lambda: plain.step(batch)
    torch.manual_seed(0)
    unet = PlainLoop({m: monai_unet(cfg, n_out[m]).to(device) for m in MODALITIES}, cfg, device)
    variants["monai_unet"] = lambda: unet.step(batch)
    torch.manual_seed(0)
    cl_parts = build_training_parts(cfg, device)
    cl_parts.net.to(memory_format=torch.channels_last_3d)
    cl_batch = make_batch(cfg, device, channels_last=True)
    variants["medmtl_step_channels_last"] = lambda: cl_parts.step(cl_batch)
    compile_s = None
    if not args.no_compile:
        ccfg = cfg.model_copy(deep=True)
        ccfg.train.compile = True
        torch.manual_seed(0)
        c_parts = build_training_parts(ccfg, device)
        t0 = time.perf_counter()
        c_parts.step(batch)
        c_parts.step(batch)
        compile_s = time.perf_counter() - t0
        variants["medmtl_step_compiled"] = lambda: c_parts.step(batch)

    flops = {"medmtl_step": gflops(variants["plain_same_blocks"]), "monai_unet": gflops(variants["monai_unet"])}
    flops["plain_same_blocks"] = flops["medmtl_step"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    for fn in variants.values():  # warm-up
        timed(fn, 1)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.rounds):
        for k in order if r % 2 == 0 else reversed(order):
            times[k].append(timed(variants[k], args.steps))
    base = times["medmtl_step"]
    for k, ts in times.items():
        rec = {"bench": "train_step", "variant": k, "median_step_s": round(statistics.median(ts), 4),
               "ratio": round(statistics.median(t / b for t, b in zip(ts, base)), 3), "rounds": args.rounds, "steps": args.steps}
        if k in flops:
            rec["gflops_per_step"] = round(flops[k], 2)
            rec["ratio_per_gflop"] = round(statistics.median((t / flops[k]) / (b / flops["medmtl_step"]) for t, b in zip(ts, base)), 3)
        if k == "plain_same_blocks":
            rec["goal"] = "ratio >= 0.95 (medmtl step <= 1.05x the plain loop)"
        if k == "medmtl_step_compiled":
            rec["compile_s"] = round(compile_s, 1)
        emit(rec)
    if device.type == "cuda":
        precision_rows(cfg, device, batch, args)
    emit({"bench": "train_step_done", "load_avg_1min": round(os.getloadavg()[0], 2)})
    return 0


def precision_rows(cfg, device: torch.device, batch: dict, args) -> None:
    """On CUDA: bf16 and fp16 (GradScaler) against fp32, same step, interleaved rounds (goal >= 1.8x)."""
    modes = ("fp32", "bf16", "fp16")
    setups = {}
    for mode in modes:
        torch.manual_seed(0)
        setups[mode] = build_training_parts(cfg, device, precision=mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:
        setups[m].step(batch)
    for _ in range(args.rounds):
        for m in modes:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                setups[m].step(batch)
            torch.cuda.synchronize()
            times[m].append((time.perf_counter() - t0) / args.steps)
    for m in modes:
        emit({"bench": "train_step_precision", "mode": m, "device": torch.cuda.get_device_name(device),
              "median_step_s": round(statistics.median(times[m]), 4),
              "speedup_vs_fp32": round(statistics.median(f / t for f, t in zip(times["fp32"], times[m])), 3), "goal": ">= 1.8"})


if __name__ == "__main__":
    sys.exit(main())
