"""Where runs go: a tracking server from ``MLFLOW_TRACKING_URI`` / the config, or the embedded store.

The embedded default is a SQLite database and an artifact folder under ``mlflow/`` (MLflow 3.x refuses
the plain file store). A fresh SQLite database is created and migrated by the first client that opens
it, and two processes doing that at once fail ("table already exists", "database is locked"). So the
store is prepared exactly once, by :func:`prepare_store`, in the launching process before any worker or
rank starts (``run_training`` calls it through :func:`ensure_experiment` on rank 0 before the trainer
exists, and under a file lock, so two runs started at the same moment are safe too). A tracking server
owns its database; nothing is prepared on the client side then.

A server with users (MLflow's basic-auth app, ``mlflow/README.md``) takes its login from
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` only. :func:`resolve_tracking_uri` refuses an
``http(s)`` URI that carries ``user:password@`` (MLflow prints the URI in clear: "View run ... at: URL"),
and a password in the config's ``tracking.tracking_uri`` of any scheme (the config is logged as the run's
params and ``config.yaml``). :func:`tracking_error` turns the server's 401 and 403 into one-line
:class:`~medmtl.errors.TrackingError` messages that say which variables to set or which grant is missing.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medmtl.errors import TrackingError

__all__ = ["resolve_tracking_uri", "embedded_store", "prepare_store", "ensure_experiment", "ui_command",
           "apply_http_settings", "using_tracking_uri", "get_run", "tracking_error", "tracking_errors", "redact_uri",
           "refuse_credentials", "DEFAULT_STORE_DIR"]

DEFAULT_STORE_DIR = Path("mlflow")


def embedded_store(root: str | Path = DEFAULT_STORE_DIR) -> tuple[str, str]:
    """``(tracking_uri, artifact_root_uri)`` of the embedded SQLite store under ``root``."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def redact_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` replaced by ``***@`` (safe to print or log)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def refuse_credentials(uri: str, source: str) -> None:
    """Raise :class:`~medmtl.errors.TrackingError` when ``uri`` carries a login MLflow would print or medmtl log.

    ``source`` names where the URI came from (``tracking.tracking_uri``, ``MLFLOW_TRACKING_URI``,
    ``--tracking-uri``): an ``http(s)`` URI with ``user[:password]@`` is refused from any source, a
    password in any other scheme only from the config key (whose value is logged as a param).
    """
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts.scheme in ("http", "https"):
        raise TrackingError(
            f"{source} carries a user name and password ({redact_uri(uri)}), which MLflow prints in clear: "
            f"use {bare} and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment instead")
    if source == "tracking.tracking_uri" and parts.password is not None:
        raise TrackingError(
            f"tracking.tracking_uri carries a password ({redact_uri(uri)}) and the config is logged as the run's params: "
            "put this URI in the MLFLOW_TRACKING_URI environment variable instead (it is not logged)")


def resolve_tracking_uri(configured: str | None) -> tuple[str, str | None]:
    """``(tracking_uri, artifact_root or None)``: config value, else ``$MLFLOW_TRACKING_URI``, else embedded.

    Raises :class:`~medmtl.errors.TrackingError` for a URI with credentials in it (see the module docstring).
    """
    if configured:
        refuse_credentials(configured, "tracking.tracking_uri")
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        refuse_credentials(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        _check_scheme(uri, "tracking.tracking_uri" if configured else "MLFLOW_TRACKING_URI")
    if uri and uri.startswith("sqlite:///"):
        # artifacts beside the database, not in MLflow's default ./mlruns of whatever folder we run in
        return uri, (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    if uri:
        return uri, None
    return embedded_store()


def _check_scheme(uri: str, where: str) -> None:
    """A :class:`TrackingError` naming ``where`` when no MLflow tracking store handles the URI's scheme."""
    from urllib.parse import urlsplit

    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    scheme = urlsplit(uri).scheme.split("+")[0]
    registered = set(getattr(_tracking_store_registry, "_registry", {}))
    known = sorted(s for s in registered if s)
    if registered and scheme not in registered:
        raise TrackingError(f"{where}={uri!r}: MLflow cannot track to a {scheme!r} URI (it knows "
                            f"{', '.join(known)}); use e.g. http://HOST:5000 or sqlite:///PATH/mlflow.db")


def apply_http_settings(tracking) -> None:
    """Bound MLflow's HTTP timeouts and retries for this process from a ``TrackingConfig``.

    MLflow reads these environment variables at every request; its defaults (120 s timeout, 7 retries
    with backoff 2) block one call for minutes when the server is down. The config wins over values
    already in the environment, so a run behaves as its logged config says.
    """
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(tracking.http_timeout_s))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(tracking.http_max_retries))
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(int(tracking.http_backoff_factor))


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """Exclusive lock beside a SQLite database (no-op for servers and other databases)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_store(tracking_uri: str) -> None:
    """Create and migrate an embedded SQLite store once; call before starting workers or ranks.

    Idempotent and safe against concurrent callers (file lock). For a server URI it does nothing.
    """
    if not tracking_uri.startswith("sqlite:"):
        return
    with _store_lock(tracking_uri):
        # the first query creates the tables and runs MLflow's migrations
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def tracking_error(err: BaseException, tracking_uri: str, *, doing: str) -> TrackingError | None:
    """A one-line :class:`~medmtl.errors.TrackingError` for a login the server refused, else ``None``.

    ``doing`` says what was attempted ("log runs to experiment 1"). HTTP 401 (no login, or a wrong
    one) names the variables to set; HTTP 403 (a valid user without the grant) names the user and says
    which permission to ask the server's admin for.
    """
    if not isinstance(err, MlflowException):
        return None
    status = err.get_http_status_code()
    where = redact_uri(tracking_uri)
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 or err.error_code == "UNAUTHENTICATED":
        if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            return TrackingError(
                f"the tracking server at {where} refused the login of user {user!r} (HTTP 401, wrong user name or password) "
                f"trying to {doing}: check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        return TrackingError(
            f"the tracking server at {where} wants credentials (HTTP 401) to {doing}: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD in the environment (never in the config or the URI; see mlflow/README.md)")
    if status == 403 or err.error_code == "PERMISSION_DENIED":
        return TrackingError(
            f"user {user!r} lacks permission to {doing} on the tracking server at {where} (HTTP 403): ask its admin "
            "for the grant (EDIT on the experiment to train, see mlflow/README.md, users and permissions)")
    return None


@contextmanager
def tracking_errors(tracking_uri: str, *, doing: str) -> Iterator[None]:
    """Re-raise a 401 or 403 of MLflow inside the block as :func:`tracking_error`'s one-line message."""
    try:
        yield
    except MlflowException as err:
        mapped = tracking_error(err, tracking_uri, doing=doing)
        if mapped is None:
            raise
        raise mapped from err


def ensure_experiment(name: str, tracking_uri: str, artifact_root: str | None) -> str:
    """Prepare the store, then create (once) or look up the experiment; returns its id.

    A login the server refuses is a one-line :class:`~medmtl.errors.TrackingError` (:func:`tracking_error`).
    """
    prepare_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    with _store_lock(tracking_uri), tracking_errors(tracking_uri, doing=f"open experiment {name!r}"):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=f"{artifact_root}/{name}" if artifact_root else None)
        except MlflowException:
            # another client of the same server created it in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


@contextmanager
def using_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """Make ``tracking_uri`` MLflow's process-wide URI for a block, then restore the previous one.

    Some MLflow calls read only the global URI (fluent ``start_run``, resolving a ``models:/<id>``
    source when a version is created); setting it for good would send later calls of the same process
    (tests, notebooks, a second run) to this store, and ``mlflow.set_tracking_uri`` also rewrites
    ``MLFLOW_TRACKING_URI`` in the environment.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_global, old_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def get_run(client: MlflowClient, run_id: str):
    """``client.get_run(run_id)``; an unknown id or an unreachable store is a :class:`TrackingError` naming both."""
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        uri = client.tracking_uri
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            raise TrackingError(f"run {run_id!r} not found at {uri}; copy the run id from `medmtl train` or the MLflow UI, "
                                "and check MLFLOW_TRACKING_URI") from None
        raise TrackingError(f"cannot read run {run_id!r} from {uri}: {str(err).splitlines()[0][:300]}; "
                            "check that the tracking server is up (see mlflow/README.md)") from None


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store (on 127.0.0.1)."""
    if tracking_uri.startswith("sqlite:"):
        root = Path(tracking_uri[len("sqlite:///"):]).parent
        return f"mlflow ui --backend-store-uri {tracking_uri} --default-artifact-root {(root / 'artifacts').as_uri()} --host 127.0.0.1 --port 5000"
    return f"open {tracking_uri} in a browser"
