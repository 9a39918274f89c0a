"""Model registry: register a run's model under alias ``challenger``; promote to ``champion`` behind gates.

A version carries its source run's held-out Dice (as tags and in its description) and lineage tags
(run id, code version, manifest, plan and evaluation-set hashes), so the registry alone tells where a
version came from. :func:`promote` moves alias ``champion`` only when :func:`check_gates` passes:

* every Dice floor of the config (``tracking.gate.min_dice`` per ``<modality>/<class>`` or class name,
  ``tracking.gate.min_dice_all`` for all classes) is met;
* the version is no worse than the current champion (``tracking.gate.no_worse_than_champion``), which is
  only comparable on the same evaluation set: both source runs must carry the same
  ``medmtl.eval_set_sha`` tag, else the promotion is refused.

Every decision is written to the version's tags (``medmtl.gate`` and ``medmtl.gate_reasons``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medmtl.errors import ModelError
from medmtl.modality import MODALITIES
from medmtl.tracking.store import get_run, using_tracking_uri

__all__ = ["RegisteredVersion", "GateDecision", "register_run_model", "check_gates", "promote", "CHALLENGER", "CHAMPION",
           "EVAL_SET_TAG", "eval_set_fingerprint"]

CHALLENGER = "challenger"
CHAMPION = "champion"
EVAL_SET_TAG = "medmtl.eval_set_sha"
_DICE_PREFIX = "test/dice/"


@dataclass
class RegisteredVersion:
    """A registered model version."""

    name: str
    version: str
    model_uri: str


@dataclass
class GateDecision:
    """Outcome of the promotion gates: ``passed``, the reasons for a refusal, and every check made."""

    name: str
    version: str
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    previous_champion: str | None = None

    def summary(self) -> str:
        """Human-readable verdict, one line per reason or check."""
        head = (f"{self.name} version {self.version} promoted to {CHAMPION}" if self.passed
                else f"{self.name} version {self.version} NOT promoted")
        lines = self.reasons if not self.passed else self.checks
        return "\n".join([head] + [f"  - {line}" for line in lines])


def register_run_model(*, tracking_uri: str, run_id: str, name: str, model_uri: str | None = None) -> RegisteredVersion:
    """Register the model logged in ``run_id`` as a new version of ``name`` and point ``challenger`` at it.

    The version carries the run's held-out Dice metrics and lineage tags (run id, config and data
    hashes) and a description, so the registry alone tells where a version came from.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    run = get_run(client, run_id)
    if model_uri is None:
        models = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if not models:
            raise ModelError(f"run {run_id} has no logged model; train with tracking.log_model=true")
        model_uri = f"models:/{models[0].model_id}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="medmtl joint CT+MR segmentation (two-column network)")
    dice = _dice(run)
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith("medmtl.")}
    desc_lines = [f"Trained in run {run_id} ({run.info.run_name})."]
    if EVAL_SET_TAG in lineage:
        desc_lines.append(f"Held-out Dice on evaluation set {lineage[EVAL_SET_TAG]}:")
    desc_lines += [f"{k}: {v:.3f}" for k, v in sorted(dice.items())]
    with using_tracking_uri(tracking_uri):  # MLflow resolves a models:/<id> source through the global URI
        mv = client.create_model_version(
            name, model_uri, run_id=run_id, tags={"source_run_id": run_id, **lineage, **{k: f"{v:.4f}" for k, v in dice.items()}},
            description="\n".join(desc_lines),
        )
    _record_files_manifest(client, name, str(mv.version), model_uri, tracking_uri)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return RegisteredVersion(name=name, version=str(mv.version), model_uri=f"models:/{name}/{mv.version}")


def _record_files_manifest(client: MlflowClient, name: str, version: str, model_uri: str, tracking_uri: str) -> None:
    """Tag the new version with its files' SHA-256 manifest digest, verified against the logged model's record
    (``medmtl.tracking.model_loading.record_version_manifest``); predict, evaluate and serving check it before loading."""
    from medmtl.tracking.model_loading import record_version_manifest

    record_version_manifest(client, name, version, model_uri, tracking_uri)


def _dice(run) -> dict[str, float]:
    return {k: float(v) for k, v in run.data.metrics.items() if k.startswith(_DICE_PREFIX)}


def _version_evidence(client: MlflowClient, name: str, version: str) -> tuple[dict[str, float], str | None]:
    """Held-out Dice and evaluation-set hash of a version: from its source run, else from its own tags."""
    mv = client.get_model_version(name, version)
    dice, eval_sha = {}, mv.tags.get(EVAL_SET_TAG)
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            dice, eval_sha = _dice(run), run.data.tags.get(EVAL_SET_TAG, eval_sha)
        except MlflowException:
            pass  # source run deleted: the version's tags still hold its scores
    if not dice:
        dice = {k: float(v) for k, v in mv.tags.items() if k.startswith(_DICE_PREFIX)}
    return dice, eval_sha


def _floors(gate, dice: dict[str, float]) -> dict[str, float]:
    """``{metric key: floor}`` from the gate config, for the classes this version was scored on."""
    floors: dict[str, float] = {}
    if gate.min_dice_all is not None:
        for k in dice:
            if not k.endswith("/mean"):
                floors[k] = gate.min_dice_all
    for key, floor in gate.min_dice.items():
        if "/" in key:
            floors[_DICE_PREFIX + key] = max(floor, floors.get(_DICE_PREFIX + key, 0.0))
        else:
            for m in MODALITIES:
                k = f"{_DICE_PREFIX}{m}/{key}"
                floors[k] = max(floor, floors.get(k, 0.0))
    return floors


def check_gates(*, tracking_uri: str, name: str, version: str, gate) -> GateDecision:
    """Evaluate the promotion gates (a ``RegistryGateConfig``) for ``name`` ``version``; changes nothing."""
    client = MlflowClient(tracking_uri=tracking_uri)
    version = str(version)
    try:
        dice, eval_sha = _version_evidence(client, name, version)
    except MlflowException as err:
        raise ModelError(f"registered model {name!r} has no version {version}; list versions in the MLflow UI "
                          f"or with `mlflow models` ({err.message})") from None
    d = GateDecision(name=name, version=version, passed=False)
    if not dice:
        d.reasons.append(f"version {version} has no held-out Dice ({_DICE_PREFIX}*) in its run or tags; evaluate it first")
        return d
    for key, floor in sorted(_floors(gate, dice).items()):
        short = key[len(_DICE_PREFIX):]
        if key not in dice:
            d.reasons.append(f"Dice {short} required >= {floor:.3f}, but the version was not scored on it")
        elif not dice[key] >= floor:  # NaN fails too
            d.reasons.append(f"Dice {short} = {dice[key]:.3f} is below the floor {floor:.3f}")
        else:
            d.checks.append(f"Dice {short} = {dice[key]:.3f} >= {floor:.3f}")
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
            c_dice, c_sha = _version_evidence(client, name, str(champ.version))
            if eval_sha is None or c_sha is None or eval_sha != c_sha:
                d.reasons.append(
                    f"champion (version {champ.version}) was scored on evaluation set {c_sha or 'unknown'}, this version on "
                    f"{eval_sha or 'unknown'}: Dice on different sets cannot be compared; evaluate both on one set")
            else:
                keys = ([k for k in c_dice if k.endswith("/mean")] if gate.compare_on == "mean"
                        else [k for k in c_dice if not k.endswith("/mean")])
                for key in sorted(keys):
                    short = key[len(_DICE_PREFIX):]
                    mine = dice.get(key, float("nan"))
                    if not mine >= c_dice[key] - gate.tolerance:
                        d.reasons.append(f"Dice {short} = {mine:.3f} is worse than the champion's (version {champ.version}) "
                                         f"{c_dice[key]:.3f}" + (f" by more than {gate.tolerance:.3f}" if gate.tolerance else ""))
                    else:
                        d.checks.append(f"Dice {short} = {mine:.3f}, champion {c_dice[key]:.3f}")
    d.passed = not d.reasons
    return d


def promote(*, tracking_uri: str, name: str, version: str, gate) -> GateDecision:
    """Move alias ``champion`` to ``version`` when :func:`check_gates` passes; record the decision either way."""
    d = check_gates(tracking_uri=tracking_uri, name=name, version=version, gate=gate)
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_model_version_tag(name, d.version, "medmtl.gate", "passed" if d.passed else "refused")
    client.set_model_version_tag(name, d.version, "medmtl.gate_reasons", "; ".join(d.reasons)[:5000] or "all gates passed")
    if d.passed:
        client.set_registered_model_alias(name, CHAMPION, d.version)
        if d.previous_champion:
            client.set_model_version_tag(name, d.version, "medmtl.previous_champion", d.previous_champion)
    return d


def eval_set_fingerprint(entries: dict[str, list]) -> str:
    """Hash of the held-out set (image and label content hashes per modality): runs scored on the same
    cases, with the same masks, get the same fingerprint, whatever their order or file locations."""
    import hashlib

    items = sorted(f"{m}:{e.content_hash}:{e.label_hash}" for m, es in entries.items() for e in es)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
