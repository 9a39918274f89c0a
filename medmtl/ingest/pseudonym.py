"""Keyed pseudonyms for patients and series, and the local secret they are keyed with.

A pseudonym is ``prefix + hex(HMAC-SHA256(secret, value))[:12]``. Without the secret nobody can recompute
it from a patient ID or a UID (a plain hash of a PatientID is trivially reversed by trying all IDs of a
hospital), and with the same secret the same patient always gets the same case id, so re-running ingest or
ingesting a second export of the same patient into the same ``DATA_DIR`` lands on the same names.

The secret lives in ``DATA_DIR/.medmtl_secret`` (32 random bytes, hex, mode 0600). It is created once, never
printed, never logged and never included in ``repr``. Losing it only means that a later ingest cannot link
new exports to the old case ids; it does not make the existing data unreadable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from medmtl.errors import IngestError

SECRET_FILE_NAME = ".medmtl_secret"
PSEUDONYM_HEX_CHARS = 12

# A path component that looks like a DICOM UID (digits and dots, several dots): PACS exports sometimes
# name files or folders after SOPInstanceUIDs or SeriesInstanceUIDs, and those are source UIDs.
_UID_LIKE = re.compile(r"^\d+(\.\d+){3,}")


class SecretFileError(IngestError, RuntimeError):
    """The secret file exists but cannot be used (wrong permissions, unreadable, malformed)."""


def load_or_create_secret(data_dir: str | os.PathLike) -> bytes:
    """Return the HMAC key stored in ``data_dir/.medmtl_secret``, creating it (mode 0600) on first use.

    Raises :class:`SecretFileError` naming the file when it is readable by group/others or malformed,
    because a shared key turns pseudonyms back into identifiers for whoever can read it.
    """
    path = Path(data_dir) / SECRET_FILE_NAME
    try:
        # O_EXCL: two ingests starting together must not each write a different key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    try:
        key = secrets.token_bytes(32)
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(
            f"{path} is readable by other users (mode {stat.filemode(mode)}); "
            f"run `chmod 600 {path}` and re-run ingest."
        )
    text = path.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise SecretFileError(
            f"{path} does not hold a valid medmtl key; restore it from backup, or delete it to start a new "
            "set of case ids (existing case ids will then no longer match new ingests)."
        )
    return key


def pseudonym(secret: bytes, value: str, prefix: str) -> str:
    """Return ``prefix + hex(HMAC-SHA256(secret, value))[:12]``; ``value`` is encoded as UTF-8."""
    digest = hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return prefix + digest[:PSEUDONYM_HEX_CHARS]


class Pseudonymizer:
    """Maps source identifiers to keyed pseudonyms; holds the key without ever showing it.

    Args:
        secret: the HMAC key, e.g. from :func:`load_or_create_secret`.
    """

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "Pseudonymizer(<secret withheld>)"

    def case_id(self, patient_id: str) -> str:
        """Case id of a patient: ``case-`` + 12 hex chars of HMAC(secret, PatientID)."""
        return pseudonym(self._secret, patient_id, "case-")

    def series_key(self, series_uid: str) -> str:
        """Series key of a SeriesInstanceUID: ``series-`` + 12 hex chars of HMAC(secret, UID)."""
        return pseudonym(self._secret, series_uid, "series-")

    def digest(self, data: bytes) -> str:
        """Full keyed hex digest of ``data`` (fingerprints of source files that may embed UIDs)."""
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()

    def safe_relpath(self, path: str | os.PathLike, root: str | os.PathLike) -> str:
        """``path`` relative to ``root`` with every UID-like component replaced by its pseudonym.

        PACS layouts (``DICOM/PA000001/ST000001/...``) carry no PHI; the replacement covers exports that
        name files after SOPInstanceUIDs, which are source UIDs.
        """
        rel = os.path.relpath(os.fspath(path), os.fspath(root))
        parts = [
            pseudonym(self._secret, part, "uid-") if _UID_LIKE.match(part) else part
            for part in Path(rel).parts
        ]
        return "/".join(parts)
