"""mlflow/README.md's basic-auth ini works as pasted; the launcher refuses one that MLflow would misread.

Before the fix: the README's ini carried ``; comments`` after values, which MLflow's ``ConfigParser`` keeps
as part of them (``default_permission = 'READ   ; what every user may do ...'``): the server started without
a word and answered every non-admin request with HTTP 500 (``KeyError`` in ``get_permission``). Reverting
the README makes ``test_readme_ini_reads_as_mlflow_reads_it`` fail; reverting the launcher's check makes
``test_launcher_refuses_a_comment_after_a_value`` fail (``--print`` exited 0). The auth extra was not
installable through the project (``test_server_extra_brings_the_auth_app``).
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "mlflow" / "README.md"

# the snippet as the README carried it before the fix
OLD_SNIPPET = """[mlflow]
default_permission = READ                        ; what every user may do without a grant
database_uri = sqlite:///mlflow/basic_auth.db    ; or postgresql://...
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def readme_ini() -> str:
    """The README's ``ini`` block, verbatim."""
    (block,) = re.findall(r"```ini\n(.*?)```", README.read_text(), flags=re.S)
    return block


def test_readme_ini_reads_as_mlflow_reads_it(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.permissions import get_permission

    ini = tmp_path / "basic_auth.ini"
    ini.write_text(readme_ini())
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    cfg = read_auth_config()
    assert get_permission(cfg.default_permission).name == "READ"  # what every non-admin request looks up
    assert cfg.database_uri == "sqlite:///mlflow/basic_auth.db"
    assert cfg.admin_username == "admin"
    assert cfg.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"


def test_readme_says_where_mlflows_own_ini_lives():
    import mlflow

    own = Path(mlflow.__file__).parent / "server" / "auth" / "basic_auth.ini"
    assert own.is_file()
    # the README's one-liner prints that file's path
    (code,) = re.findall(r'python -c "(import mlflow[^"]*basic_auth\.ini[^"]*)"', README.read_text())
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(printed) == own
    assert "site-packages/mlflow/server/auth/basic_auth.ini" in README.read_text()


def serve(argv: list[str]) -> int:
    """``mlflow/serve.py`` run in this process (it only prints with ``--print``)."""
    return runpy.run_path(str(ROOT / "mlflow" / "serve.py"), run_name="serve")["main"](argv)


def test_launcher_refuses_a_comment_after_a_value(tmp_path, monkeypatch, capsys):
    ini = tmp_path / "old.ini"
    ini.write_text(OLD_SNIPPET)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    assert serve(["--store", str(tmp_path / "s"), "--basic-auth", "--print"]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and out.out == ""
    assert str(ini) in lines[0] and "default_permission" in lines[0] and "comments on their own lines" in lines[0]


def test_launcher_accepts_the_readme_ini(tmp_path, monkeypatch, capsys):
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(readme_ini())
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    assert serve(["--store", str(tmp_path / "s"), "--basic-auth", "--print"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("--app-name basic-auth")


@pytest.mark.parametrize("line, says", [("default_permission = read", "is not one of"),
                                        ("database_uri =", "database_uri is missing")])
def test_launcher_refuses_values_mlflow_cannot_use(tmp_path, monkeypatch, capsys, line, says):
    key = line.split(" =")[0]
    text = "\n".join(line if ln.startswith(key + " ") else ln for ln in readme_ini().splitlines())
    ini = tmp_path / "bad.ini"
    ini.write_text(text)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    assert serve(["--store", str(tmp_path / "s"), "--basic-auth", "--print"]) == 2
    assert says in capsys.readouterr().err


def test_server_extra_brings_the_auth_app():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("mlflow[auth]") for r in extras["server"]) and any(r.startswith("Flask-WTF") for r in extras["server"])
    assert "medmtl[server]" in extras["dev"]  # the auth tests run in `make test`
    # and it is installed here: the basic-auth app imports (it refuses to without Flask-WTF)
    import importlib

    assert importlib.import_module("mlflow.server.auth").create_app
    assert sys.modules["flask_wtf"]
