"""DICOM series assembly: header scan, grouping, slice order, geometry, checks and pixel reading.

Scanner exports are read the way the DICOM standard defines them, not the way folders look:

* Files are read with ``stop_before_pixels=True`` first; a file is what its header says, whatever its name.
* Slices are grouped by SeriesInstanceUID and split further when their geometry differs (orientation,
  rows/columns, pixel spacing). When a split volume still has two slices at one position, it is split by
  echo, temporal position, b-value, stack or acquisition number, whichever separates the duplicates.
* Slices are sorted along the slice normal ``cross(row_dir, col_dir)`` by ImagePositionPatient, never by
  InstanceNumber or file name, and the slice spacing comes from the positions, never from SliceThickness or
  SpacingBetweenSlices.
* Enhanced (multi-frame) CT and MR are expanded into one slice per frame from the per-frame functional
  groups, then treated like classic series.

Voxel order of the volumes built here (and of the NIfTI files that ingest writes): axis 0 is the column
index (along a row, direction = first ImageOrientationPatient triplet), axis 1 the row index (second
triplet), axis 2 the slices in ascending position along the normal. The affine maps voxel indices to RAS mm:
``diag(-1, -1, 1, 1) @ [row_dir*dcol | col_dir*drow | normal*dslice | IPP_first]`` (DICOM is LPS).

Checks, each reported by name, and what happens to the series:

=====================  =========================================================================
check                  outcome
=====================  =========================================================================
unsupported_modality   rejected: only CT and MR are ingested (CR, US, NM, RTDOSE ... are listed).
multiple_patients      rejected: one SeriesInstanceUID carries several PatientIDs.
mixed_frames_of_ref.   rejected (``mixed_frames_of_reference``): positions are not comparable.
localizer              rejected: ImageType contains LOCALIZER/SCOUT, or the volume has 1-2 slices.
too_few_slices         rejected: 3 or more slices but fewer than ``min_slices`` (an ingest option).
missing_geometry       rejected: ImagePositionPatient, ImageOrientationPatient or PixelSpacing missing.
invalid_orientation    rejected: ImageOrientationPatient is not two orthonormal vectors.
unsupported_pixels     rejected: colour or multi-sample pixels, or an unknown bit depth.
unsupported_compression rejected: no installed decoder for the transfer syntax (the detail names it).
duplicate_positions    rejected, unless the duplicates are the same SOP instance exported twice (then
                       the copies are dropped with the warning ``duplicate_files``) or another header
                       (echo, temporal position, b-value, stack, acquisition) separates them.
missing_slices         rejected: a step between neighbouring slices is more than 1.5x the median step
                       (a missing slice or a gap); interpolating across it would invent anatomy.
mixed_orientations     corrected (warning): one UID with several orientations is split into several
                       series (``series_key-1``, ``-2`` ...), each checked on its own.
mixed_geometry         corrected (warning): the same split when slices differ in Rows/Columns or
                       PixelSpacing; the detail names the attribute and its values.
gantry_tilt            corrected (warning): the slices are sheared against the normal by more than
                       ``TILT_TOL_VOXELS`` (1/4) of a pixel over the stack (straight-line fit of their
                       in-plane offsets), or one strays more than ``STRAY_TOL_VOXELS`` (1/2); each
                       slice is shifted in-plane (linear interpolation) onto an orthogonal grid that is
                       enlarged along the shift, so that no pixel is cropped (see below); the detail
                       gives the angle and the growth in voxels.
non_uniform_spacing    corrected (warning): some position lies more than ``NON_UNIFORM_TOL_VOXELS``
                       (1/4) of the slice step off the uniform grid from the first to the last slice,
                       or some step differs from the median step by more than ``STEP_TOL_VOXELS``
                       (1/5 of it); the volume is resampled linearly along the normal to the median step.
=====================  =========================================================================

Within tolerance, the slices are stacked as they are (no interpolation, no change of grid) at a spacing of
``(last - first) / (n - 1)`` along the normal, and the report carries at most an informational detail
(``position_jitter_inplane``, ``position_jitter_normal``: not a warning) when the deviation exceeds
``NOTE_VOXELS`` (1/100 voxel).

Tolerances for real scanners. Headers round ImagePositionPatient (to 0.1 mm, or to 2 decimals; 0.05-0.07 mm
of jitter is common) and reconstructions carry apparent shears of a few hundredths of a degree; both are
far below a voxel, and interpolating a whole volume to "correct" them only blurs it. Both tolerances are
therefore fractions of a voxel: a slice stacked as is lies at most 1/4 voxel from its true place, half of
the half-voxel within which nearest-neighbour resampling would not move it at all. Steps may differ from
the median step by 1/5 of it: rounding to 0.1 mm moves a step by at most 0.1 mm and 0.07 mm jitter by 0.14
mm, both within 1/5 of slices of 0.5 mm and 0.7 mm and up; a real change of step (a 6.5 mm step among 5 mm
ones) is more, and is resampled as before; dcm2niix's own step rule (0.2 mm, below) is the same at 1 mm.
The tools users compare with accept at least as much (read in the dcm2niix source, rordenlab/dcm2niix as of December 2024, and in
ITK's ImageSeriesReader; the tests compare with the dcm2niix wheel, v1.0.20260724):

* dcm2niix estimates the gantry tilt from the first-to-last slice vector and treats it as zero while
  ``cos(angle) >= 1 - 1e-4`` (``computeGantryTiltPrecise``, ``isSameFloatGE``), i.e. below about 0.81 degrees,
  which over a 300 mm CT stack of 0.7 mm pixels is about 6 voxels of shear; it calls slice distances
  uneven only when a step differs from the first by more than 0.2 mm (``kSliceTolerance``) and even then
  writes the volume as stacked (the resampled copy is an extra ``_Eq`` file).
* ITK's ImageSeriesReader (with GDCM's IPP sorting) never resamples: it stacks the slices in position order
  and only warns ("Non uniform sampling or missing slices detected") above 1e-4 of the spacing.

So a series within these tolerances gets the grid dcm2niix writes as its main output (same shape, same
voxel values in the same world order; ``tests/ingest/test_scanner_tolerances.py`` checks it against the
dcm2niix wheel). The tilt limit is tighter than dcm2niix's: a real tilt of a degree or more is corrected,
exactly as before, once the stack spans ~15 pixels (a 0.7 mm pixel: 10 mm, a few slices). Spacing is
resampled where a step is uneven (or positions a quarter slice off the grid), where dcm2niix keeps the
stacked volume and adds an ``_Eq`` copy. dcm2niix takes the slice spacing from the first two positions, so
on a jittered stack its world positions drift by up to a fraction of a slice at the far end; medmtl's
``(last - first) / (n - 1)`` keeps every slice within the tolerance. Missing slices are rejected as before.

Gantry-tilt grid. Slice ``k`` sits ``s_k`` voxels in-plane from the line through the first slice along the
normal. The output grid keeps the first slice's pixel lattice and grows by ``ceil(max_k s_k)`` voxels on the
side the slices move to and ``ceil(-min_k s_k)`` on the other, per in-plane axis (only axes with a shift
grow, as dcm2niix does), so every source pixel centre lands inside it; the affine origin moves with the
low side, so world coordinates stay exact. A source slice covers its pixels' footprints (half a pixel
beyond the outer centres): output voxels inside that footprint are interpolated (clamped to the edge pixel
in the outer half pixel), voxels outside it hold the background value: ``CT_BACKGROUND_HU`` for CT, the
volume minimum for MR. Labels get the same shift, nearest neighbour, and 0 outside the footprint, so image
and label agree on where data exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medmtl.errors import IngestError
from medmtl.ingest.common import Findings, SkippedFile, as_list, floats, functional_group, slice_frame

log = logging.getLogger(__name__)

# SOP classes handled specially (values from DICOM PS3.4).
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_SOP_CLASSES = (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE)
SUPPORTED_MODALITIES = ("CT", "MR")
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"

LOCALIZER_IMAGE_TYPES = ("LOCALIZER", "SCOUT")
# Orientation vectors closer than this (per component) are the same orientation.
ORIENTATION_TOL = 1e-3
# In-plane offset, in voxels, above which slices count as sheared (gantry tilt); see the module docstring.
TILT_TOL_VOXELS = 0.25
# A slice further than this (in voxels) in-plane from the straight stack is shifted even without a shear.
STRAY_TOL_VOXELS = 0.5
# Shifts within this of a whole voxel count as that whole voxel when the tilt-corrected grid is enlarged
# (header rounding must not add a row of pure background).
GROWTH_ROUNDING_VOXELS = 0.01
# Deviations (in voxels) within tolerance but above this get an informational detail in the report.
NOTE_VOXELS = 0.01
# Value of CT voxels that no source pixel covers (the margin added by gantry-tilt correction): air at the
# bottom of the usual CT scale, i.e. stored value 0 under the common RescaleIntercept -1024. Not "the
# minimum representable": for signed pixels that is -32768 + intercept, not air. Never 0 HU (water, soft
# tissue). Scanner padding outside the reconstruction circle (-2000, -3024 HU) is lower and kept as stored.
CT_BACKGROUND_HU = -1024.0
# A label (NIfTI mask or DICOM SEG) matches its image when every voxel lands within this fraction of a
# voxel of an image voxel centre.
LABEL_TOL_VOXELS = 1e-3
# Two slices closer than this along the normal share a position.
DUPLICATE_TOL_MM = 1e-3
# A step more than this times the median step is a missing slice or gap.
GAP_FACTOR = 1.5
# Positions further than this fraction of the slice step from a uniform grid are resampled; see the module
# docstring.
NON_UNIFORM_TOL_VOXELS = 0.25
# A step further than this fraction of the median step from it is uneven spacing, not header rounding.
STEP_TOL_VOXELS = 0.2
# Headers that may separate duplicate positions within one geometric series, in the order tried.
SPLIT_KEYS = ("echo", "temporal", "bvalue", "stack", "acquisition", "image_type")


@dataclass(frozen=True)
class SliceHeader:
    """Everything ingest needs from one slice (one file, or one frame of a multi-frame file).

    Holds source identifiers (``patient_id``, UIDs) in memory only: they are pseudonymized before anything
    is written or logged.
    """

    path: str
    frame: int | None
    sop_instance_uid: str
    series_uid: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str
    transfer_syntax: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    slope: float
    intercept: float
    rwv: tuple[float, float] | None  # real-world value mapping (slope, intercept)
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    split_values: tuple  # values of SPLIT_KEYS, same order
    file_size: int
    file_mtime_ns: int
    # where the pixel values start in the file and their dtype, when they can be read without pydicom
    data_offset: int | None = None
    stored_dtype: str | None = None
    bits_stored: int = 0


@dataclass
class SeriesCandidate:
    """Slices of one SeriesInstanceUID that share one geometry (``part`` of ``n_parts``, 1-based)."""

    series_uid: str
    slices: list[SliceHeader]
    part: int = 1
    n_parts: int = 1
    warnings: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)


@dataclass
class SeriesPlan(Findings):
    """Outcome of the checks on one candidate, and how to build its volume when accepted.

    Attributes:
        slices: slices sorted along the normal.
        reasons: names of the checks that reject the series (empty when accepted).
        warnings: names of the checks that corrected or flagged it.
        details: one human sentence per reason/warning name (no PHI).
        affine: RAS affine of the output grid (4x4), ``None`` when rejected before geometry.
        shape: output grid ``(x, y, z)``.
        source_affine: sheared affine of the un-corrected grid for gantry-tilted series, else ``None``.
        source_shape: ``(cols, rows, slices)`` of that un-corrected grid, else ``None``.
        inplane_shift: ``(slices, 2)`` per slice ``(axis0, axis1)`` position, in output voxels, of the slice's
            first pixel on the (enlarged) output grid: ``out[i, j] = src[i - a_k, j - b_k]``; ``None``
            without tilt.
        tilt_growth: ``(axis0, axis1)`` voxels the tilt-corrected grid grew by, else ``None``.
        positions: slice positions along the normal relative to the first slice (mm).
        target_positions: resampling targets along the normal when spacing was corrected, else ``None``.
    """

    candidate: SeriesCandidate
    modality: str
    slices: list[SliceHeader]
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    affine: np.ndarray | None = None
    shape: tuple[int, int, int] | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, int, int] | None = None
    inplane_shift: np.ndarray | None = None
    tilt_growth: tuple[int, int] | None = None
    positions: np.ndarray | None = None
    target_positions: np.ndarray | None = None

    @property
    def accepted(self) -> bool:
        """True when no check rejected the series."""
        return not self.reasons

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """Voxel size in mm along the three output axes."""
        if self.affine is None:
            return None
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))



class SeriesReadError(IngestError, RuntimeError):
    """Pixel data of one slice could not be read; ``reason`` is the check name for the report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class LabelError(IngestError, RuntimeError):
    """A label (NIfTI mask or DICOM SEG) cannot be used for its series; ``reason`` is the check name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# header scan


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value-validation warnings and log lines while ingest runs.

    pydicom quotes offending element values in those messages (an invalid birth date, a malformed name),
    which would put PHI into the user's log; the checks that matter are ingest's own.
    """
    cfg = pydicom.config.settings
    old_mode = cfg.reading_validation_mode
    pd_log = logging.getLogger("pydicom")
    old_disabled = pd_log.disabled
    cfg.reading_validation_mode = pydicom.config.IGNORE
    pd_log.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
            yield
    finally:
        cfg.reading_validation_mode = old_mode
        pd_log.disabled = old_disabled


def scan_file(path: str) -> list[SliceHeader] | SkippedFile:
    """Read one file's header (no pixel data) and return its slices, or why it is skipped.

    Never raises for bad input: empty, non-DICOM, corrupt, truncated, DICOMDIR, SEG and non-image objects
    (SR, RTSTRUCT, presentation states ...) come back as :class:`SkippedFile` with a reason name. The
    returned ``SkippedFile.path`` is the absolute path; callers make it relative before reporting it.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return SkippedFile(path, "unreadable", f"cannot stat ({type(e).__name__})")
    if st.st_size == 0:
        return SkippedFile(path, "empty_file", "zero-length file")
    try:
        # Opened read-only; the export is never written.
        with open(path, "rb") as f:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except InvalidDicomError:
                # No preamble: old ACR-NEMA style files still start with a group 0x0008 tag.
                f.seek(0)
                if f.read(2) not in (b"\x08\x00", b"\x02\x00"):
                    return SkippedFile(path, "not_dicom", "no DICOM preamble or header")
                f.seek(0)
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            pixel_offset = f.tell()
            # stop_before_pixels leaves the file at the pixel data tag (7FE0,00xx), or at its end when the
            # file has none: a slice without pixel data is not a truncated one.
            # (A deflated data set is read through zlib: the file position says nothing there.)
            meta = getattr(ds, "file_meta", None)
            deflated = meta is not None and str(meta.get("TransferSyntaxUID", "")) == DEFLATED
            element = b"" if deflated else f.read(12)
            has_pixel_tag = deflated or element[:2] in (b"\xe0\x7f", b"\x7f\xe0")
    except PermissionError:
        return SkippedFile(path, "unreadable", "permission denied; make the export readable by this user")
    except Exception as e:  # pydicom raises many types on corrupt input; none may stop the ingest
        # The exception message may quote element values (PHI), so only its type is reported.
        return SkippedFile(path, "corrupt", f"header unreadable ({type(e).__name__})")
    try:
        slices = _slices_from_header(path, ds, st, pixel_offset, has_pixel_tag)
        if isinstance(slices, list) and len(slices) == 1 and has_pixel_tag and not deflated:
            slices = [_with_raw_pixels(slices[0], ds, element, pixel_offset)]
        return slices
    except Exception as e:
        return SkippedFile(path, "corrupt", f"malformed header ({type(e).__name__})")


class _HeaderValues:
    """``get(keyword, default)`` of a header read by pydicom, decoding the charset-independent value
    representations (UI, CS, DS, IS, US, SS, UL, SL, FD, FL) straight from pydicom's raw elements.

    pydicom converts a raw element on first access through several layers (character set, validation,
    value objects), which costs as much as reading the file; these VRs are ASCII or binary by the standard,
    so their bytes are decoded here: strings without their trailing padding, multi-values split at ``\\`` into lists,
    binary numbers unpacked in the file's byte order. Anything else (text in a character set, sequences,
    elements pydicom already converted) goes through ``ds.get``, so values are what pydicom would give.
    """

    _STRING_VRS = ("UI", "CS", "DS", "IS")
    _BINARY_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FD": "d", "FL": "f"}

    def __init__(self, ds):
        self.ds = ds
        self._elements = getattr(ds, "_dict", None)

    def get(self, keyword: str, default=None):
        """Value of the element named ``keyword`` (a list for several values), ``default`` when absent."""
        tag = tag_for_keyword(keyword)
        elem = self._elements.get(tag) if self._elements is not None and tag is not None else None
        if not isinstance(elem, RawDataElement):
            return self.ds.get(keyword, default)
        vr = elem.VR or dictionary_VR(tag)
        raw = elem.value
        if not raw:
            return self.ds.get(keyword, default)
        if vr in self._STRING_VRS:
            # as pydicom: the value's trailing padding goes, spaces inside a multi-value stay
            parts = raw.decode("ascii", "replace").rstrip(" \x00").split("\\")
            return parts[0] if len(parts) == 1 else parts
        fmt = self._BINARY_VRS.get(vr)
        if fmt is None or len(raw) % struct.calcsize(fmt):
            return self.ds.get(keyword, default)
        vals = struct.unpack(("<" if elem.is_little_endian else ">") + fmt * (len(raw) // struct.calcsize(fmt)), raw)
        return vals[0] if len(vals) == 1 else list(vals)


def _with_raw_pixels(s: SliceHeader, ds, element: bytes, pixel_offset: int) -> SliceHeader:
    """``s`` with the byte offset and dtype of its pixel values when they can be read straight from the file.

    Native little-endian, single frame, one sample of 8/16/32 bits, with a defined length covering the
    frame: then :func:`read_volume` reads the values with one ``np.fromfile`` instead of parsing the file
    again with pydicom (and masks unused high bits as pydicom does). Anything else keeps ``data_offset``
    ``None`` and is decoded by pydicom.
    """
    if s.transfer_syntax not in (IMPLICIT_LE, EXPLICIT_LE) or s.samples_per_pixel != 1 or s.bits_allocated not in (8, 16, 32):
        return s
    if len(element) < 12 or element[:4] != b"\xe0\x7f\x10\x00":
        return s
    if s.transfer_syntax == EXPLICIT_LE and element[4:6] in (b"OB", b"OW", b"OD", b"OF", b"OL", b"UN"):
        length, start = int.from_bytes(element[8:12], "little"), pixel_offset + 12
    elif s.transfer_syntax == EXPLICIT_LE:
        length, start = int.from_bytes(element[6:8], "little"), pixel_offset + 8
    else:
        length, start = int.from_bytes(element[4:8], "little"), pixel_offset + 8
    nbytes = s.rows * s.cols * s.bits_allocated // 8
    if length == 0xFFFFFFFF or length < nbytes or start + nbytes > s.file_size:
        return s
    hv = _HeaderValues(ds)
    signed = int(hv.get("PixelRepresentation", 0) or 0) == 1
    bits_stored = int(hv.get("BitsStored", s.bits_allocated) or s.bits_allocated)
    if not 0 < bits_stored <= s.bits_allocated:
        return s
    dtype = f"<{'i' if signed else 'u'}{s.bits_allocated // 8}"
    return dataclasses.replace(s, data_offset=start, stored_dtype=dtype, bits_stored=bits_stored)


def _slices_from_header(path, ds, st, pixel_offset, has_pixel_tag=True) -> list[SliceHeader] | SkippedFile:
    meta = getattr(ds, "file_meta", None)
    hv = _HeaderValues(ds)
    sop_class = str(hv.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return SkippedFile(path, "dicomdir", _dicomdir_detail(path, ds))
    sop_name = UID(sop_class).name if sop_class else "unknown SOP class"
    if sop_class in SEG_SOP_CLASSES:
        # Not an image: ingest reads SEG objects separately (medmtl.ingest.dicom_seg) as labels.
        return SkippedFile(path, "dicom_seg", f"{sop_name}; used as a label when it references an ingested series")
    if "Rows" not in ds or "Columns" not in ds:
        if "Image" in sop_name:
            return SkippedFile(path, "no_pixel_data", f"{sop_name} without pixel data")
        return SkippedFile(path, "non_image", sop_name)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if not tsyntax:
        tsyntax = "1.2.840.10008.1.2"  # no meta header: implicit VR little endian by definition
    n_frames = int(hv.get("NumberOfFrames", 1) or 1)
    rows, cols = int(hv.get("Rows")), int(hv.get("Columns"))
    spp = int(hv.get("SamplesPerPixel", 1) or 1)
    bits = int(hv.get("BitsAllocated", 16) or 16)
    if not has_pixel_tag and "PixelData" not in ds:
        return SkippedFile(path, "no_pixel_data", f"{sop_name} with Rows/Columns but no PixelData element; re-export it")
    if _is_native(tsyntax) and "PixelData" not in ds:
        expected = rows * cols * n_frames * spp * bits // 8
        # stop_before_pixels leaves the file at the PixelData tag; a shorter file lost its pixel data.
        if st.st_size < pixel_offset + 8 + expected:
            return SkippedFile(
                path, "truncated", f"file ends before its {expected}-byte pixel data; re-export it"
            )
    common = dict(
        path=path,
        sop_instance_uid=str(hv.get("SOPInstanceUID", "")),
        series_uid=str(hv.get("SeriesInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(hv.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(hv.get("FrameOfReferenceUID", "") or ""),
        modality=str(hv.get("Modality", "") or ""),
        sop_class_uid=sop_class,
        transfer_syntax=tsyntax,
        rows=rows,
        cols=cols,
        samples_per_pixel=spp,
        photometric=str(hv.get("PhotometricInterpretation", "MONOCHROME2")),
        bits_allocated=bits,
        file_size=st.st_size,
        file_mtime_ns=st.st_mtime_ns,
    )
    image_type = tuple(str(v).upper() for v in as_list(_optional(hv, "ImageType") or ()))
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, common, image_type, n_frames)
    if n_frames > 1:
        # Classic multi-frame (cine, NM, US): no per-frame positions, cannot form a 3D grid.
        return [
            SliceHeader(
                frame=i, image_type=image_type + ("MULTIFRAME_CLASSIC",), pixel_spacing=floats(hv.get("PixelSpacing")),
                iop=None, ipp=None, slope=1.0, intercept=0.0, rwv=None, split_values=(i,) * len(SPLIT_KEYS),
                **common,
            )
            for i in range(n_frames)
        ]
    split_values = (
        _num(_optional(hv, "EchoNumbers")),
        _num(_optional(hv, "TemporalPositionIdentifier")),
        _num(_optional(hv, "DiffusionBValue")),
        None,
        _num(_optional(hv, "AcquisitionNumber")),
        image_type,
    )
    return [
        SliceHeader(
            frame=None,
            image_type=image_type,
            pixel_spacing=floats(hv.get("PixelSpacing"), 2),
            iop=floats(hv.get("ImageOrientationPatient"), 6),
            ipp=floats(hv.get("ImagePositionPatient"), 3),
            slope=float(hv.get("RescaleSlope", 1) or 1),
            intercept=float(hv.get("RescaleIntercept", 0) or 0),
            rwv=_rwv(ds),
            split_values=split_values,
            **common,
        )
    ]


def _dicomdir_detail(path: str, ds) -> str:
    """Say how many files the DICOMDIR lists and how many of them are missing (counts only: no paths)."""
    listed = missing = 0
    base = os.path.dirname(path)
    for rec in ds.get("DirectoryRecordSequence", []):
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        listed += 1
        parts = [ref] if isinstance(ref, str) else list(ref)
        if not os.path.exists(os.path.join(base, *parts)):
            missing += 1
    text = f"DICOMDIR index listing {listed} file(s); files are found by walking the export"
    if missing:
        text += f"; {missing} listed file(s) are missing from the export (incomplete copy?)"
    return text


def _enhanced_frames(ds, common, image_type, n_frames) -> list[SliceHeader]:
    """One SliceHeader per frame of an enhanced CT/MR file, from per-frame then shared functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.PerFrameFunctionalGroupsSequence

    def fg(item, seq, attr):
        return functional_group(item, shared, seq, attr)

    out = []
    for i in range(min(n_frames, len(per_frame))):
        item = per_frame[i]
        frame_type = fg(item, "MRImageFrameTypeSequence", "FrameType") or fg(item, "CTImageFrameTypeSequence", "FrameType")
        rwv = None
        rwv_slope = fg(item, "RealWorldValueMappingSequence", "RealWorldValueSlope")
        if rwv_slope is not None:
            rwv = (float(rwv_slope), float(fg(item, "RealWorldValueMappingSequence", "RealWorldValueIntercept") or 0))
        slope = fg(item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = fg(item, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None:
            slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
        split_values = (
            _num(fg(item, "MREchoSequence", "EffectiveEchoTime")),
            _num(fg(item, "FrameContentSequence", "TemporalPositionIndex")),
            _num(fg(item, "MRDiffusionSequence", "DiffusionBValue")),
            fg(item, "FrameContentSequence", "StackID"),
            None,
            tuple(str(v).upper() for v in as_list(frame_type or ())),
        )
        out.append(
            SliceHeader(
                frame=i,
                image_type=image_type + tuple(str(v).upper() for v in as_list(frame_type or ())),
                pixel_spacing=floats(fg(item, "PixelMeasuresSequence", "PixelSpacing"), 2),
                iop=floats(fg(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                ipp=floats(fg(item, "PlanePositionSequence", "ImagePositionPatient"), 3),
                slope=float(slope if slope not in (None, "") else 1),
                intercept=float(intercept if intercept not in (None, "") else 0),
                rwv=rwv,
                split_values=split_values,
                **common,
            )
        )
    return out


def _optional(ds, keyword):
    """Value of an optional element, or None when it is absent or its value does not parse.

    A malformed optional element (an IS holding letters) must not cost the slice: that would turn a
    harmless header defect into a missing slice.
    """
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _rwv(ds) -> tuple[float, float] | None:
    seq = ds.get("RealWorldValueMappingSequence")
    if not seq:
        return None
    item = seq[0]
    if "RealWorldValueSlope" not in item:
        return None  # LUT-based mappings are not applied; modality rescale is used instead
    return float(item.RealWorldValueSlope), float(item.get("RealWorldValueIntercept", 0) or 0)


def _is_native(tsyntax: str) -> bool:
    return tsyntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


def _num(v):
    try:
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return str(v)


# --------------------------------------------------------------------------------------------------
# grouping


def assemble_series(slices: list[SliceHeader]) -> list[SeriesCandidate]:
    """Group slices into candidate volumes: by SeriesInstanceUID, then by geometry, then by the first
    header in ``SPLIT_KEYS`` that separates slices sharing a position.

    Exact duplicates (same SOPInstanceUID and frame, e.g. one instance exported into two folders) are
    dropped with the warning ``duplicate_files``. Candidates come back in a deterministic order.
    """
    by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
    for s in slices:
        by_uid[s.series_uid].append(s)
    out: list[SeriesCandidate] = []
    for uid in sorted(by_uid):
        group = sorted(by_uid[uid], key=lambda s: (s.path, s.frame or 0))
        unique, n_dup = _drop_exact_duplicates(group)
        parts = []
        for geo in _split_by_geometry(unique):
            parts.extend(_split_duplicates(geo))
        split_notes = _geometry_split_notes(parts)
        for i, part in enumerate(parts, 1):
            cand = SeriesCandidate(series_uid=uid, slices=part, part=i, n_parts=len(parts))
            if n_dup:
                cand.warnings.append("duplicate_files")
                cand.details["duplicate_files"] = f"{n_dup} file(s) repeat an instance already read; copies ignored"
            for name, detail in split_notes.items():
                cand.warnings.append(name)
                cand.details[name] = detail
            out.append(cand)
    return out


def _geometry_split_notes(parts: list[list[SliceHeader]]) -> dict[str, str]:
    """Warnings for a UID split by geometry: ``mixed_orientations`` when orientations differ,
    ``mixed_geometry`` naming the attribute (Rows/Columns, PixelSpacing) when the matrix or spacing does."""
    keys = list(dict.fromkeys(_geometry_key(p[0]) for p in parts))
    if len(keys) < 2:
        return {}
    notes = {}
    fmt = {
        "Rows/Columns": lambda k: f"{k[0]}x{k[1]}",
        "PixelSpacing": lambda k: "x".join(f"{v:g}" for v in k[2]) if k[2] else "missing",
    }
    differing = [name for name, idx in (("Rows/Columns", (0, 1)), ("PixelSpacing", (2,)))
                 if len({tuple(k[i] for i in idx) for k in keys}) > 1]
    if differing:
        values = "; ".join(f"{name} " + " vs ".join(dict.fromkeys(fmt[name](k) for k in keys)) for name in differing)
        notes["mixed_geometry"] = (
            f"slices of the source series differ in {' and '.join(differing)} ({values}); split into "
            f"{len(parts)} series checked separately"
        )
    if len({k[3] for k in keys}) > 1:
        notes["mixed_orientations"] = (
            f"the source series held {len({k[3] for k in keys})} different orientations; split into {len(parts)} "
            "series checked separately"
        )
    return notes


def _drop_exact_duplicates(group):
    seen, unique = set(), []
    for s in group:
        key = (s.sop_instance_uid, s.frame)
        if s.sop_instance_uid and key in seen:
            continue
        seen.add(key)
        unique.append(s)
    return unique, len(group) - len(unique)


def _geometry_key(s: SliceHeader):
    iop = tuple(round(v / ORIENTATION_TOL) for v in s.iop) if s.iop else None
    ps = tuple(round(v, 4) for v in s.pixel_spacing) if s.pixel_spacing else None
    return (s.rows, s.cols, ps, iop)


def _split_by_geometry(group: list[SliceHeader]) -> list[list[SliceHeader]]:
    clusters: list[list[SliceHeader]] = []
    for s in group:
        for c in clusters:
            ref = c[0]
            if (ref.rows, ref.cols) == (s.rows, s.cols) and _close(ref.pixel_spacing, s.pixel_spacing, 1e-4) and _close(
                ref.iop, s.iop, ORIENTATION_TOL
            ):
                c.append(s)
                break
        else:
            clusters.append([s])
    return sorted(clusters, key=lambda c: (-len(c), repr(_geometry_key(c[0]))))


def _close(a, b, tol) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.all(np.abs(np.subtract(a, b)) <= tol))


def _has_duplicate_positions(group: list[SliceHeader]) -> bool:
    frame = slice_frame(group[0].iop) if all(s.ipp is not None and s.iop is not None for s in group) else None
    if frame is None:
        return False
    d = np.sort(np.asarray([s.ipp for s in group], dtype=np.float64) @ frame[2])
    return bool(np.any(np.diff(d) < DUPLICATE_TOL_MM))


def _split_duplicates(group: list[SliceHeader]) -> list[list[SliceHeader]]:
    if not _has_duplicate_positions(group):
        return [group]
    for k in range(len(SPLIT_KEYS)):
        by_val: dict = defaultdict(list)
        for s in group:
            by_val[repr(s.split_values[k])].append(s)
        if len(by_val) > 1 and not any(_has_duplicate_positions(g) for g in by_val.values()):
            return [by_val[v] for v in sorted(by_val)]
    return [group]  # the duplicate_positions check rejects it with a message


# --------------------------------------------------------------------------------------------------
# checks and geometry


def check_series(cand: SeriesCandidate, *, min_slices: int = 3) -> SeriesPlan:
    """Run every check on one candidate and, when it passes, compute its output grid.

    Pure header arithmetic: no pixel data is read. See the module docstring for the check table. The
    steps, in order: headers (modality, patients, frame of reference, localizer, pixels, decoder,
    geometry present), orientation, order along the normal (duplicates), gantry tilt, slice spacing
    (gaps, uneven steps), output grid. A step that makes the rest meaningless ends the checks.
    """
    plan = SeriesPlan(candidate=cand, modality=cand.slices[0].modality, slices=list(cand.slices))
    for w in cand.warnings:
        plan.warn(w, cand.details[w])
    if not _check_headers(plan, min_slices):
        return plan
    frame = slice_frame(plan.slices[0].iop)
    if frame is None:
        plan.reject("invalid_orientation", "ImageOrientationPatient is not two orthonormal direction vectors")
        return plan
    geo = _sort_along_normal(plan, frame)
    if geo is None:
        return plan
    if len(plan.slices) < 2:
        first = plan.slices[0]
        plan.affine = _ras_affine(geo.u * geo.dcol, geo.v * geo.drow, geo.nrm * max(geo.drow, geo.dcol), geo.ipp[0])
        plan.shape = (first.cols, first.rows, 1)
        return plan
    _check_tilt(plan, geo)
    if not _check_spacing(plan, geo):
        return plan
    _set_output_grid(plan, geo)
    return plan


@dataclass
class _Geometry:
    """Slice frame and positions of a candidate, shared by the geometric check steps."""

    u: np.ndarray  # row direction (along a row: axis 0)
    v: np.ndarray  # column direction (axis 1)
    nrm: np.ndarray  # slice normal
    drow: float  # PixelSpacing between rows, mm
    dcol: float  # PixelSpacing between columns, mm
    ipp: np.ndarray  # (n, 3) positions sorted along the normal, LPS mm
    rel: np.ndarray  # (n,) positions along the normal relative to the first slice, mm
    grow_lo: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=int))
    grow_hi: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=int))
    dz: float = 0.0


def _check_headers(plan: SeriesPlan, min_slices: int) -> bool:
    """Checks on the header values alone; False when the geometry steps cannot run."""
    slices, modality, n = plan.slices, plan.modality, len(plan.slices)
    if modality not in SUPPORTED_MODALITIES:
        plan.reject("unsupported_modality", f"modality {modality or 'missing'!s}; only CT and MR are ingested")
        return False
    if len({s.patient_id for s in slices}) > 1:
        plan.reject("multiple_patients", f"{len({s.patient_id for s in slices})} different PatientIDs in one series")
    if len({s.frame_of_reference_uid for s in slices}) > 1:
        plan.reject("mixed_frames_of_reference", "slices use different FrameOfReferenceUIDs; positions are not comparable")
    loc_types = sorted({t for s in slices for t in s.image_type if t in LOCALIZER_IMAGE_TYPES})
    if loc_types or n <= 2:
        why = f"ImageType {'/'.join(loc_types)}" if loc_types else f"only {n} slice(s)"
        plan.reject("localizer", f"localizer or scout ({why})")
    elif n < min_slices:
        plan.reject("too_few_slices", f"{n} slice(s); at least {min_slices} are needed for a volume")
    if any("MULTIFRAME_CLASSIC" in s.image_type for s in slices):
        plan.reject("unsupported_pixels", "classic multi-frame image without per-frame positions")
        return False
    _check_pixel_format(plan)
    missing = [
        name
        for name, attr in (("ImagePositionPatient", "ipp"), ("ImageOrientationPatient", "iop"), ("PixelSpacing", "pixel_spacing"))
        if any(getattr(s, attr) is None for s in slices)
    ]
    if missing:
        plan.reject("missing_geometry", f"{', '.join(missing)} missing or malformed; cannot place the slices in space")
        return False
    return True


def _check_pixel_format(plan: SeriesPlan) -> None:
    """Monochrome single-sample pixels of a supported depth, in a transfer syntax an installed decoder reads."""
    slices = plan.slices
    if any(s.samples_per_pixel != 1 for s in slices) or any(not s.photometric.startswith("MONOCHROME") for s in slices):
        plan.reject("unsupported_pixels", "colour or multi-sample pixels; CT and MR volumes must be monochrome")
    if any(s.bits_allocated not in (8, 16, 32) for s in slices):
        plan.reject("unsupported_pixels", f"BitsAllocated {sorted({s.bits_allocated for s in slices})} not supported")
    bad_ts = sorted({s.transfer_syntax for s in slices if not decoder_available(s.transfer_syntax)})
    if bad_ts:
        names = ", ".join(f"{UID(t).name} ({t})" for t in bad_ts)
        plan.reject(
            "unsupported_compression",
            f"no installed decoder for {names}; install the pylibjpeg plugins or decompress the export "
            "(e.g. `gdcmconv --raw`)",
        )


def _sort_along_normal(plan: SeriesPlan, frame) -> _Geometry | None:
    """Sort the slices by position along the normal; None (rejected) when two share a position."""
    u, v, nrm = frame
    drow, dcol = plan.slices[0].pixel_spacing  # PixelSpacing = (between rows, between columns)
    ipp = np.array([s.ipp for s in plan.slices], dtype=np.float64)
    d = ipp @ nrm
    order = np.argsort(d, kind="stable")
    plan.slices = [plan.slices[i] for i in order]
    ipp, d = ipp[order], d[order]
    rel = d - d[0]
    plan.positions = rel
    n_dup = int(np.sum(np.diff(rel) < DUPLICATE_TOL_MM))
    if n_dup:
        plan.reject(
            "duplicate_positions",
            f"{n_dup} slice(s) share a position with another slice and no echo/temporal/b-value/stack/"
            "acquisition header separates them; export each volume as its own series",
        )
        return None
    return _Geometry(u=u, v=v, nrm=nrm, drow=float(drow), dcol=float(dcol), ipp=ipp, rel=rel)


def _check_tilt(plan: SeriesPlan, geo: _Geometry) -> None:
    """Gantry tilt: slices sheared in-plane against the normal by more than ``TILT_TOL_VOXELS``.

    The shear is the straight-line fit of the in-plane offsets against the position along the normal, so
    that rounding jitter of single positions (the first one included) is not read as a tilt; a slice that
    strays more than ``STRAY_TOL_VOXELS`` from the straight stack is corrected whatever the fit says.
    """
    n, first = len(plan.slices), plan.slices[0]
    origin = geo.ipp[0]
    # In-plane offset of each slice from the line through the first slice along the normal. Slice k sits
    # at o_k, so on the orthogonal grid new[i, j] = old[i - a_k, j - b_k] with (a_k, b_k) =
    # (o_k.u / dcol, o_k.v / drow): the convention of _apply_inplane_shift.
    offsets = (geo.ipp - origin) - np.outer(geo.rel, geo.nrm)
    shift = np.stack([(offsets @ geo.u) / geo.dcol, (offsets @ geo.v) / geo.drow], axis=1)
    slope = np.polyfit(geo.rel, shift, 1)[0]  # voxels per mm along the normal, per in-plane axis
    sheared = float(np.max(np.abs(slope)) * geo.rel[-1])
    stray = float(np.max(np.abs(shift)))
    if sheared <= TILT_TOL_VOXELS and stray <= STRAY_TOL_VOXELS:
        if stray > NOTE_VOXELS:
            plan.details["position_jitter_inplane"] = (
                f"slice positions stray up to {stray:.3f} voxel in-plane from a straight stack, {sheared:.3f} "
                f"voxel of it a shear (header rounding or an apparent shear; tolerance {TILT_TOL_VOXELS} voxel): "
                "written as is, like dcm2niix"
            )
        return
    span = np.linalg.norm(offsets[-1])
    angle = float(np.degrees(np.arctan2(span, geo.rel[-1]))) if geo.rel[-1] > 0 else 90.0
    # Margins that take in every shifted pixel centre: whole voxels, so the first slice stays on the lattice
    # of the output grid (its pixels are copied, not interpolated). A shift within GROWTH_ROUNDING_VOXELS of
    # a whole voxel counts as that voxel: header rounding must not add a row of pure background.
    geo.grow_lo = np.maximum(np.ceil(-shift.min(axis=0) - GROWTH_ROUNDING_VOXELS), 0).astype(int)
    geo.grow_hi = np.maximum(np.ceil(shift.max(axis=0) - GROWTH_ROUNDING_VOXELS), 0).astype(int)
    plan.inplane_shift = shift + geo.grow_lo
    plan.tilt_growth = tuple(int(g) for g in geo.grow_lo + geo.grow_hi)
    plan.source_affine = _ras_affine(geo.u * geo.dcol, geo.v * geo.drow, (geo.ipp[-1] - origin) / (n - 1), origin)
    plan.source_shape = (first.cols, first.rows, n)
    g0, g1 = plan.tilt_growth
    c0, r0 = first.cols, first.rows
    fill = f"{CT_BACKGROUND_HU:g} HU (air)" if plan.modality == "CT" else "the volume minimum"
    plan.warn(
        "gantry_tilt",
        f"slices sheared by {angle:.2f} degrees against the slice normal; each slice shifted in-plane "
        f"onto an orthogonal grid (linear interpolation), enlarged by {g0 + g1} voxel(s) ({g0} along axis 0, "
        f"{g1} along axis 1: {c0}x{r0} -> {c0 + g0}x{r0 + g1} in-plane) so that no pixel is cropped; "
        f"voxels outside the source slices hold {fill}",
    )


def _check_spacing(plan: SeriesPlan, geo: _Geometry) -> bool:
    """Gaps reject the series; positions off a uniform grid by more than ``NON_UNIFORM_TOL_VOXELS`` of the
    step are resampled to the median step. Sets ``geo.dz``; False when rejected."""
    n, rel = len(plan.slices), geo.rel
    steps = np.diff(rel)
    med = float(np.median(steps))
    gaps = np.nonzero(steps > GAP_FACTOR * med)[0]
    if len(gaps):
        desc = "; ".join(
            f"{steps[g]:.3f} mm after slice {g + 1} of {n} (about {max(1, round(steps[g] / med) - 1)} missing)"
            for g in gaps[:5]
        )
        plan.reject(
            "missing_slices",
            f"{len(gaps)} gap(s) wider than {GAP_FACTOR}x the median step {med:.3f} mm: {desc}; "
            "re-export the complete series",
        )
        return False
    dz = rel[-1] / (n - 1)
    dev = float(np.max(np.abs(rel - dz * np.arange(n))))
    step_dev = float(np.max(np.abs(steps - med)))
    if dev <= NON_UNIFORM_TOL_VOXELS * dz and step_dev <= STEP_TOL_VOXELS * med:
        if dev > NOTE_VOXELS * dz:
            plan.details["position_jitter_normal"] = (
                f"slice positions stray up to {dev:.3f} mm ({dev / dz:.3f} slice) from a uniform grid (header "
                f"rounding; tolerance {NON_UNIFORM_TOL_VOXELS} slice): stacked as is at {dz:.3f} mm, like dcm2niix"
            )
        geo.dz = dz
        return True
    n_out = int(np.floor(rel[-1] / med + 1e-6)) + 1
    plan.target_positions = med * np.arange(n_out)
    geo.dz = med
    plan.warn(
        "non_uniform_spacing",
        f"slice steps range {steps.min():.3f}-{steps.max():.3f} mm; positions deviate from a uniform grid "
        f"by up to {dev:.3f} mm ({dev / dz:.2f} slice) and steps from the median by up to {step_dev:.3f} mm "
        f"({step_dev / med:.2f} slice; tolerances {NON_UNIFORM_TOL_VOXELS} and {STEP_TOL_VOXELS} slice); "
        f"resampled linearly to {n_out} slices at {med:.3f} mm",
    )
    return True


def _set_output_grid(plan: SeriesPlan, geo: _Geometry) -> None:
    """Affine and shape of the output grid (tilt margins and resampled slice count included)."""
    first = plan.slices[0]
    # The tilt margin on the low side moves the origin; world coordinates of the first slice are unchanged.
    out_origin = geo.ipp[0] - geo.grow_lo[0] * geo.dcol * geo.u - geo.grow_lo[1] * geo.drow * geo.v
    plan.affine = _ras_affine(geo.u * geo.dcol, geo.v * geo.drow, geo.nrm * geo.dz, out_origin)
    n_out = len(plan.slices) if plan.target_positions is None else len(plan.target_positions)
    growth = geo.grow_lo + geo.grow_hi
    plan.shape = (first.cols + int(growth[0]), first.rows + int(growth[1]), n_out)


def _ras_affine(ax0, ax1, ax2, origin) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = ax0, ax1, ax2, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def decoder_available(transfer_syntax: str) -> bool:
    """True when pydicom (with the installed plugins) can decode pixel data in this transfer syntax."""
    if _is_native(transfer_syntax) or transfer_syntax == DEFLATED:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(transfer_syntax).is_available)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# pixel data


def read_stored_volume(plan: SeriesPlan, *, relpath=lambda p: os.path.basename(p)) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Decode and stack the slices of an accepted plan into ``(stored (x, y, z) array, scl)`` on its output grid.

    Storage (what ingest writes; readers see ``stored * scl_slope + scl_inter`` when ``scl`` is given, else
    ``stored``), as dcm2niix does, float32 only where the values need it:

    * every slice's rescale (MR: the real-world value mapping when present, else the modality rescale) has
      an integral slope and intercept: the rescaled values (CT in HU) as int16, or int32 when they do not
      fit; after a gantry-tilt or spacing correction (interpolated values) CT is rounded to int16 when it
      fits (else float32) and MR is float32;
    * one non-integral rescale for the whole series, no correction: the stored integers with ``scl``, when
      nibabel's scaling of them gives exactly the float32 values of the rescale (checked; otherwise float32);
    * else float32 rescaled values.

    Slices are stacked as they lie in the files, ``(slices, rows, cols)``: transposed, that is the NIfTI voxel
    order, so the returned ``(x, y, z)`` array is a Fortran-ordered view and nothing is copied to reorder it.
    Voxels of the tilt-enlarged grid that no source pixel covers hold ``CT_BACKGROUND_HU`` (CT) or the volume
    minimum (MR).

    Raises:
        SeriesReadError: a slice cannot be decoded (``unreadable_pixels``) or has the wrong size; the
            message names the file via ``relpath`` (so the caller controls what the report shows).
    """
    slices = plan.slices
    is_ct = plan.modality == "CT"
    scales = [s.rwv if (not is_ct and s.rwv is not None) else (s.slope, s.intercept) for s in slices]
    integral = all(float(a).is_integer() and float(b).is_integer() for a, b in scales)
    corrected = plan.inplane_shift is not None or plan.target_positions is not None
    raw = _read_raw_stack(slices, relpath)  # (z, rows, cols)
    if len(set(scales)) == 1 and not corrected:
        slope, inter = scales[0]
        if integral:
            stored = _rescale_integers(raw, int(slope), int(inter))
            if stored is not None:
                return stored.transpose(2, 1, 0), None
        else:
            scl = _exact_scl(raw.transpose(2, 1, 0), slope, inter)
            if scl is not None:
                return raw.transpose(2, 1, 0), scl
        values = np.multiply(raw, slope, dtype=np.float64)
        values += inter
        return values.astype(np.float32).transpose(2, 1, 0), None
    vals = np.empty(raw.shape, dtype=np.int32 if integral else np.float32)
    for k, (slope, inter) in enumerate(scales):
        if integral:
            vals[k] = raw[k].astype(np.int32) * int(slope) + int(inter)
        else:
            vals[k] = raw[k].astype(np.float64) * slope + inter
    vol = vals.transpose(2, 1, 0)
    if plan.inplane_shift is not None:
        fill = CT_BACKGROUND_HU if is_ct else (float(vol.min()) if vol.size else 0.0)
        vol = _apply_inplane_shift(vol, plan.inplane_shift, plan.shape[:2], fill=fill, nearest=False)
    if plan.target_positions is not None:
        vol = _resample_along_normal(vol, plan.positions, plan.target_positions)
    lo, hi = (vol.min(), vol.max()) if vol.size else (0, 0)
    fits16 = -32768 <= lo and hi <= 32767
    if integral and not corrected:
        return vol.astype(np.int16 if fits16 else np.int32, order="F", copy=False), None
    if integral and is_ct and fits16:
        return np.asarray(np.rint(vol), dtype=np.int16, order="F"), None
    return vol.astype(np.float32, order="F", copy=False), None


def _rescale_integers(raw: np.ndarray, slope: int, inter: int) -> np.ndarray | None:
    """``raw * slope + inter`` as int16 when every value fits, else int32; ``None`` when not even int32 holds them.

    Computed in the output type: two's-complement wrap-around is arithmetic modulo 2^bits, so the result is
    exact whenever the true value fits, whatever the intermediate steps do.
    """
    if raw.dtype == np.int16 and slope == 1 and inter == 0:
        return raw
    if not raw.size:
        return raw.astype(np.int16)
    ends = sorted(int(v) * slope + inter for v in (raw.min(), raw.max()))
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= ends[0] and ends[1] <= info.max:
            out = raw.astype(dtype)
            if slope != 1:
                out *= np.array(slope).astype(dtype)
            if inter:
                out += np.array(inter).astype(dtype)
            return out
    return None


def _read_raw_stack(slices: list[SliceHeader], relpath) -> np.ndarray:
    """The stored values of every slice, stacked ``(slices, rows, cols)`` in file layout (C order)."""
    rows, cols = slices[0].rows, slices[0].cols
    pixels = _SlicePixels(relpath)
    raw = None
    for k, s in enumerate(slices):
        arr = pixels(s, rows, cols)
        if raw is None:
            raw = np.empty((len(slices), rows, cols), dtype=arr.dtype)
        elif not np.can_cast(arr.dtype, raw.dtype, casting="safe"):  # slices stored differently (rare)
            raw = raw.astype(np.promote_types(raw.dtype, arr.dtype))
        raw[k] = arr
    return raw


def read_volume(plan: SeriesPlan, *, relpath=lambda p: os.path.basename(p)) -> np.ndarray:
    """The values of :func:`read_stored_volume` (the rescale applied where it is kept in ``scl``)."""
    vol, scl = read_stored_volume(plan, relpath=relpath)
    if scl is None:
        return vol
    return (vol.astype(np.float32) * np.float32(scl[0]) + np.float32(scl[1])).astype(np.float32, order="F")


def _exact_scl(raw: np.ndarray, slope: float, inter: float) -> tuple[float, float] | None:
    """``(scl_slope, scl_inter)`` when a NIfTI reader (nibabel, as MONAI uses it) decodes ``raw`` with them to
    exactly ``float32(raw * slope + inter)``, the values stored without them; else ``None``.

    The header holds float32 slope and intercept, so the check decodes an in-memory NIfTI the way readers do.
    """
    import nibabel as nib

    from medmtl.nifti import NIFTI_DATA_OFFSET, nifti_header

    if raw.dtype.kind not in "iu" or not raw.size:
        return None
    scl = (float(np.float32(slope)), float(np.float32(inter)))
    hdr = nifti_header(raw.shape, raw.dtype, np.eye(4), scl=scl)
    blob = hdr.binaryblock + b"\0" * (NIFTI_DATA_OFFSET - len(hdr.binaryblock)) + raw.tobytes(order="F")
    got = np.asanyarray(nib.Nifti1Image.from_bytes(blob).dataobj)
    want = (raw.astype(np.float64) * slope + inter).astype(np.float32)
    return scl if got.shape == want.shape and np.array_equal(got, want) else None


class _SlicePixels:
    """Stored pixel values of one slice as ``(rows, cols)``: one ``np.fromfile`` where the scan found a native
    frame (unused high bits masked, signed values sign-extended, as pydicom does), else pydicom's decoder
    (multi-frame files decoded once for all their frames)."""

    def __init__(self, relpath):
        self.relpath, self.cache_path, self.cache_arr = relpath, None, None

    def __call__(self, s: SliceHeader, rows: int, cols: int) -> np.ndarray:
        if s.data_offset is not None and s.stored_dtype is not None:
            try:
                arr = np.fromfile(s.path, dtype=s.stored_dtype, count=rows * cols, offset=s.data_offset)
            except (OSError, ValueError) as e:
                raise SeriesReadError(
                    "unreadable_pixels", f"{self.relpath(s.path)}: pixel data cannot be read ({type(e).__name__}); re-export it"
                ) from None
            if arr.size != rows * cols:
                raise SeriesReadError("unreadable_pixels", f"{self.relpath(s.path)}: pixel data cut short; re-export it")
            arr = arr.reshape(rows, cols)
            bits = 8 * arr.dtype.itemsize
            if 0 < s.bits_stored < bits:
                if arr.dtype.kind == "u":
                    arr &= (1 << s.bits_stored) - 1
                else:
                    shift = bits - s.bits_stored
                    arr = (arr << shift) >> shift
            return arr.astype(arr.dtype.newbyteorder("="), copy=False)
        if s.path != self.cache_path:
            self.cache_path, self.cache_arr = s.path, _decode(s.path, self.relpath)
        arr = self.cache_arr if s.frame is None else self.cache_arr[s.frame] if self.cache_arr.ndim == 3 else self.cache_arr
        if arr.shape != (rows, cols):
            raise SeriesReadError(
                "unreadable_pixels", f"{self.relpath(s.path)}: pixel array {arr.shape} does not match Rows/Columns {(rows, cols)}"
            )
        return arr


def _decode(path: str, relpath) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f)
            return ds.pixel_array
    except Exception as e:
        raise SeriesReadError(
            "unreadable_pixels", f"{relpath(path)}: pixel data cannot be decoded ({type(e).__name__}); re-export it"
        ) from None


def _apply_inplane_shift(vol: np.ndarray, shift: np.ndarray, out_shape: tuple[int, int], *, fill: float,
                         nearest: bool) -> np.ndarray:
    """Move slice ``k`` of ``vol`` ``(X, Y, Z)`` by ``shift[k]`` voxels onto an ``out_shape`` in-plane grid.

    ``out[i, j, k] = vol[i - a_k, j - b_k, k]`` where the source position lies within the slice's pixel
    footprint (``-0.5 <= p < n - 0.5`` per axis), else ``fill``. Linear interpolation (float32 result), the
    outer half pixel clamped to the edge pixel; or nearest neighbour (``nearest``, ``vol``'s dtype) for masks.
    A pure translation, so it is separable and the same gather indices serve the whole slice.
    """
    n0, n1 = vol.shape[:2]
    dtype = vol.dtype if nearest else np.float32
    out = np.empty(tuple(out_shape) + (vol.shape[2],), dtype=dtype, order="F")
    for k in range(vol.shape[2]):
        (i0, i1, w0, ok0), (j0, j1, w1, ok1) = (
            _footprint_sampling(n, m, s, nearest) for n, m, s in ((n0, out_shape[0], shift[k, 0]), (n1, out_shape[1], shift[k, 1]))
        )
        src = vol[:, :, k]
        if nearest:
            sl = src[np.ix_(i0, j0)]
        else:
            src = src.astype(np.float32)
            rows = src[i0] * (1 - w0)[:, None] + src[i1] * w0[:, None]
            sl = rows[:, j0] * (1 - w1) + rows[:, j1] * w1
        sl[~ok0, :] = fill
        sl[:, ~ok1] = fill
        out[:, :, k] = sl
    return out


def _footprint_sampling(n_in: int, n_out: int, s: float, nearest: bool):
    """Source indices, upper weights and coverage of output positions ``0..n_out-1`` for a shift ``s``."""
    p = np.arange(n_out) - s
    ok = (p >= -0.5) & (p < n_in - 0.5)
    if nearest:
        i = np.clip(np.floor(p + 0.5), 0, n_in - 1).astype(np.intp)
        return i, i, np.zeros(n_out, np.float32), ok
    f = np.floor(p)
    i0 = np.clip(f, 0, n_in - 1).astype(np.intp)
    i1 = np.clip(f + 1, 0, n_in - 1).astype(np.intp)
    return i0, i1, (p - f).astype(np.float32), ok


def _resample_along_normal(vol: np.ndarray, pos: np.ndarray, target: np.ndarray, *, nearest: bool = False) -> np.ndarray:
    idx = np.clip(np.searchsorted(pos, target, side="right") - 1, 0, len(pos) - 2)
    w = (target - pos[idx]) / (pos[idx + 1] - pos[idx])
    out = np.empty(vol.shape[:2] + (len(target),), dtype=vol.dtype if nearest else np.float32, order="F")
    for k, (i, wk) in enumerate(zip(idx, w)):
        if nearest:
            out[:, :, k] = vol[:, :, i + 1] if wk >= 0.5 else vol[:, :, i]
        else:
            out[:, :, k] = (1 - wk) * vol[:, :, i] + wk * vol[:, :, i + 1]
    return out


def resample_label_like(plan: SeriesPlan, label_on_source_grid: np.ndarray) -> np.ndarray:
    """Apply the plan's tilt/spacing corrections to a mask given on the uncorrected source grid (nearest).

    The result is on the plan's output grid (tilt-enlarged when the series is tilted); voxels outside the
    source slices are 0.
    """
    lab = label_on_source_grid
    if plan.inplane_shift is not None:
        lab = _apply_inplane_shift(lab, plan.inplane_shift, plan.shape[:2], fill=0, nearest=True)
    if plan.target_positions is not None:
        lab = _resample_along_normal(lab, plan.positions, plan.target_positions, nearest=True)
    return lab
