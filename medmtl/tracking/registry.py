"""Model registry: register a run's model under alias ``challenger``; promote to ``champion`` behind gates.

The version is made from the run's logged model itself (its MLflow 3 model id), so the logged model's
page lists the version and its alias and the run's logged-models table shows it registered. A version
carries its source run's final Dice (as tags and in its Markdown description) and lineage tags (run id,
code version, manifest, plan and evaluation-set hashes), so the registry alone tells where a version
came from. The scores are those of ``best.pt`` on the run's test split (``test/dice/*``); a run without a
test split has only validation Dice, which also chose ``best.pt``, and the version says so
("validation Dice (no test set)"). :func:`promote` moves alias ``champion`` only when
:func:`check_gates` passes:

* the version has test-set Dice, unless the caller explicitly accepts validation Dice
  (``allow_validation_scores``, ``medmtl promote --allow-validation-scores``);
* every Dice floor of the config (``tracking.gate.min_dice`` per ``<modality>/<class>`` or class name,
  ``tracking.gate.min_dice_all`` for all classes) is met;
* the version is no worse than the current champion (``tracking.gate.no_worse_than_champion``), which is
  only comparable on the same evaluation set: both source runs must carry the same
  ``medmtl.eval_set_sha`` tag, else the promotion is refused.

Every decision is written to the version's tags (``medmtl.gate`` and ``medmtl.gate_reasons``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medmtl.errors import ModelError
from medmtl.modality import MODALITIES
from medmtl.tracking.describe import dice_line
from medmtl.tracking.links import Links, logged_model_id, logged_model_url, model_version_url, run_url
from medmtl.tracking.store import get_run, using_tracking_uri

__all__ = ["RegisteredVersion", "GateDecision", "register_run_model", "check_gates", "promote", "CHALLENGER", "CHAMPION",
           "EVAL_SET_TAG", "SCORES_SET_TAG", "eval_set_fingerprint", "run_scores"]

CHALLENGER = "challenger"
CHAMPION = "champion"
EVAL_SET_TAG = "medmtl.eval_set_sha"
SCORES_SET_TAG = "medmtl.scores_set"
_PREFIX = {"test": "test/dice/", "validation": "val/dice/"}
VALIDATION_ONLY = "validation Dice (no test set)"


@dataclass
class RegisteredVersion:
    """A registered model version and the UI pages of it, its logged model and its run."""

    name: str
    version: str
    model_uri: str
    links: Links = field(default_factory=Links)


@dataclass
class GateDecision:
    """Outcome of the promotion gates: ``passed``, the reasons for a refusal, and every check made."""

    name: str
    version: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    previous_champion: str | None = None
    links: Links = field(default_factory=Links)

    def summary(self) -> str:
        """Human-readable verdict, one line per reason or check, then the version's pages."""
        head = (f"{self.name} version {self.version} promoted to {CHAMPION}" if self.passed
                else f"{self.name} version {self.version} NOT promoted")
        lines = self.reasons if not self.passed else self.checks
        return "\n".join([head] + [f"  - {line}" for line in lines] + ([self.links.text()] if self.links.text() else []))


def run_scores(client: MlflowClient, run) -> tuple[dict[str, float], str | None]:
    """``({"ct/liver": dice, ...}, set)`` of a run's final model: test Dice (``set="test"``), else the
    validation Dice of ``best.pt`` at the run's best step (``set="validation"``), else ``({}, None)``."""
    test = {k[len(_PREFIX["test"]):]: float(v) for k, v in run.data.metrics.items() if k.startswith(_PREFIX["test"])}
    if test:
        return test, "test"
    best = run.data.tags.get("medmtl.best_step")
    val = {}
    for key in (k for k in run.data.metrics if k.startswith(_PREFIX["validation"])):
        points = client.get_metric_history(run.info.run_id, key)
        at = [m.value for m in points if best is not None and m.step == int(best)] or [run.data.metrics[key]]
        val[key[len(_PREFIX["validation"]):]] = float(at[-1])
    return (val, "validation") if val else ({}, None)


def _description(run, dice: dict[str, float], scores_set: str | None, links: Links, eval_sha: str | None) -> str:
    best = run.data.tags.get("medmtl.best_step", "?")
    lines = [f"Trained in run [{run.info.run_name}]({links.run}) (config `{run.data.tags.get('medmtl.config', '?')}`, "
             f"sharing {run.data.tags.get('medmtl.sharing', '?')}, weighting {run.data.tags.get('medmtl.weighting', '?')}).", ""]
    if scores_set == "test":
        lines.append(f"**Test Dice** of best.pt (step {best}) on the test set, never used for training or selection"
                     + (f" (evaluation set `{eval_sha}`)" if eval_sha else "") + ":")
    elif scores_set == "validation":
        lines.append(f"**{VALIDATION_ONLY}** of best.pt (step {best}): the validation cases also chose this checkpoint, "
                     "so these scores are optimistic. Train with `data.test_fraction > 0` for a test score.")
    else:
        lines.append("No Dice scores in the source run.")
    # classes in the config's label order (data.labels.<m>.<value> params), the mean last
    order = {v: int(k.rsplit(".", 1)[1]) for k, v in run.data.params.items() if k.startswith("data.labels.") and k.rsplit(".", 1)[1].isdigit()}
    by_mod: dict[str, dict[str, float]] = {}
    for k, v in sorted(dice.items(), key=lambda kv: (kv[0].split("/")[0], kv[0].endswith("/mean"), order.get(kv[0].split("/", 1)[1], 99))):
        m, c = k.split("/", 1)
        by_mod.setdefault(m, {})[c] = v
    lines += [""] + [f"* **{m.upper()}**: " + dice_line(d) for m, d in by_mod.items()]
    return "\n".join(lines)


def register_run_model(*, tracking_uri: str, run_id: str, name: str, model_uri: str | None = None) -> RegisteredVersion:
    """Register the model logged in ``run_id`` as a new version of ``name`` and point ``challenger`` at it.

    The version is created from the logged model (``models:/<model_id>``, linked by its id), carries the
    run's final Dice (test, else validation, said so) and lineage tags and a Markdown description.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    run = get_run(client, run_id)
    model_id = logged_model_id(model_uri)
    if model_uri is None:
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if not models:
            raise ModelError(f"run {run_id} has no logged model; train with tracking.log_model=true")
        model_id = models[0].model_id
        model_uri = f"models:/{model_id}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="medmtl joint CT+MR segmentation (two-column network)")
    dice, scores_set = run_scores(client, run)
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith("medmtl.")}
    exp = run.info.experiment_id
    links = Links(run=run_url(tracking_uri, exp, run_id), model=logged_model_url(tracking_uri, exp, model_id) if model_id else None)
    prefix = _PREFIX.get(scores_set or "test")
    tags = {"source_run_id": run_id, **lineage, SCORES_SET_TAG: "test" if scores_set == "test" else VALIDATION_ONLY,
            **{prefix + k: f"{v:.3f}" for k, v in dice.items()}}
    with using_tracking_uri(tracking_uri):  # MLflow resolves a models:/<id> source through the global URI
        description = _description(run, dice, scores_set, links, lineage.get(EVAL_SET_TAG))
        mv = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id, description=description)
    _record_files_manifest(client, name, str(mv.version), model_uri, tracking_uri)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if model_id:
        # what `mlflow.register_model` (and the REST server) records: the logged model lists its versions
        listed = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        entry = {"name": name, "version": str(mv.version)}
        tags = {"mlflow.note.content": description}  # the logged model's page shows the same description
        if entry not in listed:
            tags["mlflow.modelVersions"] = json.dumps(listed + [entry])
        client.set_logged_model_tags(model_id, tags)
    links.model_version = model_version_url(tracking_uri, name, str(mv.version))
    return RegisteredVersion(name=name, version=str(mv.version), model_uri=f"models:/{name}/{mv.version}", links=links)


def _record_files_manifest(client: MlflowClient, name: str, version: str, model_uri: str, tracking_uri: str) -> None:
    """Tag the new version with its files' SHA-256 manifest digest, verified against the logged model's record
    (``medmtl.tracking.model_loading.record_version_manifest``); predict, evaluate and serving check it before loading."""
    from medmtl.tracking.model_loading import record_version_manifest

    record_version_manifest(client, name, version, model_uri, tracking_uri)


def _version_evidence(client: MlflowClient, name: str, version: str) -> tuple[dict[str, float], str | None, str | None, object]:
    """Dice (``modality/class`` keys), the set it comes from (``test``, ``validation`` or ``None``) and the
    evaluation-set hash of a version: from its source run, else from its own tags; plus the version."""
    mv = client.get_model_version(name, version)
    dice, scores_set, eval_sha = {}, None, mv.tags.get(EVAL_SET_TAG)
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            (dice, scores_set), eval_sha = run_scores(client, run), run.data.tags.get(EVAL_SET_TAG, eval_sha)
        except MlflowException:
            pass  # source run deleted: the version's tags still hold its scores
    if not dice:
        for set_name, prefix in _PREFIX.items():
            dice = {k[len(prefix):]: float(v) for k, v in mv.tags.items() if k.startswith(prefix)}
            if dice:
                scores_set = set_name
                break
    return dice, scores_set, eval_sha, mv


def _floors(gate, dice: dict[str, float]) -> dict[str, float]:
    """``{modality/class: floor}`` from the gate config, for the classes this version was scored on."""
    floors: dict[str, float] = {}
    if gate.min_dice_all is not None:
        for k in dice:
            if not k.endswith("/mean"):
                floors[k] = gate.min_dice_all
    for key, floor in gate.min_dice.items():
        for k in ([key] if "/" in key else [f"{m}/{key}" for m in MODALITIES]):
            floors[k] = max(floor, floors.get(k, 0.0))
    return floors


def check_gates(*, tracking_uri: str, name: str, version: str, gate, allow_validation_scores: bool = False) -> GateDecision:
    """Evaluate the promotion gates (a ``RegistryGateConfig``) for ``name`` ``version``; changes nothing.

    A version scored only on validation cases (no test split) is refused unless ``allow_validation_scores``.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    version = str(version)
    try:
        dice, scores_set, eval_sha, mv = _version_evidence(client, name, version)
    except MlflowException as err:
        raise ModelError(f"registered model {name!r} has no version {version}; list versions in the MLflow UI "
                          f"or with `mlflow models` ({err.message})") from None
    d = GateDecision(name=name, version=version, passed=False, links=Links(model_version=model_version_url(tracking_uri, name, version)))
    if not dice:
        d.reasons.append(f"version {version} has no Dice (test/dice/* or val/dice/*) in its run or tags; evaluate it first")
        return d
    if scores_set != "test":
        if not allow_validation_scores:
            d.reasons.append(f"version {version} has no test-set Dice: its run had no test split (data.test_fraction: 0), and its "
                             "validation Dice also chose best.pt, so it overstates the model. Retrain with data.test_fraction > 0, "
                             "or pass --allow-validation-scores to promote on validation Dice")
            return d
        d.checks.append("scored on validation cases only (no test set): accepted by --allow-validation-scores")
    for key, floor in sorted(_floors(gate, dice).items()):
        if key not in dice:
            d.reasons.append(f"Dice {key} required >= {floor:.3f}, but the version was not scored on it")
        elif not dice[key] >= floor:  # NaN fails too
            d.reasons.append(f"Dice {key} = {dice[key]:.3f} is below the floor {floor:.3f}")
        else:
            d.checks.append(f"Dice {key} = {dice[key]:.3f} >= {floor:.3f}")
    if gate.no_worse_than_champion:
        try:
            champ = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champ = None
        if champ is None:
            d.checks.append("no current champion: nothing to compare with")
        elif str(champ.version) == version:
            d.checks.append(f"version {version} is already the champion")
        else:
            d.previous_champion = str(champ.version)
            c_dice, c_set, c_sha, _ = _version_evidence(client, name, str(champ.version))
            if eval_sha is None or c_sha is None or eval_sha != c_sha or c_set != scores_set:
                d.reasons.append(
                    f"champion (version {champ.version}) was scored on {c_set or 'unknown'} set {c_sha or 'unknown'}, this version on "
                    f"{scores_set} set {eval_sha or 'unknown'}: Dice on different sets cannot be compared; evaluate both on one set")
            else:
                keys = ([k for k in c_dice if k.endswith("/mean")] if gate.compare_on == "mean"
                        else [k for k in c_dice if not k.endswith("/mean")])
                for key in sorted(keys):
                    mine = dice.get(key, float("nan"))
                    if not mine >= c_dice[key] - gate.tolerance:
                        d.reasons.append(f"Dice {key} = {mine:.3f} is worse than the champion's (version {champ.version}) "
                                         f"{c_dice[key]:.3f}" + (f" by more than {gate.tolerance:.3f}" if gate.tolerance else ""))
                    else:
                        d.checks.append(f"Dice {key} = {mine:.3f}, champion {c_dice[key]:.3f}")
    d.passed = not d.reasons
    return d


def promote(*, tracking_uri: str, name: str, version: str, gate, allow_validation_scores: bool = False) -> GateDecision:
    """Move alias ``champion`` to ``version`` when :func:`check_gates` passes; record the decision either way."""
    d = check_gates(tracking_uri=tracking_uri, name=name, version=version, gate=gate, allow_validation_scores=allow_validation_scores)
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_model_version_tag(name, d.version, "medmtl.gate", "passed" if d.passed else "refused")
    client.set_model_version_tag(name, d.version, "medmtl.gate_reasons", "; ".join(d.reasons)[:5000] or "all gates passed")
    if d.passed:
        client.set_registered_model_alias(name, CHAMPION, d.version)
        if d.previous_champion:
            client.set_model_version_tag(name, d.version, "medmtl.previous_champion", d.previous_champion)
    mv = client.get_model_version(name, d.version)
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            d.links.run = run_url(tracking_uri, run.info.experiment_id, mv.run_id)
        except MlflowException:
            pass
    return d


def eval_set_fingerprint(entries: dict[str, list]) -> str:
    """Hash of the held-out set (image and label content hashes per modality): runs scored on the same
    cases, with the same masks, get the same fingerprint, whatever their order or file locations."""
    import hashlib

    items = sorted(f"{m}:{e.content_hash}:{e.label_hash}" for m, es in entries.items() for e in es)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
