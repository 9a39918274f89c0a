"""Slice-consistent albumentations: one draw per volume on every axial slice, masks aligned and integer,
the input's intensity range, type and dtype restored, independent noise, reproducible for a seed."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medmtl.config import AlbumentationsConfig
from medmtl.data.augment import SliceConsistentAlbumentationsd

X, Y, Z = 48, 40, 6
NO_INTENSITY = dict(brightness_contrast_p=0.0, gamma_p=0.0, noise_p=0.0)


def _transform(**overrides) -> SliceConsistentAlbumentationsd:
    cfg = AlbumentationsConfig(enabled=True, **{"p": 1.0, "affine_p": 1.0, "grid_distortion_p": 1.0, "elastic_p": 1.0,
                                                "brightness_contrast_p": 1.0, "gamma_p": 1.0, "noise_p": 0.0, **overrides})
    t = SliceConsistentAlbumentationsd.from_config(cfg)
    t.set_random_state(seed=3)
    return t


def _phantom(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A z-scored-looking slice with two blobs (labels 1, 2), repeated on every slice: ``(1, X, Y, Z)``."""
    rng = np.random.default_rng(seed)
    xx, yy = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    lab = np.zeros((X, Y), np.uint8)
    lab[(xx - 16) ** 2 + (yy - 14) ** 2 < 64] = 1
    lab[(xx - 32) ** 2 + (yy - 26) ** 2 < 36] = 2
    img = -1.5 + 2.0 * lab + 0.1 * rng.standard_normal((X, Y))  # -1.5 background, 0.5 label 1, 2.5 label 2
    img3 = np.repeat(img[None, :, :, None], Z, axis=3).astype(np.float32)
    lab3 = np.repeat(lab[None, :, :, None], Z, axis=3)
    return torch.from_numpy(img3), torch.from_numpy(lab3)


def test_every_slice_gets_the_same_geometric_and_intensity_transform():
    img, lab = _phantom()
    out = _transform()({"image": img, "label": lab})
    for z in range(1, Z):
        # opencv warps the slices in chunks of four channels; from opencv 5.1 a chunk of two can round
        # differently in the last bit (1.2e-7 measured), so images agree to float32 rounding, labels exactly
        torch.testing.assert_close(out["image"][..., z], out["image"][..., 0], rtol=0, atol=1e-5)
        assert torch.equal(out["label"][..., z], out["label"][..., 0])
    assert not torch.allclose(out["image"], img) and not torch.equal(out["label"], lab)  # something happened


def test_mask_stays_aligned_with_the_image_and_integer():
    img, lab = _phantom()
    out = _transform(**NO_INTENSITY)({"image": img, "label": lab})
    assert out["label"].dtype == lab.dtype and set(out["label"].unique().tolist()) <= {0, 1, 2}
    # the image encodes its label (-1.5 background, 0.5 label 1, 2.5 label 2); warped linearly it must
    # still say what the mask, warped nearest, says: same regions, same centroids
    mask, said = out["label"][0, ..., 0], out["image"][0, ..., 0] > -0.5
    assert 2 * ((mask > 0) & said).sum() / ((mask > 0).sum() + said.sum()) > 0.9
    grid = torch.stack(torch.meshgrid(torch.arange(X), torch.arange(Y), indexing="ij")).float()
    centroids = [(grid * (mask == c)).sum((1, 2)) / (mask == c).sum() for c in (1, 2)]
    # each blob of the image: its pixels nearer to that label's centroid (the blobs are ~20 px apart)
    nearest = torch.stack([torch.linalg.vector_norm(grid - c[:, None, None], dim=0) for c in centroids]).argmin(0)
    for c in (0, 1):
        blob = said & (nearest == c)
        centroid = (grid * blob).sum((1, 2)) / blob.sum()
        assert torch.linalg.vector_norm(centroid - centroids[c]) < 0.5  # pixels


def test_intensity_range_type_and_dtype_are_restored():
    img, lab = _phantom()
    meta = MetaTensor(img, affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = _transform(noise_p=1.0)({"image": meta, "label": lab})
    o = out["image"]
    assert isinstance(o, MetaTensor) and o.dtype == torch.float32 and o.shape == img.shape
    assert torch.equal(o.affine, meta.affine)
    assert o.min() >= img.min() - 1e-5 and o.max() <= img.max() + 1e-5
    assert o.max() - o.min() > 0.5 * (img.max() - img.min())  # still spans the range: values mapped back, not left in [0, 1]


def test_noise_is_independent_per_voxel_with_one_std_per_volume():
    const = torch.zeros(1, X, Y, Z)
    const[0, 0, 0, 0], const[0, -1, -1, -1] = -1.0, 1.0  # range 2: noise std 0.05 of the range -> 0.1
    t = _transform(p=1.0, affine_p=0.0, grid_distortion_p=0.0, elastic_p=0.0, brightness_contrast_p=0.0, gamma_p=0.0,
                   noise_p=1.0, noise_std=(0.05, 0.05))
    out = t({"image": const})["image"][0]
    a, b = out[1:-1, 1:-1, 1].flatten(), out[1:-1, 1:-1, 2].flatten()
    assert not torch.allclose(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1
    assert float(out[1:-1, 1:-1, 1:-1].std()) == pytest.approx(0.1, rel=0.15)


def test_reproducible_for_a_seed_and_different_across_draws():
    img, lab = _phantom()
    a1 = _transform()({"image": img, "label": lab})
    a2 = _transform()({"image": img, "label": lab})
    assert torch.equal(a1["image"], a2["image"]) and torch.equal(a1["label"], a2["label"])
    t = _transform()
    first, second = t({"image": img}), t({"image": img})
    assert not torch.equal(first["image"], second["image"])


def test_probability_zero_returns_the_input_untouched():
    img, lab = _phantom()
    out = _transform(p=0.0)({"image": img, "label": lab})
    assert out["image"] is img and out["label"] is lab


def test_numpy_inputs_and_a_label_key_that_is_missing():
    img, _ = _phantom()
    out = _transform()({"image": img.numpy()})
    assert isinstance(out["image"], np.ndarray) and out["image"].dtype == np.float32 and out["image"].shape == img.shape
