"""Adaptation of a trained model to a modality with LoRA adapters only (``medmtl adapt``).

The source model's ``source`` modality column and head become the shared base of a ``kind: lora`` net
(``freeze_base: true``, deltas on the ``target`` modality only), so the adapted model starts as the source
modality's model applied to the target modality, and training moves only the target's low-rank deltas.
The source modality's predictions stay exactly those of the source model (its path has no delta), and the
deployed model has the deltas merged into the target's kernels.

A source whose prediction of one modality needs the other column (cross-stitch, sluice: mixing units) has
no column that is a model on its own, so it cannot be a base; neither can a mixture of LoRA experts (its
kernels depend on the input).
"""

from __future__ import annotations

from medmtl.config import ConfigError, ExperimentConfig, LoRAConfig, apply_overrides, config_to_dict, validate_config
from medmtl.errors import ModelError
from medmtl.models.merge import base_state_for_adaptation, parameter_counts
from medmtl.modality import MODALITIES
from medmtl.models.two_column import TwoColumnNet

__all__ = ["adaptation_config", "load_base", "trainable_share"]


def adaptation_config(source_cfg: ExperimentConfig, *, target: str, source: str, data_root: str | None = None,
                      lora: dict | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The source's config with ``sharing`` replaced by target-only, frozen-base LoRA and equal weighting.

    ``lora`` sets fields of the :class:`~medmtl.config.LoRAConfig` (rank, alpha, depths, dropout);
    ``overrides`` are ``key.sub=value`` on the result (e.g. ``train.steps=100``).
    """
    if target == source:
        raise ConfigError(f"adapt: the target modality ({target}) must differ from the source modality whose column is the base")
    for i, mech in enumerate(source_cfg.sharing):
        # merged deltas are gone from a loaded source; adapters still there are routed per input
        if mech.mixes_activations or mech.mixes_head_input or mech.has_adapters:
            raise ModelError(f"adapt: the source model's sharing.{i} ({mech.kind}) makes each column depend on the other "
                             "or on the input; adapt a model trained without mixing units or routed experts")
    if source_cfg.data.labels[target] != source_cfg.data.labels[source]:
        raise ConfigError(f"adapt: data.labels.{target} differs from data.labels.{source}; the frozen {source} head predicts "
                          f"{source}'s classes, so both label maps must be the same")
    raw = config_to_dict(source_cfg)
    raw["name"] = f"{source_cfg.name}-adapt-{target}"
    raw["sharing"] = [LoRAConfig(**{**(lora or {}), "modalities": [target], "freeze_base": True}).model_dump(mode="python")]
    raw["weighting"] = {"method": "equal"}
    if data_root is not None:
        raw["data"]["root"] = data_root
    return validate_config(apply_overrides(raw, overrides or []), "adapt config")


def load_base(net: TwoColumnNet, source_state: dict, source: str) -> None:
    """Copy the source model's ``source`` column and head into every column and head of ``net`` (deltas untouched)."""
    base = base_state_for_adaptation(net, source_state, source)
    missing = [k for k in net.state_dict() if k not in base and ".deltas." not in k and not k.startswith("sharing.")]
    if missing:
        raise ModelError(f"adapt: the source model lacks {missing[0]!r}; it was built with another model section")
    net.load_state_dict(base, strict=False)


def trainable_share(net: TwoColumnNet) -> dict[str, float]:
    """Trainable and total parameters (tied ones once) and the trainable fraction of the net and of two separate columns."""
    counts = parameter_counts(net)
    column = sum(p.numel() for p in net.columns[MODALITIES[0]].parameters() if not _is_adapter(net, p))
    return {"params/total": float(counts["total"]), "params/trainable": float(counts["trainable"]),
            "params/trainable_fraction": counts["trainable"] / counts["total"],
            "params/trainable_fraction_of_two_columns": counts["trainable"] / (2 * column)}


def _is_adapter(net: TwoColumnNet, p) -> bool:
    return any(p is q for mech in net.sharing for q in mech.adapter_parameters())
