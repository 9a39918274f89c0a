"""The ``medmtl`` command line: thin argument parsing on top of the pipelines.

One function per subcommand (``set_defaults(func=...)``). Every user error is a
:class:`~medmtl.errors.MedmtlError`: the command prints its message on one line, ``medmtl <cmd>: error: ...``
on stderr, and exits with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medmtl.errors import MedmtlError

__all__ = ["main", "run", "parse_args", "build_parser"]

DEFAULT_CONFIG = "configs/demo.yaml"


def _config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", default=None if required else DEFAULT_CONFIG,
                   help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides anywhere on the line, e.g. train.steps=50")


def cmd_synth(args: argparse.Namespace) -> int:
    """``medmtl synth``: synthetic scanner exports and label masks."""
    from medmtl.synth import synthesize_exports

    res = synthesize_exports(args.out_dir, n_ct=args.ct, n_mr=args.mr, seed=args.seed, progress=True,
                             relatedness=args.relatedness, mr_labelled=args.mr_labelled)
    n_img = sum(not s.is_localizer for s in res.series)
    print(f"wrote {n_img} image series ({args.ct} CT, {args.mr} MR patients) to {res.export_dir}, labels in {res.labels_dir}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """``medmtl ingest``: scanner export or nnU-Net raw dataset -> pseudonymized NIfTI dataset."""
    from medmtl.config import load_config
    from medmtl.ingest.run import ingest

    names = load_config(args.config).data.labels if args.config else None
    report = ingest(args.export_dir, args.out, labels_dir=args.labels, workers=args.workers, progress=True,
                    source=args.source, label_names=names)
    print(report.summary())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``medmtl plan``: (re)write ``DATA_DIR/plan.json``."""
    from medmtl.config import load_config
    from medmtl.data.plan import ensure_plan

    cfg = load_config(args.config) if args.config else None
    print(f"wrote {ensure_plan(Path(args.data_dir), cfg, recompute=True)}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """``medmtl config show``: the resolved configuration as YAML."""
    from medmtl.config import config_to_yaml, load_config

    sys.stdout.write(config_to_yaml(load_config(args.config, args.overrides)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``medmtl train``: train and track one experiment."""
    from medmtl.config import load_config
    from pipelines.train import run_training

    res = run_training(load_config(args.config, args.overrides), out_dir=args.out, resume=args.resume)
    if not res.run_id:  # ranks other than 0 under torchrun
        return 0
    print(res.summary())
    if res.unsent_spool:
        print(f"the tracking server did not take the end of run {res.run_id} (model, final status); it waits in "
              f"{res.unsent_spool}: run `medmtl sync {res.unsent_spool}` once the server is back", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``medmtl evaluate``: Dice and HD95 of a run's model on its held-out cases."""
    from pipelines.evaluate import run_evaluation

    res = run_evaluation(args.run_id, data_root=args.data_root, overlays=args.overlays)
    for m in res.dice:
        print(f"  {m.upper()} Dice: " + "  ".join(f"{k} {v:.3f}" for k, v in res.dice[m].items()))
        print(f"  {m.upper()} HD95: " + "  ".join(f"{k} {v:.1f}" for k, v in res.hd95[m].items()) + " (mm)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``medmtl compare``: delta_m against single-task baselines."""
    from pipelines.compare import run_compare

    d = run_compare(args.run_ids, args.baseline)
    print(f"delta_m = {d.value:+.2f}% (mean over tasks of the relative change; positive = better than single-task)")
    for t, v in d.per_task.items():
        flag = "  <- negative transfer" if v < 0 else ""
        print(f"  {t.upper()}: {v:+.2f}%  " + "  ".join(f"{j} {x:+.2f}%" for j, x in d.per_metric[t].items()) + flag)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """``medmtl register``: a run's model as a new registered version (alias challenger)."""
    from medmtl.config import load_config
    from medmtl.tracking.registry import register_run_model
    from medmtl.tracking.store import resolve_tracking_uri

    cfg = load_config(args.config)
    uri, _ = resolve_tracking_uri(cfg.tracking.tracking_uri)
    v = register_run_model(tracking_uri=uri, run_id=args.run_id, name=args.name or cfg.tracking.registered_model)
    print(f"registered {v.name} version {v.version} (alias challenger)\n{v.links.text()}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """``medmtl promote``: alias champion to a version that passes the config's gates (exit 1 if it does not)."""
    from medmtl.config import load_config
    from medmtl.tracking.registry import promote
    from medmtl.tracking.store import resolve_tracking_uri

    cfg = load_config(args.config)
    uri, _ = resolve_tracking_uri(cfg.tracking.tracking_uri)
    decision = promote(tracking_uri=uri, name=args.name, version=args.version, gate=cfg.tracking.gate,
                       allow_validation_scores=args.allow_validation_scores)
    print(decision.summary())
    return 0 if decision.passed else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """``medmtl predict``: one line per volume as it is written; exit 2 when any volume failed."""
    import json

    from pipelines.predict import run_predict

    def echo(item) -> None:
        if item.error:
            print(f"medmtl predict: error: {item.error}", file=sys.stderr)
            return
        counts = "  ".join(f"{k[len('voxels_'):]} {v}" for k, v in item.row.items() if k.startswith("voxels_") and v)
        print(f"{item.source} -> {item.output} ({item.row['modality']}, {item.seconds['total']:.1f} s){'  ' + counts if counts else ''}")
        if item.row.get("notes"):
            print(f"  note: {item.row['notes']}", file=sys.stderr)
        if item.seg_output and item.seg_output.startswith("not written"):
            print(f"  DICOM SEG {item.seg_output}", file=sys.stderr)
        elif item.seg_output:
            print(f"  DICOM SEG {item.seg_output}")
        if args.timings:
            print(json.dumps({"timings": "volume", "source": item.source, **{k: round(v, 3) for k, v in item.seconds.items()}}))

    res = run_predict(args.model_uri, args.inputs, out=args.out, modality=args.modality, echo=echo)
    ok = sum(item.error is None for item in res.items)
    print(f"wrote {ok} of {len(res.items)} segmentations in {res.seconds['total']:.1f} s "
          f"(start-up {res.seconds['imports'] + res.seconds['model_load']:.1f} s)")
    if args.timings:
        print(json.dumps({"timings": "startup", **{k: round(v, 3) for k, v in res.seconds.items()}}))
    return 0 if ok == len(res.items) else 2


def cmd_adapt(args: argparse.Namespace) -> int:
    """``medmtl adapt``: LoRA adapters of one modality on a frozen trained model (pipelines/adapt.py)."""
    from pipelines.adapt import run_adaptation

    lora = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
            "depths": "all" if args.depths == "all" else [d.strip() for d in args.depths.split(",") if d.strip()]}
    res = run_adaptation(args.source, target=args.target, source_modality=args.source_modality, data_root=args.data_root,
                         lora=lora, overrides=args.overrides, out_dir=args.out, register=not args.no_register)
    share = res.trainable
    print(f"run id: {res.run_id}")
    print(f"trained {int(share['params/trainable'])} of {int(share['params/total'])} parameters "
          f"({100 * share['params/trainable_fraction']:.2f}%; {100 * share['params/trainable_fraction_of_two_columns']:.2f}% of two columns)")
    dice, what = (res.test_dice, "test Dice") if res.test_dice else (res.val_dice, "validation Dice (no test set)")
    print(f"{what} of best.pt:")
    for m, d in dice.items():
        print(f"  {m.upper()}: " + "  ".join(f"{k} {v:.3f}" for k, v in d.items()))
    if res.registered:
        print(f"registered {res.registered} (alias challenger), deltas merged into the {args.target.upper()} kernels")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """``medmtl sync``: send what a run left in its local spool once the server is back."""
    from medmtl.tracking.spool import main as sync_main

    return sync_main([args.spool_dir] + (["--tracking-uri", args.tracking_uri] if args.tracking_uri else []))


def cmd_demo(args: argparse.Namespace) -> int:
    """``medmtl demo``: synth -> ingest -> train -> evaluate -> registered model."""
    from medmtl.config import load_config
    from pipelines.demo import run_demo

    run_demo(load_config(args.config, args.overrides), workdir=args.workdir, n_ct=args.ct, n_mr=args.mr, seed=args.seed,
             fresh=args.fresh)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """``medmtl study``: train the study's cells (resumable, several workers) and write its report."""
    from pipelines.study import run_study

    run_study(args.study_file, workers=args.workers, storage=args.storage, report=not args.worker, profile=args.profile)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``medmtl sweep``: Optuna search; prints (and with --out writes) the best trial's config."""
    from medmtl.atomic import atomic_write_bytes
    from pipelines.sweep import run_sweep

    best = run_sweep(args.sweep_file, trials=args.trials, storage=args.storage)
    if args.out:
        atomic_write_bytes(args.out, best.encode())
    sys.stdout.write(best)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand; each sets ``func`` to its ``cmd_*`` function."""
    ap = argparse.ArgumentParser(prog="medmtl", description="Joint CT and MRI segmentation: from scanner exports to a registered model.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic scanner exports (DICOM with fake patient data) and label masks")
    p.add_argument("out_dir")
    p.add_argument("--ct", type=int, default=10, help="number of CT patients")
    p.add_argument("--mr", type=int, default=10, help="number of MR patients (a different set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relatedness", type=float, default=1.0, help="0..1: MR anatomy drawn from the CT cohort's distribution (1) or a conflicting one (0: mirrored layout, other sizes, positions, shapes)")
    p.add_argument("--mr-labelled", type=int, default=None, metavar="K", help="write label masks for only K of the MR patients (scarce MR labels)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="scanner export -> pseudonymized NIfTI dataset + manifest + report")
    p.add_argument("export_dir")
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument("--labels", default=None, help="folder of <SeriesInstanceUID>.nii.gz masks (or a CSV series_uid,label_path)")
    p.add_argument("--workers", type=int, default=None, help="header-reading threads")
    p.add_argument("--source", choices=["auto", "dicom", "nnunet"], default="auto", help="auto: an nnU-Net raw dataset when dataset.json and imagesTr/ exist, else DICOM")
    p.add_argument("--config", default=None, help="experiment YAML whose data.labels name the classes (maps DICOM SEG segments and nnU-Net labels by name)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("plan", help="fingerprint DATA_DIR and write DATA_DIR/plan.json")
    p.add_argument("data_dir")
    p.add_argument("--config", default=None, help="experiment YAML whose model and memory budget size the planned patch and batch")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the resolved configuration (defaults filled in, overrides applied)")
    _config_args(cs)
    cs.set_defaults(func=cmd_config_show)

    p = sub.add_parser("train", help="train an experiment and track it in MLflow")
    _config_args(p)
    p.add_argument("--out", default="runs", help="folder for checkpoints (one subfolder per MLflow run)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue from a last.pt (same MLflow run, same data order)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice and HD95 per class on the run's held-out cases, logged to the run with overlays")
    p.add_argument("run_id")
    p.add_argument("--data-root", default=None, help="DATA_DIR if it moved since training")
    p.add_argument("--overlays", type=int, default=2, help="overlay pictures per modality")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="delta_m of multi-task runs against single-task baselines")
    p.add_argument("run_ids", nargs="+")
    p.add_argument("--baseline", nargs="+", required=True, metavar="STL_RUN_ID")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("register", help="register a run's model as a new version (alias challenger)")
    p.add_argument("run_id")
    p.add_argument("--name", default=None, help="registered model name (default: tracking.registered_model of the config)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move alias champion to a version if it passes the gates of the config (tracking.gate)")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version number")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config whose tracking.gate and tracking URI apply")
    p.add_argument("--allow-validation-scores", action="store_true", help="accept a version scored on validation cases only (no test split)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="segment NIfTI images and DICOM series with a logged or registered model (start-up paid once)")
    p.add_argument("model_uri", help="e.g. models:/medmtl-demo@champion or runs:/<run_id>/model")
    p.add_argument("inputs", nargs="+", metavar="input", help="NIfTI files, DICOM series folders, or folders holding several of either")
    p.add_argument("--modality", default=None, choices=["CT", "MR", "ct", "mr"], help="required for NIfTI; DICOM headers say it")
    p.add_argument("--out", required=True, help="output folder (names: keyed pseudonyms of the inputs, <key>.nii.gz and, for DICOM, "
                   "<key>.seg.dcm); with one input, a path ending in .nii.gz is the output file itself")
    p.add_argument("--timings", action="store_true", help="print the time of each phase as JSON lines (start-up and per volume)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("adapt", help="train only one modality's LoRA adapters on a trained model (e.g. MR from a CT model); log and register it merged")
    p.add_argument("source", help="run id, checkpoint (runs/<run_id>/last.pt) or model URI (models:/medmtl-demo@champion, runs:/<id>/model)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the adaptation config, e.g. train.steps=100")
    p.add_argument("--target", default="mr", choices=["ct", "mr"], help="modality whose adapters train")
    p.add_argument("--from", dest="source_modality", default="ct", choices=["ct", "mr"], help="modality whose column and head are the frozen base")
    p.add_argument("--data-root", default=None, help="DATA_DIR whose target-modality cases train the adapters (default: the source's dataset; "
                   "it needs labelled cases of both modalities, as any split)")
    p.add_argument("--depths", default="all", help="comma-separated depths that get deltas, or 'all'")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA scale numerator (delta = alpha/r B A)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the deltas' input")
    p.add_argument("--out", default="runs", help="folder for checkpoints (one subfolder per MLflow run)")
    p.add_argument("--no-register", action="store_true", help="log the merged model in the run but do not register a version")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("sync", help="send a run's metrics and its end (model, status) left in its local spool after a tracking-server outage")
    p.add_argument("spool_dir", help="runs/<run_id>/mlflow_spool")
    p.add_argument("--tracking-uri", default=None, help="default: the URI the run used")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("demo", help="synth -> ingest -> train -> evaluate -> MLflow -> registered model, on a small CPU-sized dataset")
    _config_args(p, required=False)
    p.add_argument("--workdir", default="demo_data")
    p.add_argument("--ct", type=int, default=10)
    p.add_argument("--mr", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("study", help="a matrix of runs (sharing x weighting x seeds x label budgets x data sets) as MLflow child runs, and its delta_m report")
    p.add_argument("study_file", help="study YAML (see studies/)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes on this machine (one GPU each when there are GPUs)")
    p.add_argument("--storage", default=None, help="Optuna storage URL shared by every worker and machine (default: the study file's, else SQLite in the study folder)")
    p.add_argument("--worker", action="store_true", help="only train cells, no report (for extra workers or machines)")
    p.add_argument("--profile", choices=["cpu", "cuda"], default=None, help="which of the study's device profiles to use (default: cuda when a GPU is present, else cpu)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("sweep", help="Optuna TPE search with median pruning over sharing and weighting hyper-parameters; prints the best trial's config")
    p.add_argument("sweep_file", help="sweep YAML (see studies/)")
    p.add_argument("--trials", type=int, default=None, help="trials this invocation runs (default: the file's)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the file's, else SQLite in the sweep folder)")
    p.add_argument("--out", default=None, help="also write the best trial's config to this YAML file")
    p.set_defaults(func=cmd_sweep)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides are accepted anywhere on the line (also after options)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; a :class:`MedmtlError` becomes one line on stderr and exit 2, anything else propagates."""
    try:
        return args.func(args)
    except MedmtlError as err:
        name = args.command + (f" {args.config_command}" if getattr(args, "config_command", None) else "")
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"medmtl {name}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medmtl`` console command."""
    args = parse_args(argv)
    # per-file download bars of MLflow drown the command's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
