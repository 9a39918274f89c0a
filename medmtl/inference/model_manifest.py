"""SHA-256 manifest of a logged model's files, and its verification before the model is loaded.

A pyfunc model runs Python when MLflow loads it (``pyfunc_entry.py``, the bundled ``code/medmtl`` package),
and its weights, config and plan decide what it answers. So whoever can write to the artifact store could
run code, or change answers, wherever ``predict``, ``evaluate`` or serving loads a model. The defence is a
manifest of every file of the model and a trusted record of the manifest's own hash:

* **Manifest** (:data:`MANIFEST_NAME`, at the model's root, written at log time): canonical JSON
  ``{"version": 1, "files": {relative path: sha256}}`` of every file of the model as stored (``MLmodel``,
  ``pyfunc_entry.py``, ``code/**``, ``artifacts/weights.pt``, ``config.yaml``, ``plan.json``, the environment
  files), except itself.
* **Trusted record**: the manifest's SHA-256 (:data:`DIGEST_TAG`) as a tag of the logged model, set at log
  time, and as a tag of every registered version, set at registration after checking the files against
  the logged model's tag. Tags live in the tracking database, not in the artifact store.

What an attacker with write access to the **artifact store only** can and cannot do:

* they can change, add or delete any file of the model, the manifest included, and recompute the
  manifest so it is consistent with their files. The embedded manifest alone therefore only catches
  accidents (a truncated upload, bit rot, a hand edit), never a deliberate attacker;
* they cannot change the tags: the tampered manifest's hash no longer matches :data:`DIGEST_TAG`, and a
  consistent manifest with other files cannot be forged without a SHA-256 second preimage. Any changed,
  added (e.g. a ``.pth`` file, a ``__pycache__/*.pyc`` beside bundled code, a ``sitecustomize.py``) or
  removed file is refused, named in the error;
* verification must run **before** MLflow imports anything from the model, in a process whose own code
  is trusted: ``medmtl predict`` and ``medmtl evaluate`` download the model into a fresh local folder,
  verify it there (:func:`verify_model_dir`) and load that same folder, so nothing can change between
  check and use (``medmtl.tracking.model_loading``);
* the served model checks itself in ``load_context`` against the manifest and the logged model's tag.
  That check runs *after* MLflow has executed the bundled code, so it catches tampered weights, config
  and plan, not an attacker who rewrote the bundled code to skip it. To serve only what was registered,
  serve a verified copy: ``python -m medmtl.tracking.model_loading MODEL_URI --out DIR`` then
  ``mlflow models serve -m DIR``.

Out of scope: someone who can write the tracking database (they can re-tag) or the Python environment
that runs medmtl; a model logged before manifests existed has no record and is refused by the
pre-load check (log it again, or register a fresh run).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medmtl.errors import ModelError

__all__ = ["MANIFEST_NAME", "DIGEST_TAG", "IGNORED_DOWNLOAD_FILES", "file_manifest", "manifest_bytes", "digest",
           "write_manifest", "verify_model_dir"]

MANIFEST_NAME = "medmtl_manifest.json"
DIGEST_TAG = "medmtl.files_sha256"
# written by MLflow itself into a downloaded copy of a registered version (name and version as YAML data, never executed)
IGNORED_DOWNLOAD_FILES = frozenset({"registered_model_meta"})
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(root: str | Path, *, skip_pycache: bool = False) -> dict[str, str]:
    """``{relative posix path: sha256 hex}`` of every regular file under ``root`` but the manifest itself.

    ``skip_pycache`` leaves out ``__pycache__`` folders that Python writes while importing bundled code
    (only for a check made after loading; before loading, a ``.pyc`` is a file like any other).
    """
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise ModelError(f"model file {rel} is a symbolic link; a model holds regular files only (refusing to load it)")
        if not p.is_file() or rel == MANIFEST_NAME or rel in IGNORED_DOWNLOAD_FILES:
            continue
        if skip_pycache and "__pycache__" in p.parts:
            continue
        out[rel] = _sha256(p)
    return out


def manifest_bytes(files: dict[str, str]) -> bytes:
    """Canonical JSON of a manifest (sorted keys, no spaces): the bytes whose hash is recorded."""
    return json.dumps({"version": 1, "files": dict(sorted(files.items()))}, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    """SHA-256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_manifest(root: str | Path) -> str:
    """Write :data:`MANIFEST_NAME` for the files under ``root``; returns its digest (the value of :data:`DIGEST_TAG`)."""
    data = manifest_bytes(file_manifest(root))
    (Path(root) / MANIFEST_NAME).write_bytes(data)
    return digest(data)


def verify_model_dir(root: str | Path, *, trusted_digest: str | None, where: str, after_load: bool = False) -> dict[str, str]:
    """Check every file under ``root`` against its :data:`MANIFEST_NAME`, and that manifest against ``trusted_digest``.

    ``trusted_digest`` is :data:`DIGEST_TAG` of the registered version or logged model (``None``: only the
    embedded manifest is checked, which catches corruption, not an attacker). ``where`` names the model
    in errors. Returns the verified manifest. Raises :class:`~medmtl.errors.ModelError` naming the first
    changed, added or missing file, or the manifest itself.
    """
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ModelError(f"model {where} has no file manifest ({MANIFEST_NAME}); refusing to load it "
                         "(it was logged before manifests existed or the manifest was removed: log and register it again)")
    data = mpath.read_bytes()
    if trusted_digest is not None and digest(data) != trusted_digest:
        raise ModelError(f"model {where}: {MANIFEST_NAME} does not match the manifest recorded at logging/registration "
                         f"(tag {DIGEST_TAG}); its files were changed in the artifact store: refusing to load it")
    try:
        recorded = json.loads(data)["files"]
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"model {where}: {MANIFEST_NAME} is not a medmtl file manifest; refusing to load it") from None
    actual = file_manifest(root, skip_pycache=after_load)
    for rel in sorted(set(recorded) | set(actual)):
        if rel not in actual:
            raise ModelError(f"model {where}: file {rel} listed in its manifest is missing; refusing to load it")
        if rel not in recorded:
            raise ModelError(f"model {where}: file {rel} is not in its manifest (added after logging); refusing to load it")
        if actual[rel] != recorded[rel]:
            raise ModelError(f"model {where}: file {rel} was modified after logging (SHA-256 {actual[rel][:12]}... "
                             f"!= recorded {recorded[rel][:12]}...); refusing to load it")
    return recorded
