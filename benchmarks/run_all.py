"""Run every benchmark (what ``make bench`` does) and print their JSON lines, then one line of wall times.

Run: ``python benchmarks/run_all.py`` (quick mode, the default: fewer rounds and no torch.compile or
served model, so that all of them finish in under 15 minutes on 2 cores) or ``--full`` (each
benchmark's own defaults: more rounds, steadier medians, about an hour on 2 cores). Each benchmark runs
as its own process, one after the other; their lines are passed through unchanged (each carries its
ratios measured in its own run), and the last line, ``{"bench": "run_all", ...}``, gives every
benchmark's wall time, the total, and the exit status of any that failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# per benchmark: arguments in quick mode, and in full mode (the predict benchmark lives in predict.py)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "ingest.py": (["--repeats", "1"], []),
    "loader.py": (["--ct", "4", "--mr", "4", "--rounds", "2", "--batches", "8", "--steps", "1", "--calls", "5",
                   "--workers", "0", "1"], []),
    "precision.py": (["--repeats", "2", "--steps", "2"], []),
    "predict.py": (["--quick"], []),
    "sharing.py": (["--rounds", "2", "--penalty-repeats", "10"], []),
    "tracking.py": (["--steps", "15", "--rounds", "2", "--skip-predict"], ["--skip-predict"]),
    "train_step.py": (["--quick"], []),
    "weighting.py": (["--rounds", "2", "--steps", "2", "--warmup", "1"], []),
}
BUDGET_S = 15 * 60


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks in turn; exit 1 when any failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="each benchmark's own defaults (longer, steadier)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these (e.g. predict.py train_step.py)")
    args = ap.parse_args(argv)
    seconds: dict[str, float] = {}
    failed: dict[str, int] = {}
    t_all = time.perf_counter()
    for name, (quick, full) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, str(ROOT / "benchmarks" / name), *(full if args.full else quick)], cwd=ROOT)
        seconds[name] = round(time.perf_counter() - t0, 1)
        if code:
            failed[name] = code
    total = time.perf_counter() - t_all
    print(json.dumps({"bench": "run_all", "mode": "full" if args.full else "quick", "seconds": seconds, "total_s": round(total, 1),
                      "budget_s": BUDGET_S if not args.full else None, "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
