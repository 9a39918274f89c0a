"""The patient-data boundary in the code itself: only ingest (which reads exports) and inference (which
reads a DICOM series to segment it) may import pydicom or highdicom; ``medmtl/synth.py`` writes the fake
exports that tests ingest and is never shipped inside a model. Training never loads the ingest stage."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DICOM_PACKAGES = {"pydicom", "highdicom"}
ALLOWED = ("medmtl/ingest/", "medmtl/inference/", "medmtl/synth.py")


def _imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dicom_libraries_are_imported_only_at_the_boundary():
    offenders = []
    for path in sorted([*ROOT.glob("medmtl/**/*.py"), *ROOT.glob("pipelines/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        found = _imported_top_levels(path) & DICOM_PACKAGES
        if found and not rel.startswith(ALLOWED):
            offenders.append(f"{rel}: {sorted(found)}")
    assert not offenders, "pydicom/highdicom outside medmtl/ingest and medmtl/inference:\n" + "\n".join(offenders)


def test_training_never_loads_the_ingest_stage():
    # (nibabel itself may import pydicom for its DICOM extension; what matters is that no medmtl code that
    # reads scanner headers is reachable from training)
    code = ("import sys, medmtl.data.loaders, medmtl.training.trainer, medmtl.weighting, medmtl.sharing; "
            "print(sorted(m for m in sys.modules if m.startswith(('medmtl.ingest', 'medmtl.synth'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == "[]", out
