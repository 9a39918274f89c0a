"""Inference side: a prediction made in preprocessed space comes back on the original grid (same shape and
affine) and overlaps the reference mask in world space, for CT and MR including an oblique MR series; the
sliding window covers the whole image whatever the patch size."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medmtl.config import load_config
from medmtl.data.manifest import read_manifest
from medmtl.data.plan import compute_plan
from medmtl.data.transforms import deterministic_transforms
from medmtl.inference.segmenter import Segmenter


class OracleSegmenter(Segmenter):
    """A "network" that returns the one-hot reference label, preprocessed like the image (nearest)."""

    reference: torch.Tensor

    def logits(self, image: torch.Tensor, modality: str) -> torch.Tensor:
        assert self.reference.shape[1:] == image.shape[1:]
        n = len(self.values[modality])
        return 10.0 * torch.nn.functional.one_hot(self.reference[0].long(), n).permute(3, 0, 1, 2)[None].float()


@pytest.fixture(scope="module")
def setup(tiny_dataset):
    data_dir, _ = tiny_dataset
    cfg = load_config(None, ["preprocess.patch_size=[32, 32, 16]"])
    return data_dir, cfg, compute_plan(data_dir, cfg)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask)
    return (affine[:3, :3] @ ijk.mean(0)) + affine[:3, 3]


def test_prediction_inverted_to_the_original_grid_overlaps_the_mask_in_world_space(setup):
    data_dir, cfg, plan = setup
    seg = OracleSegmenter(torch.nn.Identity(), cfg, plan)
    entries = [e for e in read_manifest(data_dir) if e.label is not None]
    oblique_seen = False
    for e in entries:
        m = e.modality.lower()
        ref = nib.load(str(data_dir / e.label))
        ref_labels = np.asarray(ref.dataobj)
        oblique = not np.allclose(np.abs(ref.affine[:3, :3]) * (1 - np.eye(3)), 0, atol=1e-3)
        oblique_seen |= oblique
        pre = Compose(deterministic_transforms(cfg, plan, m, with_label=True, crop=False))
        seg.reference = pre({"image": str(data_dir / e.image), "label": str(data_dir / e.label)})["label"]
        pred = seg.predict(str(data_dir / e.image), m)
        assert pred.labels.shape == ref_labels.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
        voxel = float(np.linalg.norm(ref.affine[:3, :3], axis=0).max())
        for value in cfg.data.labels[m]:
            a, b = pred.labels == value, ref_labels == value
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice > 0.9, (e.image, value, dice, oblique)  # resampled there and back: boundaries move a little
            assert np.linalg.norm(_world_centroid(a, pred.affine) - _world_centroid(b, ref.affine)) < 0.5 * voxel
    assert oblique_seen, "the synthetic dataset must hold an oblique MR series"


def test_sliding_window_covers_the_whole_image(setup):
    data_dir, cfg, plan = setup
    e = next(e for e in read_manifest(data_dir) if e.modality == "MR")

    class Pointwise(torch.nn.Module):
        def forward(self, x, modality):
            return torch.cat([x, -x, 2 * x, x**2, x + 1], dim=1)

    seg = Segmenter(Pointwise(), cfg, plan)
    image = seg.pre["mr"]({"image": str(data_dir / e.image)})["image"]
    assert any(s % p for s, p in zip(image.shape[1:], seg.roi["mr"]))  # windows do not tile the image exactly
    out = seg.logits(image, "mr")
    expected = Pointwise()(image.as_tensor()[None], "mr")
    torch.testing.assert_close(out.as_tensor() if hasattr(out, "as_tensor") else out, expected, rtol=1e-4, atol=1e-4)
