"""What makes a run readable in the MLflow UI: its name, params, standard tags, dataset inputs, ingest
table and Markdown description.

Nothing here reads patient data: counts come from the split (pseudonymous case ids are counted, not
shown), the ingest table from the PHI-free ``ingest_report.json`` (reasons and counts only; no paths,
keys or details), dataset sources are the data folder.
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import medmtl
from medmtl.config import ExperimentConfig, config_to_dict, flatten_config

__all__ = ["run_name", "reviewer_params", "standard_tags", "dataset_inputs", "ingest_table", "data_counts",
           "describe_run", "CONTEXTS", "dice_text", "dice_line"]

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # split -> MLflow dataset context


def _sharing(cfg: ExperimentConfig) -> str:
    return "+".join(m.kind for m in cfg.sharing) or "single_task"


def run_name(cfg: ExperimentConfig) -> str:
    """``<config>-<sharing>-<weighting>-<MLflow's random name>``: tells runs apart at a glance, unique as MLflow's names are."""
    import os
    import random

    # MLflow's generator draws from the global `random` state, which training seeds: drawn as it is, two runs of
    # one config would get the same name, and the draw would shift the seeded stream. Draw from fresh entropy
    # and give the global state back untouched.
    state = random.getstate()
    try:
        random.seed(os.urandom(16))
        from mlflow.utils.name_utils import _generate_random_name

        suffix = _generate_random_name()
    except ImportError:  # MLflow moved its name generator: a time stamp and random digits are unique enough
        import time

        suffix = time.strftime("%Y%m%d-%H%M%S") + f"-{random.randrange(1000):03d}"
    finally:
        random.setstate(state)
    return f"{cfg.name}-{_sharing(cfg)}-{cfg.weighting.method}-{suffix}"


def reviewer_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as params, without what a reviewer would not change to alter the result:
    tracking plumbing (``tracking.*``) and every section switched off (``enabled: false``)."""
    off: list[str] = []

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            if node.get("enabled") is False:
                off.append(prefix + ".")
                return
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", config_to_dict(cfg))
    return {k: v for k, v in flatten_config(cfg).items() if not k.startswith("tracking.") and not any(k.startswith(p) for p in off)}


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def standard_tags() -> dict[str, str]:
    """MLflow's own tags for who ran what: ``mlflow.user``, ``mlflow.source.name`` / ``.type`` and the
    ``mlflow.source.git.*`` tags of the medmtl checkout (commit, branch, remote), as MLflow's UI shows them."""
    root = Path(medmtl.__file__).resolve().parents[1]
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    source = "medmtl " + " ".join(sys.argv[1:2]) if argv0 in ("cli.py", "medmtl", "__main__.py") else argv0
    tags = {"mlflow.source.name": source.strip(), "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    for key, args in (("mlflow.source.git.commit", ("rev-parse", "HEAD")), ("mlflow.source.git.branch", ("rev-parse", "--abbrev-ref", "HEAD")),
                      ("mlflow.source.git.repoURL", ("config", "--get", "remote.origin.url"))):
        value = _git(root, *args)
        if value:
            tags[key] = value
    return tags


def data_counts(split) -> dict[str, dict[str, dict[str, int]]]:
    """``{split: {modality: {"cases": n, "images": n}}}`` for train / val / test."""
    out = {}
    for name in CONTEXTS:
        part = getattr(split, name)
        out[name] = {m: {"cases": len({e.case_id for e in es}), "images": len(es)} for m, es in sorted(part.items())}
    return out


def dataset_inputs(data_dir: Path, split, manifest_sha: str) -> list[dict]:
    """One MLflow dataset per split that has cases: digest = manifest hash, source = the data folder,
    context training / validation / test, profile = its counts per modality."""
    counts = data_counts(split)
    source = json.dumps({"uri": str(Path(data_dir).resolve())})
    out = []
    for name, context in CONTEXTS.items():
        if not any(c["images"] for c in counts[name].values()):
            continue
        out.append({"name": f"{Path(data_dir).name}-{context}", "digest": manifest_sha, "source_type": "local", "source": source,
                    "profile": json.dumps({"split": context, **counts[name]}), "context": context})
    return out


def ingest_table(data_dir: Path) -> tuple[dict, str] | None:
    """``(MLflow table, one-line summary)`` from ``DATA_DIR/ingest_report.json``: accepted and rejected
    series per modality and reason, skipped files per reason. ``None`` when the report is missing."""
    path = Path(data_dir) / "ingest_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    rows: Counter = Counter()
    for s in report.get("series", []):
        reasons = s.get("reasons") or ([] if s.get("status") == "accepted" else ["unspecified"])
        for reason in reasons or ["-"]:
            rows[("series " + s.get("status", "?"), s.get("modality") or "-", reason)] += 1
    for f in report.get("skipped", []):
        rows[("file skipped", "-", f.get("reason", "unspecified"))] += 1
    data = [[kind, mod, reason, n] for (kind, mod, reason), n in sorted(rows.items())]
    table = {"columns": ["outcome", "modality", "reason", "count"], "data": data}
    n_acc = sum(s.get("status") == "accepted" for s in report.get("series", []))
    rejected = Counter(r for s in report.get("series", []) if s.get("status") == "rejected" for r in (s.get("reasons") or ["unspecified"]))
    skipped = Counter(f.get("reason", "unspecified") for f in report.get("skipped", []))
    why = lambda c: " (" + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) + ")" if c else ""  # noqa: E731
    summary = (f"{n_acc} series accepted, {sum(rejected.values())} rejected{why(rejected)}, "
               f"{sum(skipped.values())} files skipped{why(skipped)}")
    return table, summary


def dice_line(per_class: dict[str, float]) -> str:
    """``liver 0.912 · spleen 0.871 · ... · **mean 0.880**`` (classes in label order, the mean last and bold)."""
    parts = [f"{c.replace('_', ' ')} {dice_text(v)}" for c, v in per_class.items() if c != "mean"]
    if "mean" in per_class:
        parts.append(f"**mean {dice_text(per_class['mean'])}**")
    return " · ".join(parts)


def dice_text(value: float) -> str:
    """Dice as text: three decimals (metrics keep full precision)."""
    return "n/a" if value != value else f"{value:.3f}"


def describe_run(cfg: ExperimentConfig, *, split, ingest_summary: str | None, scores: dict | None = None,
                 scores_set: str | None = None, best_step: int | None = None, links: list[tuple[str, str]] | None = None) -> str:
    """The run's Markdown description (``mlflow.note.content``).

    Args:
        scores: mean Dice ``{modality: {class: value, "mean": value}}`` of the final model, or ``None`` (still training).
        scores_set: what ``scores`` were measured on, e.g. ``"test set (4 cases)"``.
        best_step: the step of ``best.pt``.
        links: ``(label, relative artifact URL)`` pairs, e.g. overlays.
    """
    counts = data_counts(split)
    sharing = ", ".join(f"{m.kind} at {', '.join(m.depth_keys(cfg.model.depth_names)['depths'])}" for m in cfg.sharing) or "none (single-task columns)"
    w = cfg.weighting
    lines = [f"**{cfg.name}**: joint CT + MR segmentation, {cfg.train.steps} steps.", "",
             f"* **Sharing:** {sharing}", f"* **Weighting:** {w.method}" + (f" on `{w.depth}`" if getattr(w, "depth", None) and w.method == "gradnorm" else ""),
             ""]
    if scores:
        lines += [f"### Dice on the {scores_set}" + (f", best.pt (step {best_step})" if best_step else ""), ""]
        lines += [f"* **{m.upper()}**: " + dice_line(per_class) for m, per_class in scores.items()]
        lines.append("")
    lines += ["### Data", ""]
    for m in sorted({m for part in counts.values() for m in part}):
        cells = [f"{counts[s].get(m, {}).get('cases', 0)} {CONTEXTS[s]}" for s in CONTEXTS]
        lines.append(f"* **{m.upper()}** cases: " + ", ".join(cells))
    if not any(c["images"] for c in counts["test"].values()):
        lines += ["", "_No test set (`data.test_fraction: 0`): final scores are validation Dice, which also chose best.pt._"]
    if ingest_summary:
        lines += ["", f"**Ingest:** {ingest_summary} (table: `ingest/report.json`)."]
    if links:
        lines += ["", "### Overlays", ""] + [f"* [{label}]({url})" for label, url in links]
    return "\n".join(lines) + "\n"
