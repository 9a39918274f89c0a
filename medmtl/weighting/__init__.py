"""Loss-weighting methods, one module each, behind :class:`~medmtl.weighting.base.LossWeighting`.

``build_weighting(cfg, tasks)`` looks the config's ``method`` up in :data:`METHODS`.
"""

from medmtl.weighting.base import LossWeighting
from medmtl.weighting.cagrad import CAGrad
from medmtl.weighting.dst import DroppedScheduledTask
from medmtl.weighting.dwa import DynamicWeightAverage
from medmtl.weighting.equal import EqualWeighting
from medmtl.weighting.gradnorm import GradNorm
from medmtl.weighting.metabalance import MetaBalance
from medmtl.weighting.pcgrad import PCGrad
from medmtl.weighting.uncertainty import UncertaintyWeighting

METHODS: dict[str, type[LossWeighting]] = {
    "equal": EqualWeighting,
    "gradnorm": GradNorm,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "dst": DroppedScheduledTask,
    "metabalance": MetaBalance,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
}


def build_weighting(cfg, tasks: tuple[str, ...]) -> LossWeighting:
    """Instantiate the method named by ``cfg.method`` with its own config section."""
    return METHODS[cfg.method](cfg=cfg, tasks=tasks)


__all__ = ["METHODS", "LossWeighting", "build_weighting"]
