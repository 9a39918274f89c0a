"""The ``medmtl`` command line: thin argument parsing on top of the pipelines.

Every subcommand validates its inputs before doing work and turns expected errors (bad config,
missing folder, bad export) into one clear message and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

DEFAULT_CONFIG = "configs/demo.yaml"


def _config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", default=None if required else DEFAULT_CONFIG,
                   help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    ap = argparse.ArgumentParser(prog="medmtl", description="Joint CT and MRI segmentation: from scanner exports to a registered model.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic scanner exports (DICOM with fake patient data) and label masks")
    p.add_argument("out_dir")
    p.add_argument("--ct", type=int, default=10, help="number of CT patients")
    p.add_argument("--mr", type=int, default=10, help="number of MR patients (a different set)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("ingest", help="scanner export -> pseudonymized NIfTI dataset + manifest + report")
    p.add_argument("export_dir")
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument("--labels", default=None, help="folder of <SeriesInstanceUID>.nii.gz masks (or a CSV series_uid,label_path)")
    p.add_argument("--workers", type=int, default=None, help="header-reading threads")
    p.add_argument("--source", choices=["auto", "dicom", "nnunet"], default="auto", help="auto: an nnU-Net raw dataset when dataset.json and imagesTr/ exist, else DICOM")
    p.add_argument("--config", default=None, help="experiment YAML whose data.labels name the classes (maps DICOM SEG segments and nnU-Net labels by name)")

    p = sub.add_parser("plan", help="fingerprint DATA_DIR and write DATA_DIR/plan.json")
    p.add_argument("data_dir")
    p.add_argument("--config", default=None, help="experiment YAML whose model and memory budget size the planned patch and batch")

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the resolved configuration (defaults filled in, overrides applied)")
    _config_args(cs)

    p = sub.add_parser("train", help="train an experiment and track it in MLflow")
    _config_args(p)
    p.add_argument("--out", default="runs", help="folder for checkpoints (one subfolder per MLflow run)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue from a last.pt (same MLflow run, same data order)")

    p = sub.add_parser("evaluate", help="Dice and HD95 per class on the run's held-out cases, logged to the run with overlays")
    p.add_argument("run_id")
    p.add_argument("--data-root", default=None, help="DATA_DIR if it moved since training")
    p.add_argument("--overlays", type=int, default=2, help="overlay pictures per modality")

    p = sub.add_parser("compare", help="delta_m of multi-task runs against single-task baselines")
    p.add_argument("run_ids", nargs="+")
    p.add_argument("--baseline", nargs="+", required=True, metavar="STL_RUN_ID")

    p = sub.add_parser("register", help="register a run's model as a new version (alias challenger)")
    p.add_argument("run_id")
    p.add_argument("--name", default=None, help="registered model name (default: tracking.registered_model of the config)")
    p.add_argument("--config", default=DEFAULT_CONFIG)

    p = sub.add_parser("promote", help="move alias champion to a version if it passes the gates of the config (tracking.gate)")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version number")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config whose tracking.gate and tracking URI apply")
    p.add_argument("--allow-validation-scores", action="store_true", help="accept a version scored on validation cases only (no test split)")

    p = sub.add_parser("predict", help="segment a NIfTI image or a DICOM series folder with a logged or registered model")
    p.add_argument("model_uri", help="e.g. models:/medmtl-demo@champion or runs:/<run_id>/model")
    p.add_argument("input", help="NIfTI image, or a folder holding one DICOM series")
    p.add_argument("--modality", default=None, choices=["CT", "MR", "ct", "mr"], help="required for NIfTI; DICOM headers say it")
    p.add_argument("--out", required=True, help="output label NIfTI (on the input grid); for DICOM input a DICOM SEG is written beside it as <name>.seg.dcm")

    p = sub.add_parser("sync", help="send a run's metrics left in its local spool after a tracking-server outage")
    p.add_argument("spool_dir", help="runs/<run_id>/mlflow_spool")
    p.add_argument("--tracking-uri", default=None, help="default: the URI the run used")

    p = sub.add_parser("demo", help="synth -> ingest -> train -> evaluate -> MLflow -> registered model, on a small CPU-sized dataset")
    _config_args(p, required=False)
    p.add_argument("--workdir", default="demo_data")
    p.add_argument("--ct", type=int, default=10)
    p.add_argument("--mr", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    return ap


def _run(args: argparse.Namespace) -> int:
    from medmtl.config import config_to_yaml, load_config

    if args.command == "synth":
        from medmtl.synth import synthesize_exports

        res = synthesize_exports(args.out_dir, n_ct=args.ct, n_mr=args.mr, seed=args.seed, progress=True)
        n_img = sum(not s.is_localizer for s in res.series)
        print(f"wrote {n_img} image series ({args.ct} CT, {args.mr} MR patients) to {res.export_dir}, labels in {res.labels_dir}")
        return 0
    if args.command == "ingest":
        from medmtl.ingest.run import ingest

        names = load_config(args.config).data.labels if args.config else None
        report = ingest(args.export_dir, args.out, labels_dir=args.labels, workers=args.workers, progress=True,
                        source=args.source, label_names=names)
        print(report.summary())
        return 0
    if args.command == "plan":
        from pipelines.train import ensure_plan

        path = Path(args.data_dir) / "plan.json"
        if path.exists():
            path.unlink()
        print(f"wrote {ensure_plan(Path(args.data_dir), load_config(args.config) if args.config else None)}")
        return 0
    if args.command == "config":
        cfg = load_config(args.config, args.overrides)
        sys.stdout.write(config_to_yaml(cfg))
        return 0
    if args.command == "train":
        from pipelines.train import run_training

        cfg = load_config(args.config, args.overrides)
        res = run_training(cfg, out_dir=args.out, resume=args.resume)
        if not res.run_id:  # ranks other than 0 under torchrun
            return 0
        print(res.summary())
        return 0
    if args.command == "evaluate":
        from pipelines.evaluate import run_evaluation

        res = run_evaluation(args.run_id, data_root=args.data_root, overlays=args.overlays)
        for m in res.dice:
            print(f"  {m.upper()} Dice: " + "  ".join(f"{k} {v:.3f}" for k, v in res.dice[m].items()))
            print(f"  {m.upper()} HD95: " + "  ".join(f"{k} {v:.1f}" for k, v in res.hd95[m].items()) + " (mm)")
        return 0
    if args.command == "compare":
        from pipelines.compare import run_compare

        d = run_compare(args.run_ids, args.baseline)
        print(f"delta_m = {d.value:+.2f}% (mean over tasks of the relative change; positive = better than single-task)")
        for t, v in d.per_task.items():
            flag = "  <- negative transfer" if v < 0 else ""
            print(f"  {t.upper()}: {v:+.2f}%  " + "  ".join(f"{j} {x:+.2f}%" for j, x in d.per_metric[t].items()) + flag)
        return 0
    if args.command == "register":
        from medmtl.tracking.registry import register_run_model
        from medmtl.tracking.store import resolve_tracking_uri

        cfg = load_config(args.config)
        uri, _ = resolve_tracking_uri(cfg.tracking.tracking_uri)
        v = register_run_model(tracking_uri=uri, run_id=args.run_id, name=args.name or cfg.tracking.registered_model)
        print(f"registered {v.name} version {v.version} (alias challenger)\n{v.links.text()}")
        return 0
    if args.command == "predict":
        import time

        import mlflow
        import pandas as pd

        from medmtl.tracking.store import resolve_tracking_uri

        t0 = time.perf_counter()
        src, out = Path(args.input), Path(args.out).resolve()
        if not src.exists():
            raise FileNotFoundError(f"input {src} not found (a NIfTI file or a DICOM series folder)")
        if not src.is_dir() and args.modality is None:
            raise ValueError(f"input {src} is a NIfTI file: give --modality CT or MR")
        row = {"image": str(src.resolve()), "modality": args.modality.upper() if args.modality else None, "output": str(out)}
        if src.is_dir():
            row["seg_output"] = str(out.with_name(out.name.removesuffix(".gz").removesuffix(".nii") + ".seg.dcm"))
        mlflow.set_tracking_uri(resolve_tracking_uri(None)[0])
        model = mlflow.pyfunc.load_model(args.model_uri)
        res = model.predict(pd.DataFrame([row])).drop(columns=["labels"], errors="ignore")
        print(res.to_string(index=False))
        written = [p for p in (res.loc[0, "output"], res.loc[0, "seg_output"]) if p and not str(p).startswith("not written")]
        print(f"wrote {', '.join(written)} in {time.perf_counter() - t0:.1f} s")
        if str(res.loc[0, "seg_output"]).startswith("not written"):
            print(f"DICOM SEG {res.loc[0, 'seg_output']}", file=sys.stderr)
        return 0
    if args.command == "promote":
        from medmtl.tracking.registry import promote
        from medmtl.tracking.store import resolve_tracking_uri

        cfg = load_config(args.config)
        uri, _ = resolve_tracking_uri(cfg.tracking.tracking_uri)
        decision = promote(tracking_uri=uri, name=args.name, version=args.version, gate=cfg.tracking.gate,
                           allow_validation_scores=args.allow_validation_scores)
        print(decision.summary())
        return 0 if decision.passed else 1
    if args.command == "sync":
        from medmtl.tracking.spool import main as sync_main

        return sync_main([args.spool_dir] + (["--tracking-uri", args.tracking_uri] if args.tracking_uri else []))
    if args.command == "demo":
        from pipelines.demo import run_demo

        cfg = load_config(args.config, args.overrides)
        run_demo(cfg, workdir=args.workdir, n_ct=args.ct, n_mr=args.mr, seed=args.seed, fresh=args.fresh)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medmtl`` console command."""
    from medmtl.config import ConfigError
    from medmtl.ingest.run import IngestError

    args = build_parser().parse_args(argv)
    # per-file download bars of MLflow drown the command's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return _run(args)
    except (ConfigError, IngestError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError, LookupError, ConnectionError) as err:
        print(f"medmtl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
