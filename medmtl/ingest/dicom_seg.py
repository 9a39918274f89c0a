"""DICOM SEG objects inside a scanner export, used as the label of the series they reference.

A SEG object (Segmentation Storage, or Label Map Segmentation Storage) is matched to an ingested series and
turned into a uint8 mask on that series' output grid. How, step by step:

1. **Which series.** The SEG names the series it was drawn on in ``ReferencedSeriesSequence``; the per-frame
   ``DerivationImageSequence/SourceImageSequence`` and ``ReferencedInstanceSequence`` name the source SOP
   instances. When one SeriesInstanceUID was split into several volumes (orientations, echoes), the SEG
   goes to the part holding the most referenced instances; without instance references, to the first
   accepted part its frames fit on, else to the largest accepted part (which then reports the mismatch).
   The SEG must share the series' FrameOfReferenceUID, otherwise its positions mean nothing for the image.
2. **Where each frame goes.** Frames are placed by their own per-frame ``ImagePositionPatient`` in world
   space, never by frame order or DimensionIndexValues: the position along the slice normal picks the
   source slice, the in-plane offset (an integer number of pixels; SEG frames may be cropped) picks the
   corner. The frame orientation must equal the image orientation and the pixel spacing must agree to
   within ``LABEL_TOL_VOXELS`` of a voxel at the far edge. Any frame that does not land on voxel centres
   of the series makes the series a ``label_mismatch`` rejection naming the SEG file and the distance;
   a SEG is never resampled to fit. (Gantry-tilt and spacing corrections of the image are applied to the
   mask afterwards, nearest neighbour, exactly as for a NIfTI mask on the source grid.)
3. **Which value each segment gets** (:func:`map_label_values`): with configured class names for the
   modality (``data.labels`` in the config, passed to ingest as ``label_names``), segments are mapped by
   their SegmentLabel, compared after lower-casing and turning non-alphanumerics into ``_`` (``"Kidney
   Left"`` -> ``kidney_left``). If every segment matches a configured name, the configured values are used;
   if none matches, or no names are configured, the segment number is the label value (the report says
   which rule was used, warning ``labels_by_number`` when names were configured but did not match); a
   partial match is ambiguous and rejects the series as ``unknown_label_names``.
4. **Overlaps.** BINARY and FRACTIONAL SEGs may mark one voxel in several segments. The segment with the
   higher segment number wins, and the report warns ``seg_overlap`` with the voxel count. FRACTIONAL
   values count as inside at >= 50% of ``MaximumFractionalValue``. LABELMAP SEGs cannot overlap.

Ingest reads SEG headers without pixel data when it scans the export and decodes the frames one at a time
(``pydicom.pixels.iter_pixels``), so memory stays at one mask plus one frame. The SEG's own headers carry
the patient's name, ids and dates like any image: none of it is copied anywhere; SEG files appear in the
report only by their path relative to the export (UID-like parts pseudonymized).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pydicom

from medmtl.ingest.common import SkippedFile, floats, functional_group, slice_frame
from medmtl.ingest.dicom_series import LABEL_TOL_VOXELS, ORIENTATION_TOL, LabelError, SeriesPlan, resample_label_like

# Most segments a SEG may carry: ingested masks are uint8 (value 0 is background).
MAX_LABEL_VALUE = 255


@dataclass(frozen=True, eq=False)
class SegHeader:
    """What ingest needs from one SEG file, read without pixel data.

    Holds source identifiers (``patient_id``, UIDs) in memory only; none of them is written or logged.
    Per-frame arrays have one row per frame in file order.

    Attributes:
        segments: ``{segment number: SegmentLabel}``.
        frame_ipp: ``(F, 3)`` ImagePositionPatient of each frame, LPS mm.
        frame_iop: ``(F, 6)`` ImageOrientationPatient of each frame.
        frame_spacing: ``(F, 2)`` PixelSpacing of each frame (between rows, between columns), mm.
        frame_segment: ``(F,)`` ReferencedSegmentNumber per frame (0 for LABELMAP SEGs).
        frame_sources: referenced source SOPInstanceUIDs per frame (empty when the frame names none).
        problem: why the SEG cannot be used although it parsed (missing geometry ...), else ``""``.
    """

    path: str
    sop_instance_uid: str
    patient_id: str
    frame_of_reference_uid: str
    referenced_series: tuple[str, ...]
    referenced_instances: frozenset[str]
    segmentation_type: str
    max_fractional_value: int
    segments: dict[int, str]
    rows: int
    cols: int
    frame_ipp: np.ndarray
    frame_iop: np.ndarray
    frame_spacing: np.ndarray
    frame_segment: np.ndarray
    frame_sources: tuple[frozenset[str], ...]
    file_size: int
    file_mtime_ns: int
    problem: str = ""

    @property
    def n_frames(self) -> int:
        """Number of frames in the file."""
        return len(self.frame_segment)


@dataclass(frozen=True, eq=False)
class SegPlacement:
    """Where the frames of one SEG go on the source grid of one series, and the value of each segment.

    Attributes:
        frames: indices (file order) of the frames that belong to this series.
        slice_index: ``(len(frames),)`` index of the source slice (sorted along the normal) per frame.
        offset: ``(len(frames), 2)`` integer in-plane offset (axis 0 = column, axis 1 = row) per frame.
        values: ``{segment number: label value}``.
        rule: how the values were chosen, one sentence for the report.
        by_name: whether the values come from configured class names (else from segment numbers).
    """

    seg: SegHeader
    frames: np.ndarray
    slice_index: np.ndarray
    offset: np.ndarray
    values: dict[int, int]
    rule: str
    by_name: bool


def read_seg_header(path: str) -> SegHeader | SkippedFile:
    """Read a SEG file's header (no pixel data); a file that cannot be parsed comes back as SkippedFile.

    Never raises for bad input. A SEG that parses but lacks what placement needs comes back with
    ``problem`` set, so that the series it references can report it.
    """
    try:
        st = os.stat(path)
        with open(path, "rb") as f:  # read-only: the export is never modified
            ds = pydicom.dcmread(f, stop_before_pixels=True)
    except Exception as e:  # corrupt input raises many types; the message may quote PHI, so only the type
        return SkippedFile(path, "corrupt", f"DICOM SEG header unreadable ({type(e).__name__})")
    try:
        return _seg_header(path, ds, st)
    except Exception as e:
        return SkippedFile(path, "corrupt", f"malformed DICOM SEG header ({type(e).__name__})")


def _seg_header(path: str, ds, st) -> SegHeader:
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    problems = []
    if len(per_frame) != n_frames:
        problems.append(f"{len(per_frame)} per-frame functional groups for {n_frames} frames")
    seg_type = str(ds.get("SegmentationType", "") or "").upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        problems.append(f"SegmentationType {seg_type or 'missing'} is not BINARY, FRACTIONAL or LABELMAP")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or "") for s in ds.get("SegmentSequence") or []}
    if not segments:
        problems.append("no SegmentSequence")

    def fg(item, seq, attr):
        return functional_group(item, shared, seq, attr)

    ipp, iop, ps, seg_no, sources = [], [], [], [], []
    for item in per_frame:
        ipp.append(floats(fg(item, "PlanePositionSequence", "ImagePositionPatient"), 3))
        iop.append(floats(fg(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6))
        ps.append(floats(fg(item, "PixelMeasuresSequence", "PixelSpacing"), 2))
        number = fg(item, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        seg_no.append(int(number) if number is not None else 0)
        refs = set()
        for der in item.get("DerivationImageSequence") or []:
            for src in der.get("SourceImageSequence") or []:
                if "ReferencedSOPInstanceUID" in src:
                    refs.add(str(src.ReferencedSOPInstanceUID))
        sources.append(frozenset(refs))
    missing = [name for name, vals in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop), ("PixelSpacing", ps)) if any(v is None for v in vals)]
    if missing:
        problems.append(f"per-frame {', '.join(missing)} missing; frames cannot be placed in space")
    if seg_type in ("BINARY", "FRACTIONAL") and any(n not in segments for n in seg_no):
        problems.append("frames reference segment numbers absent from SegmentSequence")
    ref_series, ref_instances = [], set()
    for item in ds.get("ReferencedSeriesSequence") or []:
        if "SeriesInstanceUID" in item:
            ref_series.append(str(item.SeriesInstanceUID))
        for inst in item.get("ReferencedInstanceSequence") or []:
            if "ReferencedSOPInstanceUID" in inst:
                ref_instances.add(str(inst.ReferencedSOPInstanceUID))
    for refs in sources:
        ref_instances |= refs
    fill = lambda vals, n: np.array([v if v is not None else (np.nan,) * n for v in vals], float).reshape(-1, n)  # noqa: E731
    return SegHeader(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "") or ""),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        referenced_series=tuple(ref_series),
        referenced_instances=frozenset(ref_instances),
        segmentation_type=seg_type,
        max_fractional_value=int(ds.get("MaximumFractionalValue", 255) or 255),
        segments=segments,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        frame_ipp=fill(ipp, 3),
        frame_iop=fill(iop, 6),
        frame_spacing=fill(ps, 2),
        frame_segment=np.array(seg_no, dtype=np.int64),
        frame_sources=tuple(sources),
        file_size=st.st_size,
        file_mtime_ns=st.st_mtime_ns,
        problem="; ".join(problems),
    )


# --------------------------------------------------------------------------------------------------
# label values


def normalize_label_name(name: str) -> str:
    """Lower-case ``name`` and turn each run of non-alphanumerics into one ``_`` (``"Kidney Left"`` -> ``kidney_left``)."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def map_label_values(
    source: Mapping[int, str], configured: Mapping[int, str] | None, *, what: str
) -> tuple[dict[int, int], str, bool]:
    """Choose the output label value of each source label, by name when possible, else by number.

    Args:
        source: ``{source value (segment number, nnU-Net label value): name}``; background excluded.
        configured: ``{label value: class name}`` of the modality (``data.labels``), or ``None``.
        what: how to name the source in messages (e.g. ``"SEG segments"``).

    Returns:
        ``({source value: output value}, rule sentence for the report, whether mapped by name)``.

    Raises:
        LabelError: ``unknown_label_names`` when some but not all names match the configured ones (mixing
            the two rules could silently give a tumour the value of an organ), or ``label_values`` when a
            value does not fit the uint8 masks.
    """
    by_name = {normalize_label_name(n): v for v, n in (configured or {}).items()}
    hits = {s: by_name.get(normalize_label_name(n)) for s, n in source.items()}
    matched = {s: v for s, v in hits.items() if v is not None}
    listing = ", ".join(f"{s} {n!r}" for s, n in sorted(source.items()))
    if configured and source and len(matched) == len(source):
        rule = f"{what} mapped by name to the configured classes: " + ", ".join(
            f"{s} {source[s]!r} -> {v}" for s, v in sorted(matched.items())
        )
        return dict(matched), rule, True
    if matched:
        unknown = sorted(source[s] for s in source if s not in matched)
        raise LabelError(
            "unknown_label_names",
            f"{what} {', '.join(map(repr, unknown))} match none of the configured class names "
            f"({', '.join(sorted(by_name))}) while others do; rename them or add them to data.labels",
        )
    too_big = sorted(s for s in source if not 0 < s <= MAX_LABEL_VALUE)
    if too_big:
        raise LabelError("label_values", f"{what} {too_big} do not fit a uint8 mask (1..{MAX_LABEL_VALUE})")
    rule = f"{what} used by number ({listing})"
    if configured:
        rule += "; their names match none of the configured class names, check that the numbers mean the configured classes"
    return {int(s): int(s) for s in source}, rule, False


# --------------------------------------------------------------------------------------------------
# matching and placement


def choose_part(seg: SegHeader, parts: list[SeriesPlan]) -> int | None:
    """Index of the accepted part of one SeriesInstanceUID that ``seg`` labels, ``None`` if no part is accepted.

    By referenced SOP instances first; without instance references, the first accepted part the frames
    fit on, else the largest accepted part (which then reports the mismatch).
    """
    accepted = [i for i, p in enumerate(parts) if p.accepted]
    if not accepted:
        return None
    if seg.referenced_instances:
        hits = {i: len(seg.referenced_instances & {s.sop_instance_uid for s in parts[i].slices}) for i in accepted}
        best = max(accepted, key=lambda i: (hits[i], len(parts[i].slices)))
        if hits[best]:
            return best
    for i in accepted:
        try:
            place_seg(seg, parts[i], None, what="SEG")
            return i
        except LabelError:
            continue
    return max(accepted, key=lambda i: len(parts[i].slices))


def place_seg(seg: SegHeader, plan: SeriesPlan, label_names: Mapping[int, str] | None, *, what: str) -> SegPlacement:
    """Check that the SEG's frames lie on the voxel centres of ``plan``'s source slices and say where.

    Pure header arithmetic, no pixel data. ``what`` names the SEG in messages (its relative path).

    Raises:
        LabelError: ``seg_unusable`` (malformed SEG), ``label_mismatch`` (different frame of reference,
            orientation, spacing, or a frame off the grid), ``unknown_label_names`` / ``label_values``.
    """
    if seg.problem:
        raise LabelError("seg_unusable", f"DICOM SEG {what}: {seg.problem}; fix or remove the SEG")
    first = plan.slices[0]
    if seg.frame_of_reference_uid and first.frame_of_reference_uid and seg.frame_of_reference_uid != first.frame_of_reference_uid:
        raise LabelError(
            "label_mismatch",
            f"DICOM SEG {what} uses another FrameOfReferenceUID than the image; its positions cannot be compared "
            "with the image's (not resampled)",
        )
    frames = np.arange(seg.n_frames)
    if len(set(seg.referenced_series)) > 1:
        # A SEG over several series: keep the frames drawn on this one (or naming no source at all).
        sops = {s.sop_instance_uid for s in plan.slices}
        frames = np.array([i for i in frames if not seg.frame_sources[i] or seg.frame_sources[i] & sops], dtype=int)

    iop = np.asarray(first.iop, float)
    u, v, nrm = slice_frame(iop)  # an accepted plan has a valid orientation
    drow, dcol = first.pixel_spacing
    ipp = np.array([s.ipp for s in plan.slices], float)
    rel = plan.positions if plan.positions is not None else (ipp - ipp[0]) @ nrm
    step = float(np.median(np.diff(rel))) if len(rel) > 1 else max(drow, dcol)
    n_img_cols, n_img_rows = first.cols, first.rows

    bad_iop = np.nonzero(np.any(np.abs(seg.frame_iop[frames] - iop) > ORIENTATION_TOL, axis=1))[0]
    if len(bad_iop):
        f = frames[bad_iop[0]]
        raise LabelError(
            "label_mismatch",
            f"DICOM SEG {what}: {len(bad_iop)} frame(s) oriented {_fmt(seg.frame_iop[f])}, the image "
            f"{_fmt(iop)}; fix or remove the SEG (not resampled)",
        )
    ps_err = np.abs(seg.frame_spacing[frames] / np.array([drow, dcol]) - 1) * max(seg.rows, seg.cols)
    if len(frames) and float(ps_err.max()) > LABEL_TOL_VOXELS:
        f = frames[int(np.argmax(ps_err.max(axis=1)))]
        raise LabelError(
            "label_mismatch",
            f"DICOM SEG {what}: PixelSpacing {_fmt(seg.frame_spacing[f])} mm, the image {_fmt((drow, dcol))} mm; "
            "fix or remove the SEG (not resampled)",
        )
    d = (seg.frame_ipp[frames] - ipp[0]) @ nrm
    k = np.clip(np.searchsorted(rel, d), 1, max(len(rel) - 1, 1)) if len(rel) > 1 else np.zeros(len(d), int)
    if len(rel) > 1:
        k = np.where(np.abs(rel[k - 1] - d) <= np.abs(rel[k] - d), k - 1, k)
    off_normal = np.abs(rel[k] - d) / step
    inplane = seg.frame_ipp[frames] - ipp[k]
    ab = np.stack([(inplane @ u) / dcol, (inplane @ v) / drow], axis=1)
    ab_int = np.rint(ab).astype(int)
    off_plane = np.max(np.abs(ab - ab_int), axis=1) if len(frames) else np.zeros(0)
    outside = (
        (ab_int[:, 0] < 0) | (ab_int[:, 1] < 0) | (ab_int[:, 0] + seg.cols > n_img_cols) | (ab_int[:, 1] + seg.rows > n_img_rows)
    )
    bad = np.nonzero((off_normal > LABEL_TOL_VOXELS) | (off_plane > LABEL_TOL_VOXELS) | outside)[0]
    if len(bad):
        j = bad[0]
        if off_normal[j] > LABEL_TOL_VOXELS:
            why = f"lies {off_normal[j] * step:.3f} mm ({off_normal[j]:.3f} slices) from the nearest image slice"
        elif off_plane[j] > LABEL_TOL_VOXELS:
            why = f"lies {off_plane[j]:.3f} pixels off the image's voxel centres in-plane"
        else:
            why = f"({seg.rows}x{seg.cols} pixels at offset {tuple(int(x) for x in ab_int[j])}) extends outside the {n_img_rows}x{n_img_cols} image"
        raise LabelError(
            "label_mismatch",
            f"DICOM SEG {what}: {len(bad)} of {len(frames)} frame(s) do not lie on the image grid, e.g. frame "
            f"{int(frames[j]) + 1} {why} (tolerance {LABEL_TOL_VOXELS} voxel); fix or remove the SEG (not resampled)",
        )
    # LABELMAP SEGs may describe the background as segment 0: it stays 0.
    source = {n: seg.segments[n] for n in sorted(seg.segments) if n != 0}
    values, rule, by_name = map_label_values(source, label_names, what="SEG segments")
    return SegPlacement(seg=seg, frames=frames, slice_index=k, offset=ab_int, values=values, rule=rule, by_name=by_name)


def _fmt(vals) -> str:
    return "[" + ", ".join(f"{float(x):.4g}" for x in vals) + "]"


# --------------------------------------------------------------------------------------------------
# pixel data


def read_seg_label(placement: SegPlacement, plan: SeriesPlan, *, what: str) -> tuple[np.ndarray, int]:
    """Decode the SEG frames onto ``plan``'s output grid: ``((x, y, z) uint8 mask, overlapping voxels)``.

    Frames are decoded one at a time. Where segments overlap, the higher segment number wins. The plan's
    gantry-tilt and spacing corrections are applied with nearest-neighbour interpolation.

    Raises:
        LabelError: ``seg_unusable`` when the pixel data cannot be decoded (the message names ``what``).
    """
    from pydicom.pixels import iter_pixels

    seg = placement.seg
    first = plan.slices[0]
    owner = np.zeros((first.cols, first.rows, len(plan.slices)), dtype=np.uint16, order="F")
    where = {int(f): (int(k), int(a), int(b)) for f, k, (a, b) in zip(placement.frames, placement.slice_index, placement.offset)}
    overlap = 0
    threshold = (seg.max_fractional_value + 1) // 2 if seg.segmentation_type == "FRACTIONAL" else 1
    try:
        for i, frame in enumerate(iter_pixels(seg.path)):
            if i not in where:
                continue
            k, a, b = where[i]
            if frame.shape != (seg.rows, seg.cols):
                raise ValueError(f"frame shape {frame.shape}")
            region = owner[a : a + seg.cols, b : b + seg.rows, k]  # a view: writes land in `owner`
            if seg.segmentation_type == "LABELMAP":
                m = frame.T > 0
                region[m] = frame.T[m]
                continue
            number = int(seg.frame_segment[i])
            m = frame.T >= threshold
            overlap += int(np.count_nonzero(m & (region != 0) & (region != number)))
            region[m & (region < number)] = number
    except LabelError:
        raise
    except Exception as e:
        raise LabelError("seg_unusable", f"DICOM SEG {what}: pixel data cannot be decoded ({type(e).__name__}); re-export it") from None
    lut = np.zeros(1 << 16, dtype=np.uint8)
    for number, value in placement.values.items():
        lut[number] = value
    lab = lut[owner]
    if plan.inplane_shift is not None or plan.target_positions is not None:
        lab = resample_label_like(plan, lab)
    return np.asarray(lab, dtype=np.uint8, order="F"), overlap
