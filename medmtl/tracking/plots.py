"""Pictures a run carries as artifacts: training curves from the trainer history, and overlays.

* :func:`log_history_plots`: one PNG per metric family (``loss``, ``weight``, ``gradnorm``, ``penalty``,
  ``cross_stitch`` / ``sluice`` coefficients, optimizer values) under ``plots/``.
* :func:`log_overlays`: for held-out cases, the mid slice of the image with the reference contours
  (solid) and the predicted contours (dashed), one colour per class, under ``overlays/``. File names use
  the pseudonymous case id and carry no patient data; the picture holds pixels only (no header text).

Matplotlib runs with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from medmtl.modality import dicom_modality

__all__ = ["history_figures", "log_history_plots", "overlay_figure", "log_overlays"]

# metric families drawn together: first component of the key -> file name (other families: their own name)
_FAMILY_FILES = {"loss": "losses", "weight": "task_weights", "penalty": "penalties"}
_OPTIMIZER_KEYS = {"grad_norm", "lr", "skipped_steps"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _family(key: str) -> str:
    head = key.split("/", 1)[0]
    if key in _OPTIMIZER_KEYS:
        return "optimizer"
    return _FAMILY_FILES.get(head, head if "/" in key else "other")


def history_figures(history: list[dict[str, float]]) -> dict[str, object]:
    """``{file stem: matplotlib Figure}``, one per metric family in ``history`` (one dict per step).

    The step is the ``step`` entry of each dict when present, else its position (1-based).
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
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for k, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, label=k, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(fam.replace("_", " "))
        ax.grid(alpha=0.3)
        if len(curves) <= 16:
            ax.legend(fontsize=7, loc="best")
        if fam == "losses" and all(y > 0 for _, ys in curves.values() for y in ys):
            ax.set_yscale("log")
        fig.tight_layout()
        figs[fam] = fig
    return figs


def log_history_plots(logger, history: list[dict[str, float]], artifact_dir: str = "plots") -> list[str]:
    """Log :func:`history_figures` as PNG artifacts; returns the artifact paths."""
    plt = _plt()
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in history_figures(history).items():
            p = Path(tmp) / f"{name}.png"
            fig.savefig(p)
            plt.close(fig)
            logger.log_artifact(p, artifact_dir)
            paths.append(f"{artifact_dir}/{p.name}")
    return paths


def overlay_figure(image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, class_names: list[str], title: str = ""):
    """Mid slice (along the third axis) of ``image`` ``(X, Y, Z)`` with class contours.

    ``reference`` and ``prediction`` hold class indices ``0..n`` on the image grid; the reference is
    drawn solid, the prediction dashed, one colour per class.
    """
    plt = _plt()
    k = image.shape[2] // 2
    img = image[:, :, k].T.astype(np.float32)  # rows down, columns across, as a viewer shows a slice
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    fig, ax = plt.subplots(figsize=(5, 5 * img.shape[0] / max(img.shape[1], 1) + 0.4), dpi=100)
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
                ax.contour(m, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.2)
        handles.append(plt.Line2D([], [], color=colour, label=name))
    handles += [plt.Line2D([], [], color="white", linestyle="solid", label="reference"),
                plt.Line2D([], [], color="white", linestyle="dashed", label="prediction")]
    ax.legend(handles=handles, fontsize=6, loc="lower right", facecolor="black", labelcolor="white", framealpha=0.6)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def log_overlays(logger, segmenter, entries: dict[str, list], data_dir: str | Path, labels: dict[str, dict[int, str]],
                 *, max_cases: int, artifact_dir: str = "overlays") -> list[str]:
    """Predict up to ``max_cases`` held-out cases per modality and log one overlay PNG each.

    Args:
        logger: a :class:`~medmtl.tracking.logger.RunLogger`.
        segmenter: a :class:`~medmtl.inference.segmenter.Segmenter` on the trained net.
        entries: held-out manifest entries per modality (``split.val``).
        data_dir: the ingested dataset folder.
        labels: ``cfg.data.labels``.
    """
    import nibabel as nib
    import torch

    from medmtl.data.transforms import RemapLabels

    plt = _plt()
    data_dir = Path(data_dir)
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
                fig = overlay_figure(image, ref, pred.class_indices, names, title=f"{dicom_modality(m)} {e.case_id} mid slice")
                p = Path(tmp) / f"{m}_{e.case_id}_{e.series_key}.png"
                fig.savefig(p)
                plt.close(fig)
                logger.log_artifact(p, artifact_dir)
                paths.append(f"{artifact_dir}/{p.name}")
    return paths
