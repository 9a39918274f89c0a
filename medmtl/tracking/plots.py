"""Pictures a run carries as artifacts: training curves, validation curves, Dice bars and overlays.

* :func:`log_history_plots`: one PNG per metric family (``loss``, ``weight``, ``gradnorm``, ``penalty``,
  ``cross_stitch`` / ``sluice`` coefficients, ``optimizer``) under ``plots/``. Quantities of different
  scale get their own axis (GradNorm's ``G``, ``r`` and ``L_grad``; the learning rate and the gradient
  norm), positive curves spanning two decades or more a log axis.
* :func:`log_validation_curves`: validation loss and Dice per organ per modality against the step,
  the step of ``best.pt`` marked.
* :func:`log_dice_bars`: Dice per organ, one panel per modality, one bar per split (validation, test).
* :func:`log_overlays`: for held-out cases, the slice with the most reference foreground, in the plan's
  CT window, with the reference contours (solid) and the predicted contours (dashed), one colour per
  class, the case's Dice per class in the title, under ``overlays/``. File names use the pseudonymous
  case id and carry no patient data; the picture holds pixels only (no header text).

Matplotlib runs with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from medmtl.modality import dicom_modality

__all__ = ["history_figures", "log_history_plots", "validation_figure", "log_validation_curves", "dice_bar_figure",
           "log_dice_bars", "overlay_figure", "log_overlays"]

# metric families drawn together: first component of the key -> file name
_FAMILY_FILES = {"loss": "losses", "weight": "task_weights", "gradnorm": "gradnorm", "penalty": "penalties"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _family(key: str) -> str:
    head = key.split("/", 1)[0]
    return _FAMILY_FILES.get(head, head if "/" in key else "other")


def _panel(key: str, family: str) -> str:
    """Curves of one panel share a scale: ``gradnorm/G/ct`` and ``gradnorm/G/mr`` together, ``gradnorm/L_grad``
    and ``optimizer/lr`` alone; in other families (losses, weights, coefficients) the whole family."""
    parts = key.split("/")
    if family in ("gradnorm", "optimizer"):
        return "/".join(parts[:2]) if len(parts) >= 2 else key
    return family


def _scale(ax, values: list[float]) -> None:
    pos = [v for v in values if np.isfinite(v)]
    if pos and min(pos) > 0 and max(pos) / min(pos) >= 100:
        ax.set_yscale("log")


def history_figures(history: list[dict[str, float]]) -> dict[str, object]:
    """``{file stem: matplotlib Figure}``, one per metric family in ``history`` (one dict per step).

    The step is the ``step`` entry of each dict when present, else its position (1-based). A family
    whose quantities differ in scale gets one stacked axis per quantity, sharing the step axis.
    """
    plt = _plt()
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for i, row in enumerate(history):
        step = row.get("step", i + 1)
        for k, v in row.items():
            if k == "step" or v is None:
                continue
            xs, ys = series[_family(k)].setdefault(k, ([], []))
            xs.append(step)
            ys.append(float(v))
    figs = {}
    for fam, curves in sorted(series.items()):
        panels: dict[str, list[str]] = defaultdict(list)
        for k in sorted(curves):
            panels[_panel(k, fam)].append(k)
        n = len(panels)
        fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n + 0.6), dpi=100, sharex=True, squeeze=False)
        for ax, (panel, keys) in zip(axes[:, 0], panels.items()):
            for k in keys:
                xs, ys = curves[k]
                ax.plot(xs, ys, label=k, linewidth=1.3)
            _scale(ax, [y for k in keys for y in curves[k][1]])
            ax.grid(alpha=0.3)
            if n > 1:
                ax.set_title(panel, fontsize=10)
            if len(keys) <= 16:
                ax.legend(fontsize=8, loc="best")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(fam.replace("_", " "), fontsize=12)
        fig.tight_layout()
        figs[fam] = fig
    return figs


def log_history_plots(logger, history: list[dict[str, float]], artifact_dir: str = "plots") -> list[str]:
    """Log :func:`history_figures` as PNG artifacts; returns the artifact paths."""
    return _save_all(logger, history_figures(history), artifact_dir)


def _save_all(logger, figs: dict[str, object], artifact_dir: str) -> list[str]:
    plt = _plt()
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in figs.items():
            p = Path(tmp) / f"{name}.png"
            fig.savefig(p)
            plt.close(fig)
            logger.log_artifact(p, artifact_dir)
            paths.append(f"{artifact_dir}/{p.name}")
    return paths


def validation_figure(val_history: list[dict[str, float]], best_step: int | None = None):
    """Validation curves: loss per modality (top), then Dice per class, one panel per modality; a dashed
    line at ``best_step`` (``best.pt``). ``val_history`` rows hold ``step`` and ``val/...`` metrics."""
    plt = _plt()
    steps = [r["step"] for r in val_history]
    keys = sorted({k for r in val_history for k in r if k != "step"})
    modalities = sorted({k.split("/")[2] for k in keys if k.startswith("val/dice/")})
    loss_keys = [k for k in keys if k.startswith("val/loss/")]
    n = len(modalities) + (1 if loss_keys else 0)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.8 * n + 0.6), dpi=100, sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    panels = ([("validation loss (Dice + CE)", loss_keys)] if loss_keys else []) + [
        (f"{dicom_modality(m)} validation Dice", [k for k in keys if k.startswith(f"val/dice/{m}/")]) for m in modalities]
    for ax, (title, ks) in zip(axes, panels):
        for k in ks:
            ys = [r.get(k, np.nan) for r in val_history]
            label = k.rsplit("/", 1)[-1] if "dice" in k else k.split("/")[-1].upper()
            ax.plot(steps, ys, marker="o", markersize=4, linewidth=1.6 if label == "mean" else 1.1,
                    color="black" if label == "mean" else None, label=label)
        if all(k.startswith("val/dice/") for k in ks):
            ax.set_ylim(0, 1)
        if best_step:
            ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1, label=f"best.pt (step {best_step})")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


def log_validation_curves(logger, val_history: list[dict[str, float]], *, best_step: int | None = None,
                          artifact_dir: str = "plots") -> list[str]:
    """Log :func:`validation_figure` as ``plots/validation.png`` (nothing without validations)."""
    if not val_history:
        return []
    return _save_all(logger, {"validation": validation_figure(val_history, best_step)}, artifact_dir)


def dice_bar_figure(scores: dict[str, dict[str, dict[str, float]]]):
    """Dice per class, one panel per modality, one bar per split: ``scores`` is ``{split: {modality: {class: dice}}}``
    (``mean`` included); each bar is labelled with its value (two decimals)."""
    plt = _plt()
    modalities = sorted({m for per_mod in scores.values() for m in per_mod})
    fig, axes = plt.subplots(1, len(modalities), figsize=(5.5 * len(modalities), 4.2), dpi=100, squeeze=False, sharey=True)
    width = 0.8 / max(len(scores), 1)
    for ax, m in zip(axes[0], modalities):
        classes = list(next(per_mod[m] for per_mod in scores.values() if m in per_mod))
        x = np.arange(len(classes))
        for j, (split, per_mod) in enumerate(scores.items()):
            vals = [per_mod.get(m, {}).get(c, np.nan) for c in classes]
            bars = ax.bar(x + (j - (len(scores) - 1) / 2) * width, vals, width, label=split)
            ax.bar_label(bars, labels=[f"{v:.2f}" if np.isfinite(v) else "" for v in vals], fontsize=8, padding=2)
        ax.set_xticks(x, [c.replace("_", " ") for c in classes], rotation=20, fontsize=9)
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{dicom_modality(m)} Dice per organ", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("Dice")
    # one legend above the panels, clear of the bars
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def log_dice_bars(logger, scores: dict[str, dict[str, dict[str, float]]], artifact_dir: str = "plots") -> list[str]:
    """Log :func:`dice_bar_figure` as ``plots/dice_per_organ.png``."""
    if not any(scores.values()):
        return []
    return _save_all(logger, {"dice_per_organ": dice_bar_figure(scores)}, artifact_dir)


def overlay_figure(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, class_names: list[str], title: str = "",
                   *, window: tuple[float, float] | None = None, slice_index: int | None = None):
    """One axial slice (third axis) of ``image`` ``(X, Y, Z)`` with class contours.

    ``reference`` and ``prediction`` hold class indices ``0..n`` on the image grid; the reference is
    drawn solid, the prediction dashed, one colour per class. ``window`` is the grey-level range (the
    plan's CT window); default the slice's 1st to 99th percentile. ``slice_index`` defaults to the slice
    with the most reference foreground (the middle one without a reference).
    """
    plt = _plt()
    if slice_index is None:
        fg = (reference > 0).sum(axis=(0, 1)) if reference is not None else None
        slice_index = int(np.argmax(fg)) if fg is not None and fg.any() else image.shape[2] // 2
    k = slice_index
    img = image[:, :, k].T.astype(np.float32)  # rows down, columns across, as a viewer shows a slice
    lo, hi = window if window is not None else (np.percentile(img, [1, 99]) if img.size else (0.0, 1.0))
    aspect = img.shape[0] / max(img.shape[1], 1)
    fig, ax = plt.subplots(figsize=(9, 7 * aspect + 0.9), dpi=100)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
    colours = plt.get_cmap("tab10")
    handles = []
    for c, name in enumerate(class_names, start=1):
        colour = colours((c - 1) % 10)
        for arr, style in ((reference, "solid"), (prediction, "dashed")):
            if arr is None:
                continue
            m = (arr[:, :, k].T == c).astype(np.float32)
            if m.any() and not m.all():
                ax.contour(m, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.8)
        handles.append(plt.Line2D([], [], color=colour, linewidth=3, label=name.replace("_", " ")))
    handles += [plt.Line2D([], [], color="black", linestyle="solid", label="reference"),
                plt.Line2D([], [], color="black", linestyle="dashed", label="prediction")]
    ax.legend(handles=handles, fontsize=11, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_axis_off()
    ax.set_title(title + f"\nslice {k + 1}/{image.shape[2]}", fontsize=11)
    fig.tight_layout()
    return fig


def log_overlays(logger, segmenter, entries: dict[str, list], data_dir: str | Path, labels: dict[str, dict[int, str]],
                 *, max_cases: int, artifact_dir: str = "overlays", per_case: list[dict] | None = None,
                 ct_window: tuple[float | None, float | None] | None = None) -> list[str]:
    """Predict up to ``max_cases`` held-out cases per modality and log one overlay PNG each.

    Args:
        logger: a :class:`~medmtl.tracking.logger.RunLogger`.
        segmenter: a :class:`~medmtl.inference.segmenter.Segmenter` on the trained net.
        entries: held-out manifest entries per modality (``split.evaluation``).
        data_dir: the ingested dataset folder.
        labels: ``cfg.data.labels``.
        per_case: evaluation rows (``case_id``, ``series_key``, Dice per class) whose Dice goes into each title.
        ct_window: the plan's CT window ``(low, high)`` in HU for CT images.
    """
    import nibabel as nib
    import torch

    from medmtl.data.transforms import RemapLabels

    plt = _plt()
    data_dir = Path(data_dir)
    rows = {(r["case_id"], r["series_key"]): r for r in per_case or []}
    window = tuple(ct_window) if ct_window and None not in ct_window else None
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, items in entries.items():
            names = list(labels[m].values())
            for e in items[:max_cases]:
                pred = segmenter.predict(data_dir / e.image, m)
                image = np.asarray(nib.load(str(data_dir / e.image)).dataobj)
                ref = None
                if e.label:
                    raw = torch.as_tensor(np.asarray(nib.load(str(data_dir / e.label)).dataobj))
                    ref = RemapLabels(labels[m])(raw).numpy()
                row = rows.get((e.case_id, e.series_key))
                dice = ("Dice " + "  ".join(f"{n.replace('_', ' ')} {row[n]:.2f}" for n in names if n in row)) if row else ""
                fig = overlay_figure(image, ref, pred.class_indices, names, title=f"{dicom_modality(m)} {e.case_id}\n{dice}".strip(),
                                     window=window if m == "ct" else None)
                p = Path(tmp) / f"{m}_{e.case_id}_{e.series_key}.png"
                fig.savefig(p)
                plt.close(fig)
                logger.log_artifact(p, artifact_dir)
                paths.append(f"{artifact_dir}/{p.name}")
    return paths
