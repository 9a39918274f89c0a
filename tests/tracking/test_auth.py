"""mlflow/README.md's basic-auth set-up, followed to the letter on a real server, lets in only who belongs.

One ``mlflow server --app-name basic-auth`` for the module, started through ``mlflow/serve.py --basic-auth``
with the auth config written from the README's ``ini`` block as it stands and the admin's steps run from the
README's ``python`` block as they stand (only the port and the experiment name changed). Then, through the
real ``medmtl`` console script: no login and a wrong password are refused (401) in one line naming the
variables to set; a READ user is refused to log (403) in one line naming the user; a login put in the URI
is refused before MLflow sees it; the EDIT user trains the tiny config, and no password appears in the
run's params, tags, artifacts (the logged model's too), the run folder or the terminal; a spool that a
refused login could not send stays on disk until ``medmtl sync`` runs with the EDIT user's login.

Before the fix (each checked by reverting it; the one-line checks rely on the CLI printing a MedmtlError
as ``medmtl <command>: error: ...``): the README's ini made every non-admin request HTTP 500
(``test_documented_set_up_works_as_pasted`` fails), its password-rotation line failed ("Current password
is required": the fixture fails); with the 401/403 mapping reverted, no login ended in a traceback
(``test_no_login_and_a_wrong_one_are_refused_in_one_line``) and 403 said "cannot start an MLflow run ...
Start the server" (``test_read_user_is_refused_to_log_in_one_line``); with the URI check reverted a login in
the URI was used as given and the run trained (``test_login_in_the_uri_is_refused_before_mlflow_sees_it``); and with
401/403 counted as rejections, ``medmtl sync`` without a login dropped every spooled record
(``test_a_refused_login_keeps_the_spool_for_sync``).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from medmtl.procenv import interpreter_tool
from medmtl.tracking.spool import Spool
from tracking_helpers import ROOT, TINY_CONFIG, MlflowServer, clean_env, free_port

pytestmark = pytest.mark.slow

README = ROOT / "mlflow" / "README.md"
EXPERIMENT = "medmtl-tests"  # tracking.experiment of tests/configs/tiny.yaml
ADMIN_OLD, ADMIN_NEW = "a-long-admin-password", "a-new-admin-password"  # as the README writes them
USERS = {"alice": "alice-password", "bob": "bob-password"}  # alice: EDIT, bob: READ (README's admin block)
SECRETS = (ADMIN_OLD, ADMIN_NEW, *USERS.values(), "wrong-password-123")


def readme_block(lang: str, must_contain: str) -> str:
    """The README's fenced ``lang`` block that contains ``must_contain``, verbatim."""
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if must_contain in b]
    assert len(found) == 1, f"{README}: expected one ```{lang} block with {must_contain!r}, found {len(found)}"
    return found[0]


def api(uri: str, path: str, auth: tuple[str, str] | None, **params) -> requests.Response:
    """GET an MLflow REST endpoint as ``auth`` (``None``: no login)."""
    return requests.get(f"{uri}/api/2.0/mlflow/{path}", params=params, auth=auth, timeout=30)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, empty_db):
    """The README's set-up: ini from its block, server through ``serve.py --basic-auth``, its admin block run."""
    root = tmp_path_factory.mktemp("auth_server")  # plays the repository root: the server starts here
    store = root / "mlflow"
    store.mkdir()
    shutil.copyfile(empty_db, store / "mlflow.db")
    ini = store / "basic_auth.ini"
    ini.write_text(readme_block("ini", "default_permission"))
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_OLD,
           "MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    srv = MlflowServer(store=store, port=free_port(), args=("--basic-auth",), env=env, cwd=root).start()
    try:
        admin = readme_block("python", "get_app_client")
        assert 'uri = "http://127.0.0.1:5000"' in admin and '"medmtl-demo"' in admin
        admin = admin.replace('uri = "http://127.0.0.1:5000"', f'uri = "{srv.uri}"').replace('"medmtl-demo"', f'"{EXPERIMENT}"')
        done = subprocess.run([sys.executable, "-c", admin], env=clean_env(), cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"README's admin block failed:\n{done.stderr[-3000:]}"
        exp = api(srv.uri, "experiments/get-by-name", ("admin", ADMIN_NEW), experiment_name=EXPERIMENT)
        assert exp.status_code == 200, exp.text
        yield {"server": srv, "uri": srv.uri, "root": root, "experiment_id": exp.json()["experiment"]["experiment_id"],
               "auth_db": root / "mlflow" / "basic_auth.db"}
    finally:
        srv.kill()


def admin_client(uri: str, monkeypatch) -> MlflowClient:
    """An MLflow client logged in as the admin (with the rotated password)."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_NEW)
    return MlflowClient(tracking_uri=uri)


def medmtl(args: list[str], cwd, *, uri: str, user: str | None = None, password: str | None = None) -> subprocess.CompletedProcess:
    """``medmtl ARGS`` through the console script, this checkout's code first, logged in as ``user`` (or not).

    MLflow's own login variables are set here alone (``clean_env`` drops the caller's ``MLFLOW_*``).
    """
    env = {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return subprocess.run([interpreter_tool("medmtl"), *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=900)


def train(auth_server, tiny_dataset, tmp_path, *, user: str | None, password: str | None, uri: str | None = None,
          overrides: list[str] = ()):
    """``medmtl train`` of the tiny config (:func:`medmtl`), into ``tmp_path/runs``."""
    data_dir, _ = tiny_dataset
    tmp_path.mkdir(parents=True, exist_ok=True)
    return medmtl(["train", str(TINY_CONFIG), f"data.root={data_dir}", "tracking.overlay_cases=1", "tracking.http_max_retries=0",
                   *overrides, "--out", str(tmp_path / "runs")], tmp_path, uri=uri or auth_server["uri"], user=user, password=password)


def one_line_error(res: subprocess.CompletedProcess, prefix: str = "medmtl train: error: ") -> str:
    """Exit 2, no traceback, one ``prefix...`` line on stderr; returns that line."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, f"exit {res.returncode}, stderr:\n{res.stderr[-4000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    assert len(lines) == 1 and lines[0].startswith(prefix), res.stderr[-4000:]
    return lines[0]


def no_secret_in(text: str | bytes, where: str) -> None:
    """No password of this module appears in ``text``."""
    for s in SECRETS:
        assert (s.encode() if isinstance(text, bytes) else s) not in text, f"password {s!r} found in {where}"


def test_documented_set_up_works_as_pasted(auth_server):
    uri = auth_server["uri"]
    # the admin's rotation took: the new password works, the old one no longer does
    assert api(uri, "experiments/get-by-name", ("admin", ADMIN_NEW), experiment_name=EXPERIMENT).status_code == 200
    assert api(uri, "experiments/get-by-name", ("admin", ADMIN_OLD), experiment_name=EXPERIMENT).status_code == 401
    # non-admin users are answered, on their granted experiment and on one they hold no grant for, which
    # default_permission decides (a comment kept in its value made this HTTP 500)
    for user, pw in USERS.items():
        res = api(uri, "experiments/get-by-name", (user, pw), experiment_name=EXPERIMENT)
        assert res.status_code == 200, (user, res.status_code, res.text[:300])
        res = api(uri, "experiments/get", (user, pw), experiment_id="0")
        assert res.status_code == 200, (user, res.status_code, res.text[:300])
    # the users database is where the README's ini says: relative to the folder the server starts in
    assert auth_server["auth_db"].is_file()


def test_unauthenticated_and_wrong_password_requests_get_401(auth_server):
    uri, exp_id = auth_server["uri"], auth_server["experiment_id"]
    assert api(uri, "experiments/get", None, experiment_id=exp_id).status_code == 401
    assert api(uri, "experiments/get", ("alice", "wrong-password-123"), experiment_id=exp_id).status_code == 401
    assert api(uri, "experiments/get", ("nobody", "wrong-password-123"), experiment_id=exp_id).status_code == 401


def test_no_login_and_a_wrong_one_are_refused_in_one_line(auth_server, tiny_dataset, tmp_path, monkeypatch):
    client = admin_client(auth_server["uri"], monkeypatch)
    before = len(client.search_runs([auth_server["experiment_id"]]))
    line = one_line_error(train(auth_server, tiny_dataset, tmp_path / "none", user=None, password=None))
    assert "wants credentials" in line and "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_PASSWORD" in line, line
    res = train(auth_server, tiny_dataset, tmp_path / "wrong", user="alice", password="wrong-password-123")
    line = one_line_error(res)
    assert "refused the login of user 'alice'" in line and "MLFLOW_TRACKING_PASSWORD" in line, line
    no_secret_in(res.stdout + res.stderr, "the terminal")
    assert len(client.search_runs([auth_server["experiment_id"]])) == before  # refused before any run existed


def test_read_user_is_refused_to_log_in_one_line(auth_server, tiny_dataset, tmp_path, monkeypatch):
    client = admin_client(auth_server["uri"], monkeypatch)
    before = len(client.search_runs([auth_server["experiment_id"]]))
    res = train(auth_server, tiny_dataset, tmp_path, user="bob", password=USERS["bob"])
    line = one_line_error(res)
    assert "user 'bob' lacks permission" in line and "HTTP 403" in line and "EDIT" in line, line
    assert "Start the server" not in line
    no_secret_in(res.stdout + res.stderr, "the terminal")
    assert len(client.search_runs([auth_server["experiment_id"]])) == before


@pytest.mark.parametrize("where", ["MLFLOW_TRACKING_URI", "tracking.tracking_uri"])
def test_login_in_the_uri_is_refused_before_mlflow_sees_it(auth_server, tiny_dataset, tmp_path, monkeypatch, where):
    client = admin_client(auth_server["uri"], monkeypatch)
    before = len(client.search_runs([auth_server["experiment_id"]]))
    bare = auth_server["uri"]
    with_login = bare.replace("http://", f"http://alice:{USERS['alice']}@")
    if where == "MLFLOW_TRACKING_URI":
        res = train(auth_server, tiny_dataset, tmp_path, user=None, password=None, uri=with_login)
    else:
        res = train(auth_server, tiny_dataset, tmp_path, user=None, password=None, overrides=[f"tracking.tracking_uri={with_login}"])
    line = one_line_error(res)
    assert f"{where} carries a user name and password" in line and f"use {bare}" in line, line
    no_secret_in(res.stdout + res.stderr, "the terminal")
    # refused before any run, spool or checkpoint existed
    assert len(client.search_runs([auth_server["experiment_id"]])) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_edit_user_trains_and_no_credential_leaks(auth_server, tiny_dataset, tmp_path, monkeypatch):
    res = train(auth_server, tiny_dataset, tmp_path, user="alice", password=USERS["alice"])
    assert res.returncode == 0, res.stderr[-4000:]
    no_secret_in(res.stdout + res.stderr, "the terminal")
    run_id = re.search(r"run id: ([0-9a-f]{32})", res.stdout).group(1)
    client = admin_client(auth_server["uri"], monkeypatch)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == auth_server["experiment_id"]
    assert run.data.params and run.data.metrics
    no_secret_in(repr(run.data.params) + repr(run.data.tags), "the run's params and tags")
    # every artifact (config, plan, plots, overlays, the model with its bundled code), byte for byte
    art = tmp_path / "artifacts"
    art.mkdir()
    client.download_artifacts(run_id, "", str(art / "run"))
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    mlflow.artifacts.download_artifacts(artifact_uri=models[0].artifact_location, dst_path=str(art / "model"),
                                        tracking_uri=auth_server["uri"])
    files = [p for p in art.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "MLmodel" for p in files)
    for p in files:
        no_secret_in(p.read_bytes(), f"artifact {p.relative_to(art)}")
    # the run's folder: checkpoints, and the spool while it held records (removed once all were sent)
    left = [p for p in (tmp_path / "runs" / run_id).rglob("*") if p.is_file()]
    assert any(p.name == "last.pt" for p in left)
    for p in left:
        no_secret_in(p.read_bytes(), f"{p.relative_to(tmp_path)}")
    # MLflow's "View run ... at: URL" line shows the bare server address
    assert f"at: {auth_server['uri']}/" in res.stdout + res.stderr


def test_a_refused_login_keeps_the_spool_for_sync(auth_server, tmp_path, monkeypatch):
    client = admin_client(auth_server["uri"], monkeypatch)
    run_id = client.create_run(auth_server["experiment_id"]).info.run_id
    folder = tmp_path / "mlflow_spool"
    spool = Spool(folder, run_id=run_id, tracking_uri=auth_server["uri"])
    ts = int(time.time() * 1000)
    spool.append([{"op": "metrics", "items": [["train/loss", 1.0, ts, 0], ["train/loss", 0.5, ts, 1]]}], durable=True)
    spool.close()
    # without a login: one line naming the variables, and both points stay on disk (they used to be dropped)
    res = medmtl(["sync", str(folder)], tmp_path, uri=auth_server["uri"])
    line = one_line_error(res, prefix="error: ")
    assert "wants credentials" in line and "MLFLOW_TRACKING_USERNAME" in line, line
    kept = Spool(folder, run_id=run_id, tracking_uri=auth_server["uri"])
    assert kept.n_unsent == 1
    kept.close()
    assert client.get_metric_history(run_id, "train/loss") == []
    # the EDIT user sends them
    res = medmtl(["sync", str(folder)], tmp_path, uri=auth_server["uri"], user="alice", password=USERS["alice"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.0, 0.5]
    assert not folder.exists()
