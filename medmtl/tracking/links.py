"""Links into the MLflow UI: the run page, the logged-model page and the model-version page.

MLflow 3's UI opens in one of two workflow views: ``genai`` (traces, evaluations; no model registry in
the sidebar) or ``machine_learning`` (runs, models, the registry). It takes the view from the page's
``workflowType`` URL parameter, else from the browser's stored choice, which defaults to ``genai``
(``mlflow/server/js``: ``key:"mlflow.workflowType"``, ``initialValue: GENAI``). The experiment's tabs
follow its ``mlflow.experimentKind`` tag. So every link carries ``workflowType=machine_learning`` and
:func:`mark_model_training` tags the experiment ``custom_model_development``.

With the embedded SQLite store the UI is the one ``mlflow ui`` serves (``ui_command``), on
``http://127.0.0.1:5000`` unless ``MEDMTL_UI_URL`` names another address.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["WORKFLOW_PARAM", "ui_base_url", "run_url", "logged_model_url", "model_version_url", "mark_model_training", "Links",
           "logged_model_id"]

WORKFLOW_PARAM = "workflowType=machine_learning"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
DEFAULT_UI = "http://127.0.0.1:5000"


def ui_base_url(tracking_uri: str) -> str:
    """The UI's address for ``tracking_uri``: the server itself, or where ``mlflow ui`` serves a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri
        if "@" in base.split("//", 1)[1].split("/", 1)[0]:  # never print credentials embedded in the URI
            scheme, rest = base.split("//", 1)
            base = f"{scheme}//{rest.split('@', 1)[1]}"
        return base.rstrip("/")
    return os.environ.get("MEDMTL_UI_URL", DEFAULT_UI).rstrip("/")


def _page(tracking_uri: str, route: str) -> str:
    return f"{ui_base_url(tracking_uri)}/#{route}?{WORKFLOW_PARAM}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str, tab: str | None = None) -> str:
    """Run page (``tab``: ``model-metrics``, ``artifacts``, ...), in the model-training view."""
    return _page(tracking_uri, f"/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else ""))


def logged_model_url(tracking_uri: str, experiment_id: str, model_id: str) -> str:
    """Logged-model page of a run's model."""
    return _page(tracking_uri, f"/experiments/{experiment_id}/models/{model_id}")


def model_version_url(tracking_uri: str, name: str, version: str) -> str:
    """Model-version page in the registry."""
    return _page(tracking_uri, f"/models/{quote(name, safe='')}/versions/{version}")


def mark_model_training(client, experiment_id: str) -> None:
    """Tag the experiment as model development, so its page shows runs and models rather than traces."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment(experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != "custom_model_development":
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    except MlflowException as err:  # a user who may log runs but not edit the experiment (403): cosmetic, go on
        logging.getLogger(__name__).info("experiment %s not tagged for the model-training view: %s", experiment_id,
                                         err.message.splitlines()[0] if err.message else err)


def logged_model_id(uri: str | None) -> str | None:
    """The id in a logged model's URI ``models:/<model_id>``; ``None`` for any other URI (a registered
    ``models:/<name>/<version>`` or ``models:/<name>@<alias>``, ``runs:/...``)."""
    if not uri or not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    return rest if rest and "/" not in rest and "@" not in rest else None


@dataclass
class Links:
    """Pages a command points the user at; :meth:`text` prints them one per line."""

    run: str | None = None
    model: str | None = None
    model_version: str | None = None

    def text(self) -> str:
        """``run page: URL`` lines for the pages that exist."""
        rows = [("run page", self.run), ("logged model", self.model), ("model version", self.model_version)]
        return "\n".join(f"{label + ':':15s} {url}" for label, url in rows if url)
