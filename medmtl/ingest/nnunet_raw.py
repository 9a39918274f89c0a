"""nnU-Net raw datasets as an ingest source: ``imagesTr/``, ``labelsTr/``, optional ``imagesTs/``, ``dataset.json``.

Users who already converted their data for nnU-Net (Isensee et al., Nature Methods 2021) point ``medmtl
ingest`` at the dataset folder; it is detected by ``dataset.json`` beside ``imagesTr/`` and lands in the same
manifest and report as a DICOM export. What is read:

* ``dataset.json`` (nnU-Net v2; v1 keys are accepted too): ``channel_names`` (v1: ``modality``) maps each
  channel index to a name. ``CT`` (any name starting with "ct", case-insensitive) is CT; MR contrast names
  (``MR``, ``MRI``, ``T1``, ``T1w``, ``T1Gd``, ``T2``, ``T2w``, ``FLAIR``, ``PD``, ``ADC``, ``DWI``, ``SWI``, ``DCE``,
  ``HBV``, ``QSM``, ``b<number>``) are MR. A dataset with no CT or MR channel is refused with an error naming
  the file and key; other channels (``PET``, ``noNorm`` ...) are listed as skipped files. ``labels`` maps
  names to integer values (v1: values to names); region-based labels (lists) are refused. ``file_ending``
  must be ``.nii.gz`` or ``.nii``.
* ``imagesTr/<case>_<XXXX><file_ending>``: channel ``XXXX`` of training case ``<case>``, labelled by
  ``labelsTr/<case><file_ending>``; ``imagesTs/`` holds unlabelled cases. Every channel becomes its own
  manifest image (one modality each), with a copy of the case's label.

What ingest does with them (:mod:`medmtl.ingest.run`): images are decoded and re-encoded through the same
atomic writer as DICOM series (only the geometry is kept from the source header, so ``descrip``, ``aux_file``
and other free-text fields never pass), labels are checked against their image in world space (axes may be
flipped or permuted; any other mismatch is a ``label_mismatch`` rejection), label values must be declared in
``dataset.json``, and values are mapped to the configured class names when every label name matches one
(:func:`medmtl.ingest.dicom_seg.map_label_values`).

Identifiers: the case identifier of an nnU-Net dataset may be anything, MRNs included, so it never leaves
memory in clear. Case ids are ``HMAC(secret, "nnunet:<dataset folder name>:<case>")`` and series keys
``HMAC(secret, "nnunet:<dataset folder name>:<case>:<channel>")``: the folder name keeps ``case_001`` of two
datasets apart, so renaming the folder gives new case ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import nibabel as nib
import numpy as np

from medmtl.errors import IngestError
from medmtl.ingest.common import SkippedFile
from medmtl.ingest.dicom_seg import map_label_values
from medmtl.ingest.dicom_series import LABEL_TOL_VOXELS, LabelError, SeriesReadError

DATASET_JSON = "dataset.json"
FILE_ENDINGS = (".nii.gz", ".nii")
_CT_NAME = re.compile(r"^ct", re.IGNORECASE)
_MR_NAME = re.compile(r"^(mri?|t1|t2|flair|pdw?|adc|dwi|swi|dce|hbv|qsm|b\d+)", re.IGNORECASE)
_IMAGE_NAME = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class NnunetDatasetError(IngestError, ValueError):
    """``dataset.json`` cannot be used; the message names the file and the key and says what to do."""


@dataclass(frozen=True)
class NnunetDataset:
    """A parsed nnU-Net raw dataset.

    Attributes:
        root: the dataset folder.
        name: the folder name (namespaces the case pseudonyms).
        channels: ``{channel index: (channel name, "CT" | "MR" | None)}``.
        labels: ``{label value: name}`` without background (value 0).
        file_ending: ``.nii.gz`` or ``.nii``.
        json_bytes: raw bytes of ``dataset.json`` (fingerprinted for re-run detection).
    """

    root: Path
    name: str
    channels: dict[int, tuple[str, str | None]]
    labels: dict[int, str]
    file_ending: str
    json_bytes: bytes


@dataclass(frozen=True)
class NnunetImage:
    """One channel of one case. ``case`` is the source identifier: keep it in memory, pseudonymize it."""

    case: str
    channel: int
    modality: str
    image_path: Path
    label_path: Path | None
    split: str  # "Tr" or "Ts"


def is_nnunet_raw(folder: str | Path) -> bool:
    """True when ``folder`` holds ``dataset.json`` and ``imagesTr/`` (an nnU-Net raw dataset)."""
    folder = Path(folder)
    return (folder / DATASET_JSON).is_file() and (folder / "imagesTr").is_dir()


def channel_modality(name: str) -> str | None:
    """``"CT"``, ``"MR"`` or ``None`` for an nnU-Net channel name (see the module docstring for the names)."""
    name = name.strip()
    if _CT_NAME.match(name):
        return "CT"
    if _MR_NAME.match(name):
        return "MR"
    return None


def load_dataset(root: str | Path) -> NnunetDataset:
    """Parse and check ``root/dataset.json``.

    Raises:
        NnunetDatasetError: invalid JSON, a missing or malformed key, no CT/MR channel, region-based
            labels, or an unsupported ``file_ending``; the message names the file and key.
    """
    root = Path(root)
    path = root / DATASET_JSON
    raw = path.read_bytes()
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise NnunetDatasetError(f"{path}: not valid JSON ({e}); fix the file.") from None
    if not isinstance(meta, dict):
        raise NnunetDatasetError(f"{path}: expected a JSON object with channel_names, labels and file_ending.")

    key = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
    if key is None or not isinstance(meta[key], dict) or not meta[key]:
        raise NnunetDatasetError(f"{path}: key 'channel_names' is missing or empty; map channel indices to names, e.g. {{\"0\": \"CT\"}}.")
    channels = {}
    for idx, name in meta[key].items():
        try:
            channel = int(idx)
        except ValueError:
            raise NnunetDatasetError(f"{path}: key '{key}' has the channel index {idx!r}; use \"0\", \"1\", ...") from None
        channels[channel] = (str(name), channel_modality(str(name)))
    if not any(m for _, m in channels.values()):
        names = ", ".join(repr(n) for n, _ in channels.values())
        raise NnunetDatasetError(
            f"{path}: key '{key}' names no CT or MR channel ({names}); medmtl ingests CT and MR only. Name the "
            "channel 'CT' for CT, or after its MR contrast ('MR', 'T1', 'T2', 'FLAIR', 'ADC' ...)."
        )

    if not isinstance(meta.get("labels"), dict) or not meta["labels"]:
        raise NnunetDatasetError(f"{path}: key 'labels' is missing or empty; map label names to values, e.g. {{\"background\": 0, \"liver\": 1}}.")
    labels: dict[int, str] = {}
    for k, v in meta["labels"].items():
        if isinstance(v, list):
            raise NnunetDatasetError(
                f"{path}: key 'labels' entry {k!r} is region-based (a list of values); medmtl needs one integer "
                "value per class. List the base classes with integer values."
            )
        try:
            # v2 maps name -> value; v1 mapped "value" -> name.
            value, name = (int(k), v) if isinstance(v, str) and k.strip().isdigit() else (int(v), str(k))
        except (TypeError, ValueError):
            raise NnunetDatasetError(f"{path}: key 'labels' entry {k!r}: {v!r} is not an integer label value.") from None
        if value < 0 or value > 255:
            raise NnunetDatasetError(f"{path}: key 'labels' value {value} for {name!r} does not fit a uint8 mask (0..255).")
        if value:
            labels[value] = name

    ending = meta.get("file_ending", ".nii.gz")
    if ending not in FILE_ENDINGS:
        raise NnunetDatasetError(
            f"{path}: key 'file_ending' is {ending!r}; medmtl reads {' and '.join(FILE_ENDINGS)} only. Convert the "
            "images to NIfTI (e.g. SimpleITK.WriteImage) and set file_ending to \".nii.gz\"."
        )
    return NnunetDataset(root=root, name=root.name, channels=channels, labels=labels, file_ending=ending, json_bytes=raw)


def list_images(ds: NnunetDataset) -> tuple[list[NnunetImage], list[SkippedFile]]:
    """Every CT/MR channel image of ``imagesTr/`` and ``imagesTs/`` with its label, and every file left out.

    Deterministic order (split, case, channel). Training images without a label are returned with
    ``label_path=None``; labels without any image are listed as skipped (absolute paths: pseudonymize
    them with :func:`report_path` before reporting).
    """
    images, skipped = [], []
    used_labels: set[Path] = set()
    labels_dir = ds.root / "labelsTr"
    for split in ("Tr", "Ts"):
        folder = ds.root / f"images{split}"
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if not p.is_file():
                continue
            m = _IMAGE_NAME.match(p.name[: -len(ds.file_ending)]) if p.name.endswith(ds.file_ending) else None
            if m is None:
                skipped.append(SkippedFile(str(p), "not_nnunet_image", f"name is not <case>_<XXXX>{ds.file_ending}"))
                continue
            case, channel = m["case"], int(m["channel"])
            if channel not in ds.channels:
                skipped.append(SkippedFile(str(p), "unknown_channel", f"channel {channel} is not in dataset.json channel_names"))
                continue
            name, modality = ds.channels[channel]
            if modality is None:
                skipped.append(SkippedFile(str(p), "unsupported_channel", f"channel {channel} {name!r} is neither CT nor MR"))
                continue
            label = labels_dir / f"{case}{ds.file_ending}" if split == "Tr" else None
            if label is not None and not label.is_file():
                label = None
            if label is not None:
                used_labels.add(label)
            images.append(NnunetImage(case=case, channel=channel, modality=modality, image_path=p, label_path=label, split=split))
    if labels_dir.is_dir():
        for p in sorted(labels_dir.iterdir()):
            if p.is_file() and p not in used_labels:
                skipped.append(SkippedFile(str(p), "label_without_image", "no CT/MR image in imagesTr/ for this label"))
    return images, skipped


def label_lut(ds: NnunetDataset, configured: Mapping[int, str] | None) -> tuple[np.ndarray, str, bool]:
    """``(lut, rule, by_name)``: ``lut[v]`` is the output value of label value ``v`` (-1 when undeclared; 256
    entries); ``rule`` says how values were chosen; ``by_name`` whether they were mapped by class name.

    Raises:
        LabelError: ``unknown_label_names`` when only some label names match the configured class names.
    """
    values, rule, by_name = map_label_values(ds.labels, configured, what="dataset.json labels")
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = 0
    for src, dst in values.items():
        lut[src] = dst
    return lut, rule, by_name


def image_geometry(path: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(RAS affine, 3D shape)`` of a NIfTI image, read from its header only.

    Raises:
        SeriesReadError: ``unreadable_image`` (not a NIfTI file), ``not_3d`` (2D, or 4D with several
            volumes), ``qform_sform_mismatch`` (the two transforms disagree: readers would place the image
            differently; the message says which to fix).
    """
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        hdr = img.header
    except Exception as e:
        raise SeriesReadError("unreadable_image", f"not a readable NIfTI file ({type(e).__name__}); re-export it") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise SeriesReadError("not_3d", f"image shape {shape}; medmtl ingests 3D volumes (one channel per file)")
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode > 0 and scode > 0:
        q, s = hdr.get_qform(), hdr.get_sform()
        corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
        err = np.abs((corners @ s.T) @ np.linalg.inv(q).T - corners)[:, :3].max()
        if err > LABEL_TOL_VOXELS:
            raise SeriesReadError(
                "qform_sform_mismatch",
                f"qform and sform place the image up to {err:.3f} voxels apart; readers disagree on where it is. "
                "Rewrite the file with one transform (e.g. nibabel: img.set_qform(img.get_sform()))",
            )
    return np.asarray(img.affine, dtype=np.float64), shape  # nibabel: sform when set, else qform


def read_image(path: Path) -> np.ndarray:
    """Voxel data of a NIfTI image as a native-endian array: float64 becomes float32, bool becomes uint8.

    Raises:
        SeriesReadError: ``unreadable_image`` when the data cannot be read (truncated or corrupt file).
    """
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:
        raise SeriesReadError("unreadable_image", f"image data cannot be read ({type(e).__name__}); re-export it") from None
    if data.ndim == 4:
        data = data[..., 0]
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype == np.float64:
        data = data.astype(np.float32)
    elif data.dtype.kind not in "iuf":
        raise SeriesReadError("unsupported_pixels", f"voxel type {data.dtype} is not a number type")
    return np.asarray(data, dtype=data.dtype.newbyteorder("="), order="F")


def apply_label_lut(data: np.ndarray, lut: np.ndarray, what: str) -> np.ndarray:
    """Map an nnU-Net label array through ``lut`` (see :func:`label_lut`) to uint8.

    Raises:
        LabelError: ``label_values`` when the mask holds values that are not integers declared in dataset.json.
    """
    if data.size and (not np.all(np.isfinite(data)) or np.any(data != np.round(data)) or data.min() < 0 or data.max() > 255):
        raise LabelError("label_values", f"{what} holds values that are not integers in 0..255")
    out = lut[np.asarray(data, dtype=np.int64)]
    if out.size and out.min() < 0:
        bad = sorted(int(v) for v in np.unique(data[out < 0]))[:10]
        raise LabelError(
            "label_values",
            f"{what} holds label value(s) {bad} that dataset.json 'labels' does not declare; declare them or fix the mask",
        )
    return np.asarray(out, dtype=np.uint8, order="F")


def report_path(ds: NnunetDataset, path: Path, case_id: Callable[[str], str], file_id: Callable[[str], str]) -> str:
    """The path of a dataset file for the report, with the case identifier replaced by ``case_id(case)``.

    Names that do not parse as nnU-Net names are replaced by ``file_id(name)`` (a keyed digest), because a
    free-form file name may carry a patient identifier.
    """
    folder, name = path.parent.name, path.name
    stem = name[: -len(ds.file_ending)] if name.endswith(ds.file_ending) else None
    m = _IMAGE_NAME.match(stem) if stem is not None and folder.startswith("images") else None
    if m:
        return f"{folder}/{case_id(m['case'])}_{m['channel']}{ds.file_ending}"
    if stem is not None and folder == "labelsTr":
        return f"{folder}/{case_id(stem)}{ds.file_ending}"
    return f"{folder}/{file_id(name)}"
