"""Equal weighting: ``sum_i L_i``; the reference every other method is compared with."""

from __future__ import annotations

from medmtl.config import EqualWeightingConfig
from medmtl.weighting.base import LossWeighting

__all__ = ["EqualWeighting"]


class EqualWeighting(LossWeighting):
    """All weights 1, never updated."""

    def __init__(self, *, cfg: EqualWeightingConfig, tasks: tuple[str, ...]) -> None:
        super().__init__(cfg=cfg, tasks=tasks)
