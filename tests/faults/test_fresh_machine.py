"""A fresh machine: bare PATH, non-editable install, clean-up after a failure (issue 12, item 1).

Old failures: `mlflow models serve` execs `uvicorn` through PATH, so the served-model test died when the venv's
bin/ was not on PATH (`.venv/bin/python -m pytest` with no virtualenv active), and its clean-up then raised
ProcessLookupError over the real error; dcm2niix missing turned its tests into skips (green); a non-editable
install inside another repository's checkout tagged runs with that repository's commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fault_helpers import ROOT
from medmtl.procenv import interpreter_env, interpreter_tool

BARE = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": "/usr/bin:/bin"}

# every tool the project or its tests start, and an argument that makes it answer and exit
TOOLS = {"mlflow": ["--version"], "uvicorn": ["--version"], "torchrun": ["--help"], "dcm2niix": ["--version"],
         "medmtl": ["--help"]}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_resolves_beside_the_interpreter_with_a_bare_path(name):
    """Missing, a dev dependency fails here (never a skip): a broken install must not turn green."""
    exe = interpreter_tool(name)
    assert Path(exe).parent == Path(sys.executable).parent
    env = interpreter_env(BARE)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    res = subprocess.run([exe, *TOOLS[name]], env=env, capture_output=True, text=True, timeout=120)
    # dcm2niix --version exits 3 by design; every other tool exits 0
    assert res.returncode in ((0, 3) if name == "dcm2niix" else (0,)), res.stderr[-2000:]


def test_clean_up_of_a_process_that_is_already_gone_does_not_raise():
    from tracking_helpers import stop_group

    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    stop_group(proc)  # killpg on a vanished group raised ProcessLookupError over the test's real failure


def _code_version_of(site: Path) -> str:
    code = "from medmtl.tracking.run import code_version; print(code_version())"
    env = interpreter_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, PYTHONPATH=str(site))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=site, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_installed_copy_inside_another_checkout_is_not_tagged_with_its_commit(tmp_path):
    import medmtl

    other = tmp_path / "someone_elses_repo"
    site = other / ".venv" / "lib" / "site-packages"
    shutil.copytree(Path(medmtl.__file__).parent, site / "medmtl", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "README").write_text("another project\n")
    git = ["git", "-C", str(other), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-qm", "theirs"], check=True)
    theirs = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    got = _code_version_of(site)
    assert got == f"installed-{medmtl.__version__}" and theirs not in got


def test_the_projects_own_checkout_is_tagged_with_its_commit():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the project is not a git checkout here (an sdist): nothing to compare")
    assert _code_version_of(ROOT).removesuffix("-dirty") == head.stdout.strip()
