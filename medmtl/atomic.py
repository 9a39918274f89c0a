"""Atomic file writes: readers see the old file or the complete new one, never half of it.

Everything medmtl writes that another step reads (NIfTI volumes, the manifest, plans, checkpoints,
predictions, spool segments) goes through :func:`atomic_path`: the content is written to a temporary
file in the same folder (``os.replace`` is atomic only within one file system), flushed to disk, then
renamed over the target. A crash leaves at most a hidden temporary file, which the next write ignores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "FILE_MODE"]


def _umask_file_mode() -> int:
    # read once at import: os.umask is process-wide and not thread-safe to query later
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


#: mode of new files: mkstemp creates 0600 files, but datasets and runs are shared by a team
FILE_MODE = _umask_file_mode()


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is fsynced and renamed onto ``path``.

    ``suffix`` lets writers that look at the file name (e.g. ``.nii.gz`` for nibabel) see the right one.
    ``durable=False`` skips the fsync for data that can be regenerated (synthetic exports): the rename
    still guarantees that no partial file appears under the final name.
    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.", suffix=suffix)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
