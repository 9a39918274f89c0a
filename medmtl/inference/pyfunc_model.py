"""The deployable model: an MLflow pyfunc that carries weights, resolved config and plan.

It loads the ``state_dict`` with ``weights_only=True`` and runs the whole preprocessing, Gaussian
sliding-window inference and inversion to the input grid, so a volume of any shape can be segmented
(MLflow's default ``pt2`` PyTorch format freezes input shapes and cannot serve sliding windows).

Input: a DataFrame, one row per volume, with

* ``image``: a NIfTI file or a DICOM series folder readable by the serving process, or
* ``array``: the volume ``(X, Y, Z)`` as nested lists, with ``affine`` (4x4 voxel -> RAS mm, default
  identity): what a client sends to ``mlflow models serve`` as JSON;
* ``modality``: ``CT`` or ``MR`` (optional for DICOM, where the header says it);
* ``output`` (optional): where to write the label NIfTI (aligned to the input grid);
* ``seg_output`` (optional, DICOM inputs): where to write a DICOM SEG.

Output: one row per input with ``modality``, ``shape``, the paths written, the voxel count per class
and, for ``array`` inputs, ``labels``: the label volume (original label values) as nested lists.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from medmtl.modality import MODALITIES, dicom_modality
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array
from medmtl.errors import InputError

__all__ = ["SegmentationModel", "log_segmentation_model", "MODEL_ARTIFACT_PATH", "model_signature"]

MODEL_ARTIFACT_PATH = "model"


def model_signature(class_names: list[str]) -> ModelSignature:
    """Explicit input/output schema of the pyfunc model (every input column is optional; rows are checked in ``predict``)."""
    inputs = Schema([
        ColSpec("string", "image", required=False),
        ColSpec(Array(Array(Array("double"))), "array", required=False),
        ColSpec(Array(Array("double")), "affine", required=False),
        ColSpec("string", "modality", required=False),
        ColSpec("string", "output", required=False),
        ColSpec("string", "seg_output", required=False),
    ])
    outputs = Schema(
        [ColSpec("string", "modality"), ColSpec("string", "shape"), ColSpec("string", "output"), ColSpec("string", "seg_output")]
        + [ColSpec("long", f"voxels_{n}") for n in class_names]
        + [ColSpec(Array(Array(Array("long"))), "labels", required=False)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`~medmtl.inference.segmenter.Segmenter`."""

    def load_context(self, context) -> None:
        """Rebuild the net from the logged config and load the weights (``weights_only=True``)."""
        from medmtl.config import validate_config
        from medmtl.data.plan import load_plan
        from medmtl.inference.segmenter import Segmenter
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
        """Segment every row (NIfTI, DICOM folder or array); write the outputs that the row asks for."""
        from medmtl.inference.model_io import SegNotPossible, read_model_input, write_dicom_seg, write_nifti

        all_names = _all_class_names(self.cfg)
        rows = []
        for i, rec in enumerate(model_input.to_dict(orient="records")):
            rec = {k: (None if _missing(v) else v) for k, v in rec.items()}
            inp = read_model_input(rec, where=f"row {i}")
            try:
                pred = self.segmenter.predict(inp.nifti, inp.modality)
            finally:
                inp.cleanup()
            names = list(self.cfg.data.labels[inp.modality].values())
            out, seg_out = rec.get("output") or "", rec.get("seg_output") or ""
            if out:
                write_nifti(pred.labels.astype(np.uint8), inp.affine, Path(out))
            if seg_out:
                if inp.kind != "dicom":
                    raise InputError(f"row {i}: seg_output needs a DICOM series folder as input")
                try:
                    write_dicom_seg(pred.class_indices, inp.dicom_plan, names, Path(seg_out))
                except SegNotPossible as why:
                    seg_out = f"not written: {why}"
            counts = np.bincount(pred.class_indices.reshape(-1), minlength=len(names) + 1)
            row = {"modality": dicom_modality(inp.modality), "shape": json.dumps(list(pred.labels.shape)), "output": out, "seg_output": seg_out}
            row.update({f"voxels_{n}": int(counts[1 + names.index(n)]) if n in names else 0 for n in all_names})
            row["labels"] = pred.labels.astype(int).tolist() if inp.kind == "array" else None
            rows.append(row)
        return pd.DataFrame(rows)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _all_class_names(cfg) -> list[str]:
    seen: list[str] = []
    for m in MODALITIES:
        for n in cfg.data.labels[m].values():
            if n not in seen:
                seen.append(n)
    return seen


def log_segmentation_model(*, run_id: str, tracking_uri: str, net: torch.nn.Module, cfg_yaml: str, plan: dict, class_names: list[str]) -> str:
    """Log the pyfunc model (weights, config, plan, medmtl source) into ``run_id``; returns its model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        stage_model(Path(tmp), net=net, cfg_yaml=cfg_yaml, plan=plan, class_names=class_names)
        return log_staged_model(Path(tmp), run_id=run_id, tracking_uri=tracking_uri)


def stage_model(folder: Path, *, net: torch.nn.Module, cfg_yaml: str, plan: dict, class_names: list[str]) -> Path:
    """Write everything the model is logged from into ``folder`` (local disk only, no server involved).

    A run's end spools the staged folder (:mod:`medmtl.tracking.spool`), so the model survives a tracking
    outage and :func:`log_staged_model` logs it when the server answers.
    """
    import medmtl

    folder.mkdir(parents=True, exist_ok=True)
    # ship the library the model needs, not the synthetic-export generator (its fake-name pools
    # would put patient-like strings into every model) nor byte caches
    shutil.copytree(Path(medmtl.__file__).parent, folder / "code" / "medmtl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "synth.py"))
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / "weights.pt")
    (folder / "config.yaml").write_text(cfg_yaml)
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))
    (folder / "class_names.json").write_text(json.dumps(class_names))
    return folder


def log_staged_model(folder: Path, *, run_id: str, tracking_uri: str) -> str:
    """Log a :func:`stage_model` folder into ``run_id`` as the pyfunc model; returns its model URI."""
    from medmtl.tracking.store import using_tracking_uri

    reqs = [
        f"torch=={torch.__version__.split('+')[0]}", f"monai=={_version('monai')}", f"nibabel=={_version('nibabel')}",
        f"mlflow=={mlflow.__version__}", f"pydantic=={_version('pydantic')}", f"pyyaml=={_version('yaml')}",
        f"numpy=={np.__version__}", f"pandas=={pd.__version__}", f"pydicom=={_version('pydicom')}",
        f"highdicom=={_version('highdicom')}",
    ]
    class_names = json.loads((folder / "class_names.json").read_text())
    with using_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is explicit; an input example would make MLflow run a whole inference at log time
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),  # models from code: nothing pickled
            artifacts={"weights": str(folder / "weights.pt"), "config": str(folder / "config.yaml"), "plan": str(folder / "plan.json")},
            code_paths=[str(folder / "code" / "medmtl")],
            pip_requirements=reqs,
            signature=model_signature(class_names),
        )
    return info.model_uri


def _version(module: str) -> str:
    return __import__(module).__version__
