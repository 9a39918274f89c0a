"""Load a logged or registered model only after its files verify: URI resolution, download, manifest check.

``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``models:/<model id>`` and ``runs:/<run id>/model``
are resolved here with the registry and tracking APIs, so that a wrong name, version, alias or run ends
in one :class:`~medmtl.errors.ModelError` line that names what exists instead (not an MLflow traceback).
The model is then downloaded from its logged model's artifact location into a fresh local folder,
verified against the trusted manifest digest (the registered version's tag, else the logged model's;
see :mod:`medmtl.inference.model_manifest` for what that protects against) and loaded from that same
folder, so MLflow never imports a file that was not checked.

Run as a module to make a verified local copy for serving:
``python -m medmtl.tracking.model_loading models:/medmtl-demo@champion --out DIR`` then
``mlflow models serve -m DIR``.
"""

from __future__ import annotations

import argparse
import atexit
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medmtl.errors import MedmtlError, ModelError
from medmtl.inference.model_manifest import DIGEST_TAG, verify_model_dir, write_manifest

__all__ = ["ResolvedModel", "resolve_model", "verified_local_copy", "load_verified_model", "record_version_manifest",
           "record_logged_model_manifest", "main"]

_URI_FORMS = "models:/<name>/<version>, models:/<name>@<alias>, models:/<model id> or runs:/<run id>/model"


@dataclass
class ResolvedModel:
    """What a model URI points at: the logged model, its artifact location and the trusted manifest digest."""

    uri: str
    model_id: str
    artifact_location: str
    trusted_digest: str | None
    version: str | None = None  # "name version N" for registered versions


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _names(items, limit: int = 10) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f" (and {len(items) - limit} more)" if len(items) > limit else "") if items else "none"


def _registered(client, name: str, version: str | None, alias: str | None, uri: str, where: str):
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        try:
            known = [m.name for m in client.search_registered_models(max_results=50)]
        except MlflowException:
            known = []
        raise ModelError(f"model URI {uri}: no registered model named {name!r} in {where} (registered models: {_names(known)})") from None
    if alias is not None:
        aliases = dict(getattr(rm, "aliases", {}) or {})
        if alias not in aliases:
            raise ModelError(f"model URI {uri}: registered model {name!r} has no alias {alias!r} (aliases: "
                             f"{_names(f'{a} -> version {v}' for a, v in sorted(aliases.items()))})")
        version = str(aliases[alias])
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), reverse=True)
        raise ModelError(f"model URI {uri}: registered model {name!r} has no version {version} "
                         f"(versions: {_names(str(v) for v in versions)})") from None


def resolve_model(model_uri: str, tracking_uri: str) -> ResolvedModel:
    """Resolve ``model_uri`` to its logged model and trusted digest; :class:`ModelError` when it points at nothing."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    where = tracking_uri
    try:
        m = re.fullmatch(r"models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))?/?", model_uri.strip())
        r = re.fullmatch(r"runs:/([0-9a-fA-F]+)/([^/]+)/?", model_uri.strip())
        if m and (m.group(2) or m.group(3)):
            name, version, alias = m.group(1), m.group(2), m.group(3)
            if version is not None and not version.isdigit():
                raise ModelError(f"model URI {model_uri}: version must be a number (or use models:/{name}@<alias>)")
            mv = _registered(client, name, version, alias, model_uri, where)
            model_id = getattr(mv, "model_id", None) or _model_id_of_source(mv.source)
            if not model_id:
                raise ModelError(f"model URI {model_uri}: version {mv.version} has no logged model id (registered from "
                                 f"{mv.source}); register the run's model again with `medmtl register`")
            lm = _logged_model(client, model_id, model_uri)
            return ResolvedModel(model_uri, model_id, lm.artifact_location, mv.tags.get(DIGEST_TAG) or lm.tags.get(DIGEST_TAG),
                                 f"{mv.name} version {mv.version}")
        if m:
            lm = _logged_model(client, m.group(1), model_uri)
            return ResolvedModel(model_uri, lm.model_id, lm.artifact_location, lm.tags.get(DIGEST_TAG))
        if r:
            run_id, name = r.group(1), r.group(2)
            try:
                run = client.get_run(run_id)
            except MlflowException:
                raise ModelError(f"model URI {model_uri}: no run {run_id} in {where}") from None
            models = [lm for lm in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                               filter_string=f"source_run_id = '{run_id}'") if lm.name == name]
            if not models:
                raise ModelError(f"model URI {model_uri}: run {run_id} has no logged model named {name!r} "
                                 "(train with tracking.log_model=true)")
            lm = models[0]
            return ResolvedModel(model_uri, lm.model_id, lm.artifact_location, lm.tags.get(DIGEST_TAG))
    except MlflowException as err:
        raise ModelError(f"model URI {model_uri}: the tracking store {where} refused ({' '.join(str(err.message).split())[:300]})") from None
    except OSError as err:
        raise ModelError(f"model URI {model_uri}: cannot reach the tracking store {where} ({err})") from None
    raise ModelError(f"model URI {model_uri!r} is not one of {_URI_FORMS}")


def _model_id_of_source(source: str) -> str | None:
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)", source or "")
    return m.group(1) if m else None


def _logged_model(client, model_id: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_logged_model(model_id)
    except MlflowException:
        raise ModelError(f"model URI {uri}: no logged model {model_id} in the tracking store") from None


def _download(artifact_location: str, dst: Path, tracking_uri: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_location, dst_path=str(dst), tracking_uri=tracking_uri))
    except Exception as err:  # the artifact repositories raise many types (OSError, MlflowException, HTTP errors)
        raise ModelError(f"cannot download the model files from {artifact_location} ({type(err).__name__}: {err})") from None


def verified_local_copy(model_uri: str, tracking_uri: str, dst: str | Path | None = None) -> tuple[Path, ResolvedModel]:
    """Download ``model_uri`` into ``dst`` (default: a new temporary folder removed at exit) and verify it there.

    Raises :class:`ModelError` for an unresolvable URI, a model without a trusted manifest digest, or any
    changed, added or missing file (named).
    """
    res = resolve_model(model_uri, tracking_uri)
    label = f"{model_uri} ({res.version or res.model_id})"
    if res.trusted_digest is None:
        raise ModelError(f"model {label} has no recorded file manifest (tag {DIGEST_TAG}); it was logged before medmtl "
                         "recorded manifests: log it again (train or re-register a run) before loading it")
    if dst is None:
        dst = Path(tempfile.mkdtemp(prefix="medmtl-model-"))
        atexit.register(shutil.rmtree, dst, ignore_errors=True)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise ModelError(f"{dst}: the folder for the verified model copy must be empty")
    local = _download(res.artifact_location, dst, tracking_uri)
    verify_model_dir(local, trusted_digest=res.trusted_digest, where=label)
    return local, res


def load_verified_model(model_uri: str, tracking_uri: str):
    """``mlflow.pyfunc`` model of ``model_uri``, loaded from a local copy verified by :func:`verified_local_copy`."""
    import mlflow

    from medmtl.tracking.store import using_tracking_uri

    local, _ = verified_local_copy(model_uri, tracking_uri)
    with using_tracking_uri(tracking_uri):  # the model's own load_context looks its record up there
        return mlflow.pyfunc.load_model(str(local))


def record_logged_model_manifest(client, model_id: str, tracking_uri: str) -> str:
    """Write the manifest of logged model ``model_id`` into it and tag the model with its digest; returns the digest.

    Called right after logging; the files hashed are the ones downloaded back from the artifact store.
    """
    with tempfile.TemporaryDirectory(prefix="medmtl-manifest-") as tmp:
        lm = client.get_logged_model(model_id)
        local = _download(lm.artifact_location, Path(tmp), tracking_uri)
        d = write_manifest(local)
        client.log_model_artifact(model_id, str(local / "medmtl_manifest.json"))
    client.set_logged_model_tags(model_id, {DIGEST_TAG: d})
    return d


def record_version_manifest(client, name: str, version: str, model_uri: str, tracking_uri: str) -> str:
    """Verify the files of a new registered version against its logged model's record and tag the version with the digest.

    A model logged before manifests existed gets its manifest now (trust on registration). Raises
    :class:`ModelError` when the files changed since logging (the version keeps no digest, so it never loads).
    """
    model_id = _model_id_of_source(model_uri)
    lm = client.get_logged_model(model_id) if model_id else None
    if lm is None:
        raise ModelError(f"{model_uri}: cannot record a file manifest for a model that is not a logged model (models:/m-...)")
    trusted = lm.tags.get(DIGEST_TAG) or record_logged_model_manifest(client, lm.model_id, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="medmtl-manifest-") as tmp:
        verify_model_dir(_download(lm.artifact_location, Path(tmp), tracking_uri), trusted_digest=trusted,
                         where=f"{name} version {version} ({model_uri})")
    client.set_model_version_tag(name, version, DIGEST_TAG, trusted)
    return trusted


def main(argv: list[str] | None = None) -> int:
    """``python -m medmtl.tracking.model_loading MODEL_URI --out DIR``: a verified local copy to serve."""
    from medmtl.tracking.store import resolve_tracking_uri

    ap = argparse.ArgumentParser(prog="python -m medmtl.tracking.model_loading", description=main.__doc__)
    ap.add_argument("model_uri")
    ap.add_argument("--out", required=True, help="empty folder for the verified copy (then: mlflow models serve -m OUT)")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    try:
        local, res = verified_local_copy(args.model_uri, resolve_tracking_uri(args.tracking_uri)[0], args.out)
    except MedmtlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"verified {res.version or res.model_id} into {local}; serve it with: mlflow models serve -m {local}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
