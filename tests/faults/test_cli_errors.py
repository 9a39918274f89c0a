"""Every subcommand, given a bad input, ends in one line ``medmtl <cmd>: error: ...`` and exit 2 (issue 11, item 3).

Before, the CLI caught ``ValueError``/``LookupError`` (hiding bugs) but let user errors such as a secret file
with mode 0644, an unknown run id or a precision that needs CUDA through as tracebacks. The cases run the
real console script, so argument parsing, imports and the error boundary are all exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fault_helpers import ROOT, assert_one_line_error, run_medmtl

TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")
DEMO = str(ROOT / "configs" / "demo.yaml")
BAD_RUN = "0123456789abcdef0123456789abcdef"

# (subcommand as printed, arguments, a word the message must contain); {tmp} is the test's folder
CASES = [
    ("synth", ["synth", "{tmp}/exports", "--ct", "-1"], "n_ct"),
    ("ingest", ["ingest", "{tmp}/no_such_export", "--out", "{tmp}/data"], "no_such_export"),
    ("plan", ["plan", "{tmp}/no_data"], "manifest.jsonl"),
    ("config show", ["config", "show", TINY, "train.stepz=3"], "train.stepz"),
    ("train", ["train", TINY, "--out", "{tmp}/runs", "model.no_such_key=1"], "model.no_such_key"),
    ("train", ["train", "{tmp}/missing.yaml"], "missing.yaml"),
    ("train", ["train", TINY, "data.root={tmp}/no_data", "--out", "{tmp}/runs"], "manifest.jsonl"),
    ("train", ["train", TINY, "--resume", "{tmp}/nothing/last.pt", "data.root={data}"], "last.pt"),
    ("train", ["train", TINY, "train.device=cpu", "train.precision=fp16", "data.root={data}", "--out", "{tmp}/runs"], "train.precision"),
    ("evaluate", ["evaluate", BAD_RUN], BAD_RUN),
    ("compare", ["compare", BAD_RUN, "--baseline", BAD_RUN], BAD_RUN),
    ("register", ["register", BAD_RUN, "--config", DEMO], BAD_RUN),
    ("promote", ["promote", "no-such-model", "3", "--config", DEMO], "no-such-model"),
    ("predict", ["predict", "models:/medmtl-tiny/1", "{tmp}/no_image.nii.gz", "--modality", "CT", "--out", "{tmp}/seg.nii.gz"], "no_image"),
    ("sync", ["sync", "{tmp}"], "spool"),
    ("adapt", ["adapt", "{tmp}/nothing/last.pt"], "last.pt"),
    ("demo", ["demo", TINY, "train.stepz=1", "--workdir", "{tmp}/demo"], "train.stepz"),
    ("study", ["study", "{tmp}/no_study.yaml"], "no_study.yaml"),
    ("sweep", ["sweep", "{tmp}/no_sweep.yaml"], "no_sweep.yaml"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A prepared, empty embedded store (so MLflow's one-time migration messages do not reach stderr)."""
    from medmtl.tracking.store import embedded_store, prepare_store

    uri, _ = embedded_store(tmp_path_factory.mktemp("store"))
    prepare_store(uri)
    return uri


@pytest.mark.parametrize("command,args,word", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_gives_one_line_and_exit_2(command, args, word, tmp_path, store, tiny_dataset):
    fill = {"tmp": str(tmp_path), "data": str(tiny_dataset[0])}
    args = [a.format(**fill) for a in args]
    res = run_medmtl(args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": store})
    line = assert_one_line_error(res, command)
    assert word.format(**fill) in line, line


def test_every_subcommand_has_a_bad_input_case():
    from medmtl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = {n if n != "config" else "config show" for n in sub.choices}
    assert names == {c for c, _, _ in CASES}


def test_secret_file_readable_by_others_is_one_line(tmp_path, tiny_dataset):
    """The case issue 11 names: a pseudonym secret with mode 0644 was a traceback."""
    from medmtl.synth import synthesize_exports

    synth = synthesize_exports(tmp_path / "synth", n_ct=1, n_mr=0, seed=3, ct_matrix=32, mr_matrix=32)
    data = tmp_path / "data"
    data.mkdir()
    (data / ".medmtl_secret").write_text("ab" * 32)
    os.chmod(data / ".medmtl_secret", 0o644)
    res = run_medmtl(["ingest", str(synth.export_dir), "--out", str(data)], cwd=tmp_path)
    assert ".medmtl_secret" in assert_one_line_error(res, "ingest")


def test_a_bug_keeps_its_traceback(capsys):
    """Anything that is not a MedmtlError is a bug: it propagates (traceback) instead of becoming a one-liner."""
    from medmtl import cli
    from medmtl.errors import DataError

    args = cli.parse_args(["config", "show", TINY])
    args.func = lambda a: int("not a number")
    with pytest.raises(ValueError):
        cli.run(args)
    args.func = lambda a: (_ for _ in ()).throw(DataError("manifest x.jsonl:3 is bad;\n re-run ingest"))
    assert cli.run(args) == 2
    assert capsys.readouterr().err == "medmtl config show: error: manifest x.jsonl:3 is bad; re-run ingest\n"


def test_unknown_tracking_uri_scheme_is_one_line(tmp_path):
    res = run_medmtl(["register", BAD_RUN, "--config", DEMO], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "htp://127.0.0.1:5000"})
    assert "MLFLOW_TRACKING_URI='htp://127.0.0.1:5000'" in assert_one_line_error(res, "register")
