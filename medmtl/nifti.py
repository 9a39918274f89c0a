"""The one NIfTI writer: every NIfTI file medmtl writes (ingested volumes and labels, synthetic labels,
predictions, temporary model inputs) goes through :func:`write_nifti`.

What it writes, and why:

* NIfTI-1, ``vox_offset`` 352, qform and sform both holding the affine with code 1 (scanner anatomical), as
  dcm2niix writes them; zooms are the column norms of the affine; units mm. ``descrip``, ``intent_name``
  and ``aux_file`` stay empty, so nothing but geometry and voxels leaves (the PHI boundary relies on it).
* The data in their own dtype (bool becomes uint8), optionally with ``scl_slope``/``scl_inter`` so that
  integer voxels stand for rescaled values (readers compute ``stored * slope + inter``).
* ``.nii.gz``: gzip with no file name and mtime 0, so the same volume always gives the same bytes and
  their sha256 is a content hash. The deflate stream comes from ISA-L's igzip (``isal`` wheel) when it is
  installed, else from zlib; both are plain RFC 1952 gzip that any reader (nibabel, ITK, FSL, ``gunzip``)
  decodes. ``.nii``: uncompressed.
* Atomically (:func:`medmtl.atomic.atomic_path`): a reader sees the old file or the complete new one.
  Data go out in slabs in Fortran order (no full copy of the volume).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.atomic import atomic_path

try:  # ISA-L's deflate: several times zlib's speed at its fastest levels, same gzip format
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _igzip = None

__all__ = ["write_nifti", "GZIP_LEVEL", "COMPRESSOR", "NIFTI_DATA_OFFSET"]

#: ``"isal"`` or ``"zlib"``: which deflate implementation writes ``.nii.gz`` files (part of the output bytes)
COMPRESSOR = "isal" if _igzip is not None else "zlib"
#: fast level of that compressor (isal 0-3, zlib 1-9); fast levels cost ~10% size against 3-4x time
GZIP_LEVEL = 1
NIFTI_DATA_OFFSET = 352


class _HashingWriter:
    """File wrapper that hashes what passes through (so the content hash costs no second read)."""

    def __init__(self, f):
        self._f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


def _gzip_writer(fileobj, level: int | None):
    if _igzip is not None:
        return _igzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0,
                               compresslevel=GZIP_LEVEL if level is None else min(level, 3))
    return gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, mtime=0, compresslevel=GZIP_LEVEL if level is None else level)


def nifti_header(shape, dtype, affine: np.ndarray, *, scl: tuple[float, float] | None = None) -> nib.Nifti1Header:
    """The header :func:`write_nifti` writes for a volume of ``shape`` and ``dtype`` on ``affine``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    zooms = [float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)]
    hdr.set_zooms(tuple(zooms + [1.0] * (len(shape) - 3)))
    hdr.set_xyzt_units("mm")
    hdr.set_data_offset(NIFTI_DATA_OFFSET)
    if scl is not None:
        hdr["scl_slope"], hdr["scl_inter"] = float(scl[0]), float(scl[1])
    return hdr


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *,
                scl: tuple[float, float] | None = None, compresslevel: int | None = None,
                durable: bool = True) -> str:
    """Write ``data`` (3D, or more) on ``affine`` (voxel -> RAS mm) to ``path`` atomically; return ``"sha256:" + hex``.

    ``path`` ending in ``.gz`` is gzipped (see the module docstring), else written uncompressed. ``scl`` is
    ``(scl_slope, scl_inter)`` for integer data that stand for rescaled values. ``compresslevel`` overrides
    :data:`GZIP_LEVEL` (capped at 3 under isal). ``durable=False`` skips the fsync (data that can be
    regenerated, such as synthetic exports); the rename still keeps partial files away from ``path``.
    """
    path = Path(path)
    data = np.asarray(data)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    hdr = nifti_header(data.shape, data.dtype, np.asarray(affine, dtype=np.float64), scl=scl)
    gz_out = path.name.endswith(".gz")
    suffix = ".nii.gz" if gz_out else ".nii"
    with atomic_path(path, suffix=suffix, durable=durable) as tmp, open(tmp, "wb") as raw:
        hw = _HashingWriter(raw)
        out = _gzip_writer(hw, compresslevel) if gz_out else hw
        try:
            out.write(hdr.binaryblock)
            out.write(b"\x00" * (NIFTI_DATA_OFFSET - len(hdr.binaryblock)))
            if data.ndim == 3 and data.shape[2]:
                # slabs of a few MiB: a Fortran-ordered volume (ingest's) goes out without any copy
                step = max(1, (4 << 20) // max(1, data[:, :, 0].nbytes))
                for k in range(0, data.shape[2], step):
                    out.write(memoryview(data[:, :, k:k + step].ravel(order="F")).cast("B"))
            else:
                out.write(data.tobytes(order="F"))
        finally:
            if gz_out:
                out.close()
    return "sha256:" + hw.sha.hexdigest()
