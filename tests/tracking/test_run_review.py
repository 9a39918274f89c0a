"""A run read as a reviewer reads it, through a real tracking server's REST API (MlflowClient on http://):
honest evaluation, curves, a run that explains itself, the model page agreeing with the registry, links into
the model-training view, no noise, the ingest report. Two tiny runs: one with a test split, one without."""

from __future__ import annotations

import json
import re
import shutil

import mlflow
import numpy as np
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from medmtl.cli import main as medmtl
from tracking_helpers import MODEL_NAME, TINY_CONFIG, MlflowServer, free_port
from tracking_phi import assert_no_phi

pytestmark = pytest.mark.slow

STEPS = 6
ML_VIEW = "?workflowType=machine_learning"


@pytest.fixture(scope="module")
def server(tmp_path_factory, empty_db):
    store = tmp_path_factory.mktemp("review_store")
    shutil.copyfile(empty_db, store / "mlflow.db")
    srv = MlflowServer(store=store, port=free_port()).start()
    yield srv
    srv.kill()


def _train(server, data_dir, *extra: str):
    from medmtl.config import load_config
    from pipelines.train import run_training

    cfg = load_config(TINY_CONFIG, [f"data.root={data_dir}", f"tracking.tracking_uri={server.uri}", f"train.steps={STEPS}",
                                    "train.val_every=1", "tracking.overlay_cases=1", "tracking.system_metrics_interval_s=5",
                                    *extra])
    return run_training(cfg, out_dir=server.store / "runs", progress=False)


@pytest.fixture(scope="module")
def runs(server, tiny_dataset, tmp_path_factory):
    """``{"test": ..., "val_only": ...}``: TrainResult, run, registered version and CLI outputs of each."""
    data_dir, synth = tiny_dataset
    cfg_path = tmp_path_factory.mktemp("review_cfg") / "cfg.yaml"
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw["tracking"].update({"tracking_uri": server.uri, "gate": {}})
    cfg_path.write_text(yaml.safe_dump(raw))
    out = {}
    for name, extra in (("test", ("data.val_fraction=0.34", "data.test_fraction=0.34")), ("val_only", ())):
        res = _train(server, data_dir, *extra)
        out[name] = {"res": res, "cfg": str(cfg_path)}
    return out, synth, data_dir


def _client(server) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = medmtl(list(argv))
    return code, capsys.readouterr().out


# ------------------------------------------------------------------------------------------- 1. honest evaluation
def test_test_metrics_only_with_a_test_split_and_promotion_needs_them(server, runs, capsys):
    (by, _, _), client = runs, _client(server)
    with_test = client.get_run(by["test"]["res"].run_id)
    val_only = client.get_run(by["val_only"]["res"].run_id)
    assert {k for k in with_test.data.metrics if k.startswith("test/dice/")} >= {"test/dice/ct/liver", "test/dice/mr/mean"}
    assert not [k for k in val_only.data.metrics if k.startswith("test/")]
    assert with_test.data.tags["medmtl.scores_set"] == "test" and val_only.data.tags["medmtl.scores_set"] == "validation (no test set)"

    # the test cases are neither training nor validation cases
    path = mlflow.artifacts.download_artifacts(run_id=with_test.info.run_id, artifact_path="evaluation/test_dice.json",
                                               tracking_uri=server.uri)
    test_cases = {r["case_id"] for r in json.loads(open(path).read())["per_case"]}
    inputs = {d.tags[0].value: json.loads(d.dataset.profile) for d in with_test.inputs.dataset_inputs}
    assert test_cases and inputs["test"]["ct"]["cases"] == 1 and inputs["training"]["ct"]["cases"] == 1

    code, out = _cli(capsys, "register", val_only.info.run_id, "--config", by["val_only"]["cfg"])
    assert code == 0
    version = re.search(r"version (\d+)", out).group(1)
    mv = client.get_model_version(MODEL_NAME, version)
    assert "validation Dice (no test set)" in mv.description and mv.tags["medmtl.scores_set"] == "validation Dice (no test set)"
    assert not [k for k in mv.tags if k.startswith("test/")] and "val/dice/ct/liver" in mv.tags

    code, out = _cli(capsys, "promote", MODEL_NAME, version, "--config", by["val_only"]["cfg"])
    assert code == 1 and "NOT promoted" in out and "no test-set Dice" in out and "--allow-validation-scores" in out
    with pytest.raises(Exception):
        client.get_model_version_by_alias(MODEL_NAME, "champion")
    code, out = _cli(capsys, "promote", MODEL_NAME, version, "--config", by["val_only"]["cfg"], "--allow-validation-scores")
    assert code == 0 and str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == version

    code, out = _cli(capsys, "register", with_test.info.run_id, "--config", by["test"]["cfg"])
    mv = client.get_model_version(MODEL_NAME, re.search(r"version (\d+)", out).group(1))
    assert "**Test Dice**" in mv.description and mv.tags["medmtl.scores_set"] == "test" and "test/dice/mr/mean" in mv.tags


# ---------------------------------------------------------------------------------------------------- 2. curves
def test_validation_curves_best_step_and_final_scores_of_best_pt(server, runs):
    (by, _, _), client = runs, _client(server)
    res = by["test"]["res"]
    run = client.get_run(res.run_id)
    for key in [k for k in run.data.metrics if k.startswith("val/")]:
        steps = [m.step for m in client.get_metric_history(res.run_id, key)]
        assert len(set(steps)) >= 6, (key, steps)
    for m in ("ct", "mr"):
        assert f"val/loss/{m}" in run.data.metrics and np.isfinite(run.data.metrics[f"val/loss/{m}"])
    best = int(run.data.tags["medmtl.best_step"])
    assert run.data.metrics["best_step"] == best == res.best_step
    # best.pt is the step with the highest selection score (mean over modalities of the mean Dice)
    score = {}
    for m in ("ct", "mr"):
        for p in client.get_metric_history(res.run_id, f"val/dice/{m}/mean"):
            score.setdefault(p.step, []).append(p.value)
    assert best == max(sorted(score), key=lambda s: np.mean(score[s]))
    # the final scores: one point per test metric; text rounded, metrics not
    assert len(client.get_metric_history(res.run_id, "test/dice/ct/mean")) == 1
    assert run.data.tags["medmtl.dice.ct"] == f"{run.data.metrics['test/dice/ct/mean']:.3f}"
    assert run.data.metrics["test/dice/ct/mean"] == pytest.approx(res.test_dice["ct"]["mean"], abs=1e-12)


# ------------------------------------------------------------------------------------------ 3. explains itself
def test_run_name_description_standard_tags_and_dataset_inputs(server, runs):
    (by, synth, data_dir), client = runs, _client(server)
    a, b = (client.get_run(by[k]["res"].run_id) for k in ("test", "val_only"))
    assert a.info.run_name.startswith("tiny-soft+cross_stitch-gradnorm-") and a.info.run_name != b.info.run_name
    note = a.data.tags["mlflow.note.content"]
    for text in ("**Sharing:** soft at enc0, cross_stitch at enc1", "**Weighting:** gradnorm on `bottleneck`",
                 "* **CT** cases: 1 training, 1 validation, 1 test", "### Dice on the test set (1 CT, 1 MR cases), best.pt (step",
                 "### Overlays", "artifacts/overlays/ct_"):
        assert text in note, text
    assert re.search(r"\* \*\*CT\*\*: liver \d\.\d{3} · spleen \d\.\d{3} · .* · \*\*mean \d\.\d{3}\*\*", note)  # rounded in text
    assert "No test set" in b.data.tags["mlflow.note.content"]
    for tag in ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"):
        assert a.data.tags.get(tag), tag
    ins = {d.tags[0].value: d.dataset for d in a.inputs.dataset_inputs}
    assert set(ins) == {"training", "validation", "test"}
    assert {d.digest for d in ins.values()} == {a.data.tags["medmtl.manifest_sha"]}
    assert all(str(data_dir.resolve()) in d.source for d in ins.values())
    assert json.loads(ins["validation"].profile)["mr"] == {"cases": 1, "images": 1}
    assert {d.tags[0].value for d in b.inputs.dataset_inputs} == {"training", "validation"}
    text = json.dumps([note] + [d.profile + d.source + d.name for d in ins.values()])
    for secret in synth.phi_strings() + synth.uid_strings():
        assert secret not in text


# ------------------------------------------------------------------------------------------ 4. model = registry
def test_registered_version_is_the_logged_model_and_its_page_shows_scores(server, runs):
    (by, _, _), client = runs, _client(server)
    res = by["test"]["res"]
    model_id = res.model_uri.split("/")[-1]
    mv = [v for v in client.search_model_versions(f"name = '{MODEL_NAME}'") if v.run_id == res.run_id][-1]
    assert mv.source == f"models:/{model_id}"  # MLflow keeps the model id in the source (ModelVersion.model_id is not served)
    logged = client.get_logged_model(model_id)
    listed = json.loads(logged.tags["mlflow.modelVersions"])
    assert {"name": MODEL_NAME, "version": str(mv.version)} in listed
    metrics = {m.key: m for m in logged.metrics}
    assert {"test/dice/ct/liver", "test/dice/mr/mean"} <= set(metrics)
    assert metrics["test/dice/ct/mean"].dataset_digest == client.get_run(res.run_id).data.tags["medmtl.manifest_sha"]
    assert metrics["test/dice/ct/mean"].dataset_name.endswith("-test")
    # without a test set the model page shows best.pt's validation Dice
    vo = client.get_logged_model(by["val_only"]["res"].model_uri.split("/")[-1])
    assert {m.key for m in vo.metrics} >= {"val/dice/ct/mean"} and not any(m.key.startswith("test/") for m in vo.metrics)


# ------------------------------------------------------------------------------------------------------ 5. links
def test_links_open_run_and_version_pages_in_the_model_training_view(server, runs, capsys):
    (by, _, _), client = runs, _client(server)
    res = by["test"]["res"]
    eid = client.get_run(res.run_id).info.experiment_id
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"
    assert res.links.run == f"{server.uri}/#/experiments/{eid}/runs/{res.run_id}{ML_VIEW}"
    assert res.links.model.endswith(f"/#/experiments/{eid}/models/{res.model_uri.split('/')[-1]}{ML_VIEW}")
    assert res.links.run in res.summary()
    code, out = _cli(capsys, "register", res.run_id, "--config", by["test"]["cfg"])
    version = re.search(r"version (\d+)", out).group(1)
    assert res.links.run in out and f"{server.uri}/#/models/{MODEL_NAME}/versions/{version}{ML_VIEW}" in out
    code, out = _cli(capsys, "promote", MODEL_NAME, version, "--config", by["test"]["cfg"])
    assert f"#/models/{MODEL_NAME}/versions/{version}{ML_VIEW}" in out and res.links.run in out
    assert requests.get(res.links.run.split("#")[0], timeout=10).status_code == 200  # the UI itself answers there


# ------------------------------------------------------------------------------------------------ 6. less noise
def test_params_are_the_reviewers_and_each_quantity_is_logged_once(server, runs):
    (by, _, _), client = runs, _client(server)
    run = client.get_run(by["test"]["res"].run_id)
    params = run.data.params
    assert params["train.steps"] == str(STEPS) and params["sharing.0.kind"] == "soft"
    assert not [k for k in params if k.startswith("tracking.")]
    assert not [k for k in params if k.startswith("preprocess.albumentations.")]  # disabled in the tiny config
    keys = set(run.data.metrics)
    assert {"optimizer/grad_norm", "optimizer/lr", "optimizer/skipped_steps", "penalty/soft/enc0", "gradnorm/G/ct"} <= keys
    assert not keys & {"grad_norm", "lr", "skipped_steps", "train/skipped_steps"}
    assert not [k for k in keys if k.startswith("soft/")]  # the penalty per depth is logged once, as penalty/soft/<depth>
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/validation.png", "plots/dice_per_organ.png", "plots/gradnorm.png", "plots/optimizer.png"} <= arts


def test_plots_put_each_scale_on_its_own_axis():
    from medmtl.tracking.plots import dice_bar_figure, history_figures, overlay_figure, validation_figure

    history = [{"step": s, "gradnorm/G/ct": 0.01, "gradnorm/G/mr": 0.02, "gradnorm/r/ct": 1.0, "gradnorm/r/mr": 1.0,
                "gradnorm/L_grad": 0.001, "optimizer/lr": 3e-3 * (1 - s / 10), "optimizer/grad_norm": 5.0} for s in range(1, 6)]
    figs = history_figures(history)
    titles = sorted(ax.get_title() for ax in figs["gradnorm"].axes)
    assert titles == ["gradnorm/G", "gradnorm/L_grad", "gradnorm/r"]
    assert sorted(ax.get_title() for ax in figs["optimizer"].axes) == ["optimizer/grad_norm", "optimizer/lr"]
    val = [{"step": s, "val/dice/ct/liver": 0.1 * s, "val/dice/ct/mean": 0.1 * s, "val/loss/ct": 1.0 / s} for s in range(1, 7)]
    fig = validation_figure(val, best_step=6)
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 3]  # loss + best line; liver, mean + best line
    bars = dice_bar_figure({"validation": {"ct": {"liver": 0.5, "mean": 0.5}}, "test": {"ct": {"liver": 0.4, "mean": 0.4}}})
    assert [t.get_text() for t in bars.axes[0].texts] == ["0.50", "0.50", "0.40", "0.40"]
    image = np.linspace(-1000, 1000, 20 * 20 * 5).reshape(20, 20, 5)
    ref = np.zeros((20, 20, 5), int)
    ref[5:10, 5:10, 3] = 1
    fig = overlay_figure(image, ref, ref, ["liver"], title="CT case-x\nDice liver 1.00", window=(-160.0, 240.0))
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == (-160.0, 240.0) and "Dice liver 1.00" in ax.get_title() and "slice 4/5" in ax.get_title()
    assert ax.get_legend().get_texts()[0].get_fontsize() >= 10


# ------------------------------------------------------------------------------------------ 7. the ingest report
def test_ingest_report_is_a_table_in_the_run_without_phi(server, runs, tmp_path):
    (by, synth, data_dir), client = runs, _client(server)
    run = client.get_run(by["test"]["res"].run_id)
    assert {"path": "ingest/report.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="ingest/report.json",
                                               tracking_uri=server.uri, dst_path=str(tmp_path))
    table = json.loads(open(path).read())
    assert table["columns"] == ["outcome", "modality", "reason", "count"]
    report = json.loads((data_dir / "ingest_report.json").read_text())
    by_outcome = {}
    for outcome, _m, _r, n in table["data"]:
        by_outcome[outcome] = by_outcome.get(outcome, 0) + n
    assert by_outcome.get("series accepted", 0) == report["n_accepted"]
    assert by_outcome.get("file skipped", 0) == report["n_skipped_files"]
    rejected = [row for row in table["data"] if row[0] == "series rejected"]
    assert sum(r[3] for r in rejected) >= report["n_rejected"]  # a series rejected for two reasons counts under both
    assert "**Ingest:** " in run.data.tags["mlflow.note.content"]
    assert_no_phi(set(synth.phi_strings()) | set(synth.uid_strings()), tmp_path)
