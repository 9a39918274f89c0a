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

Output: one row per input with ``modality``, ``shape``, the paths written, the voxel count per class,
``nonfinite_voxels`` (NaN/inf input voxels replaced by the modality's background value before
segmenting; see :mod:`medmtl.inference.segmenter`) with a ``notes`` line saying so, and, for ``array``
inputs, ``labels``: the label volume (original label values) as nested lists. The pyfunc, ``medmtl
predict`` and ``mlflow models serve`` all answer through :meth:`SegmentationModel.predict`, so they
behave the same.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType, Array

from medmtl.errors import InputError
from medmtl.modality import MODALITIES, dicom_modality

__all__ = ["SegmentationModel", "log_segmentation_model", "MODEL_ARTIFACT_PATH", "model_signature"]

MODEL_ARTIFACT_PATH = "model"
_log = logging.getLogger(__name__)


def model_signature(class_names: list[str]) -> ModelSignature:
    """Explicit input/output schema of the pyfunc model (every input column is optional; rows are checked in ``predict``)."""
    inputs = Schema([
        ColSpec("string", "image", required=False),
        # any JSON value: the model checks the shape itself and says in one line what is wrong (2D, 4D, ragged),
        # where MLflow's schema check would answer "Expected data to be list or numpy array, got float"
        ColSpec(AnyType(), "array", required=False),
        ColSpec(Array(Array("double")), "affine", required=False),
        ColSpec("string", "modality", required=False),
        ColSpec("string", "output", required=False),
        ColSpec("string", "seg_output", required=False),
    ])
    outputs = Schema(
        [ColSpec("string", "modality"), ColSpec("string", "shape"), ColSpec("string", "output"), ColSpec("string", "seg_output")]
        + [ColSpec("long", f"voxels_{n}") for n in class_names]
        + [ColSpec("long", "nonfinite_voxels", required=False), ColSpec("string", "notes", required=False)]
        + [ColSpec(Array(Array(Array("long"))), "labels", required=False)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`~medmtl.inference.segmenter.Segmenter`."""

    def load_context(self, context) -> None:
        """Verify the model's files, rebuild the net from the logged config and load the weights (``weights_only=True``).

        The files are checked against the embedded manifest and, when the tracking store is reachable, the
        manifest against the logged model's recorded digest (:mod:`medmtl.inference.model_manifest`); a
        changed file raises :class:`~medmtl.errors.ModelError` naming it.
        """
        _verify_own_files(Path(context.artifacts["config"]))
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
        from medmtl.inference.model_io import read_model_input

        rows = []
        for i, rec in enumerate(model_input.to_dict(orient="records")):
            rec = {k: (None if _missing(v) else v) for k, v in rec.items()}
            where = f"row {i}" + (f" ({rec['image']})" if rec.get("image") else "")
            inp = read_model_input(rec, where=f"row {i}")
            rows.append(self.segment(inp, output=rec.get("output") or "", seg_output=rec.get("seg_output") or "", where=where))
        return pd.DataFrame(rows)

    def segment(self, inp, *, output: str = "", seg_output: str = "", where: str = "input") -> dict:
        """Segment one :class:`~medmtl.inference.model_io.ModelInput` (removed afterwards) and write the outputs asked for.

        Returns the output row of :meth:`predict`; the wall time per phase (preprocess, sliding_window,
        invert, write) is left in ``self.last_seconds``.
        """
        from medmtl.inference.model_io import SegNotPossible, write_dicom_seg, write_nifti
        from medmtl.inference.segmenter import BACKGROUND_VALUE

        try:
            pred = self.segmenter.predict(inp.nifti, inp.modality, name=where)
        finally:
            inp.cleanup()
        t0 = time.perf_counter()
        names = list(self.cfg.data.labels[inp.modality].values())
        if output:
            write_nifti(pred.labels.astype(np.uint8), inp.affine, Path(output))
        if seg_output:
            if inp.kind != "dicom":
                raise InputError(f"{where}: seg_output needs a DICOM series folder as input")
            try:
                write_dicom_seg(pred.class_indices, inp.dicom_plan, names, Path(seg_output))
            except SegNotPossible as why:
                seg_output = f"not written: {why}"
        counts = np.bincount(pred.class_indices.reshape(-1), minlength=len(names) + 1)
        row = {"modality": dicom_modality(inp.modality), "shape": json.dumps(list(pred.labels.shape)), "output": output, "seg_output": seg_output}
        row.update({f"voxels_{n}": int(counts[1 + names.index(n)]) if n in names else 0 for n in _all_class_names(self.cfg)})
        row["nonfinite_voxels"] = pred.nonfinite_voxels
        row["notes"] = ""
        if pred.nonfinite_voxels:
            row["notes"] = (f"{pred.nonfinite_voxels} NaN/inf voxels replaced by the {dicom_modality(inp.modality)} background value "
                            f"{BACKGROUND_VALUE[inp.modality]:g} before segmenting")
            _log.warning("%s: %s", where, row["notes"])
        row["labels"] = pred.labels.astype(int).tolist() if inp.kind == "array" else None
        self.last_seconds = {**pred.seconds, "write": time.perf_counter() - t0}
        return row


def _verify_own_files(config_path: Path) -> None:
    """The served model's own check (after MLflow imported the bundled code; see model_manifest's docstring)."""
    from medmtl.inference.model_manifest import DIGEST_TAG, MANIFEST_NAME, verify_model_dir

    root = config_path.resolve().parent.parent  # <model>/artifacts/config.yaml
    if not (root / "MLmodel").is_file():
        return  # not loaded from a model folder (e.g. artifacts passed by hand in a test)
    model_id = (yaml.safe_load((root / "MLmodel").read_text()) or {}).get("model_id")
    trusted = None
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if model_id and is_tracking_uri_set():  # never let a lookup create a default store in the serving folder
        try:
            trusted = mlflow.tracking.MlflowClient().get_logged_model(model_id).tags.get(DIGEST_TAG)
        except Exception as err:  # offline serving from a copy: the embedded manifest is all there is
            _log.warning("model %s: tracking store not reachable (%s); files checked against %s only", model_id,
                         type(err).__name__, MANIFEST_NAME)
    if not (root / MANIFEST_NAME).is_file() and trusted is None:
        _log.warning("model %s has no file manifest (logged before medmtl recorded one): its files are not verified", model_id)
        return
    verify_model_dir(root, trusted_digest=trusted, where=str(model_id or root), after_load=True)


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
        from medmtl.tracking.model_loading import record_logged_model_manifest

        record_logged_model_manifest(mlflow.tracking.MlflowClient(tracking_uri=tracking_uri), info.model_id, tracking_uri)
    return info.model_uri


def _version(module: str) -> str:
    return __import__(module).__version__
