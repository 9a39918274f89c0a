"""The deployable model: an MLflow pyfunc that carries weights, resolved config and plan.

It loads the ``state_dict`` with ``weights_only=True`` and runs the whole preprocessing, Gaussian
sliding-window inference and inversion to the input grid, so a volume of any shape can be segmented
(MLflow's default ``pt2`` PyTorch format freezes input shapes and cannot serve sliding windows).

Input: a DataFrame with columns ``image`` (path to a NIfTI file readable by the serving process),
``modality`` (``CT`` or ``MR``) and optionally ``output`` (where to write the label NIfTI).
Output: one row per input with ``output`` (path or empty), ``shape`` and the voxel count per class.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

__all__ = ["SegmentationModel", "log_segmentation_model", "MODEL_ARTIFACT_PATH", "model_signature"]

MODEL_ARTIFACT_PATH = "model"


def model_signature(class_names: list[str]) -> ModelSignature:
    """Explicit input/output schema of the pyfunc model."""
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "modality"), ColSpec("string", "output", required=False)])
    outputs = Schema([ColSpec("string", "output"), ColSpec("string", "shape")] + [ColSpec("long", f"voxels_{n}") for n in class_names])
    return ModelSignature(inputs=inputs, outputs=outputs)


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`~medmtl.evaluation.inference.Segmenter`."""

    def load_context(self, context) -> None:
        """Rebuild the net from the logged config and load the weights (``weights_only=True``)."""
        from medmtl.config import validate_config
        from medmtl.data.plan import load_plan
        from medmtl.evaluation.inference import Segmenter
        from medmtl.models.two_column import TwoColumnNet

        cfg = validate_config(yaml.safe_load(Path(context.artifacts["config"]).read_text()), context.artifacts["config"])
        plan = load_plan(context.artifacts["plan"])
        net = TwoColumnNet(cfg=cfg)
        net.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        net.eval()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.segmenter = Segmenter(net.to(device), cfg, plan, device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Segment every row's image; write the label map when ``output`` is given."""
        rows = []
        for rec in model_input.to_dict(orient="records"):
            modality = str(rec["modality"]).lower()
            if modality not in ("ct", "mr"):
                raise ValueError(f"row for {rec['image']}: modality must be CT or MR, got {rec['modality']!r}")
            pred = self.segmenter.predict(Path(rec["image"]), modality)
            out = rec.get("output") or ""
            if out:
                _write_nifti(pred.labels.astype(np.uint8), pred.affine, Path(out))
            names = list(self.cfg.data.labels[modality].values())
            counts = np.bincount(pred.class_indices.reshape(-1), minlength=len(names) + 1)
            row = {"output": out, "shape": json.dumps(list(pred.labels.shape))}
            all_names = _all_class_names(self.cfg)
            row.update({f"voxels_{n}": int(counts[1 + names.index(n)]) if n in names else 0 for n in all_names})
            rows.append(row)
        return pd.DataFrame(rows)


def _all_class_names(cfg) -> list[str]:
    seen: list[str] = []
    for m in ("ct", "mr"):
        for n in cfg.data.labels[m].values():
            if n not in seen:
                seen.append(n)
    return seen


def _write_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pred-", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def log_segmentation_model(*, run_id: str, tracking_uri: str, net: torch.nn.Module, cfg_yaml: str, plan: dict, class_names: list[str]) -> str:
    """Log the pyfunc model (weights, config, plan, medmtl source) into ``run_id``; returns its model URI."""
    import medmtl

    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ship the library the model needs, not the synthetic-export generator (its fake-name pools
        # would put patient-like strings into every model) nor byte caches
        pkg_dir = tmp / "code" / "medmtl"
        shutil.copytree(Path(medmtl.__file__).parent, pkg_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "synth.py"))
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp / "weights.pt")
        (tmp / "config.yaml").write_text(cfg_yaml)
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
        reqs = [
            f"torch=={torch.__version__.split('+')[0]}", f"monai=={_version('monai')}", f"nibabel=={_version('nibabel')}",
            f"mlflow=={mlflow.__version__}", f"pydantic=={_version('pydantic')}", f"pyyaml=={_version('yaml')}",
            f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
        ]
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_PATH,
                python_model=SegmentationModel(),
                artifacts={"weights": str(tmp / "weights.pt"), "config": str(tmp / "config.yaml"), "plan": str(tmp / "plan.json")},
                code_paths=[str(pkg_dir)],
                pip_requirements=reqs,
                signature=model_signature(class_names),
            )
    return info.model_uri


def _version(module: str) -> str:
    return __import__(module).__version__
