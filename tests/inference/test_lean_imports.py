"""MONAI imported without the optional packages inference never uses (medmtl.inference.lean_imports) segments
exactly as with MONAI imported in full: same labels for CT and an (oblique) MR image, in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from medmtl.config import load_config
from medmtl.data.manifest import read_manifest
from medmtl.data.plan import compute_plan, save_plan
from medmtl.inference.segmenter import Segmenter
from medmtl.models.two_column import TwoColumnNet

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["preprocess.patch_size=[32, 32, 16]", "model.channels=[4, 8, 16]", "model.num_res_units=0"]


def test_lean_monai_import_gives_the_same_labels(tiny_dataset, tmp_path):
    data_dir, _ = tiny_dataset
    cfg = load_config(None, OVERRIDES)
    save_plan(compute_plan(data_dir, cfg), tmp_path / "plan.json")
    torch.manual_seed(0)
    torch.save(TwoColumnNet(cfg=cfg).state_dict(), tmp_path / "weights.pt")
    images = {m: str(data_dir / next(e for e in read_manifest(data_dir) if e.modality == m.upper()).image) for m in ("ct", "mr")}
    script = textwrap.dedent(f"""
        import sys
        import mlflow  # the order of `medmtl predict`
        from medmtl.inference.lean_imports import import_monai_for_inference
        assert import_monai_for_inference()
        assert "scipy.signal" not in sys.modules and "matplotlib" not in sys.modules and "sklearn" not in sys.modules
        import numpy as np, torch
        from medmtl.config import load_config
        from medmtl.data.plan import load_plan
        from medmtl.inference.segmenter import Segmenter
        from medmtl.models.two_column import TwoColumnNet
        cfg = load_config(None, {OVERRIDES!r})
        net = TwoColumnNet(cfg=cfg)
        net.load_state_dict(torch.load({str(tmp_path / 'weights.pt')!r}, weights_only=True))
        seg = Segmenter(net, cfg, load_plan({str(tmp_path / 'plan.json')!r}))
        for m, path in {images!r}.items():
            np.save({str(tmp_path)!r} + f"/lean_{{m}}.npy", seg.predict(path, m).labels)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                                               "PATH": "/usr/bin:/bin"})
    net = TwoColumnNet(cfg=cfg)
    net.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    from medmtl.data.plan import load_plan

    seg = Segmenter(net, cfg, load_plan(tmp_path / "plan.json"))
    for m, path in images.items():
        full = seg.predict(path, m).labels
        assert (full > 0).any()
        np.testing.assert_array_equal(np.load(tmp_path / f"lean_{m}.npy"), full)
