"""Sharing mechanisms, one module each, behind :class:`~medmtl.sharing.base.SharingMechanism`.

``build_mechanism(cfg)`` looks the config's ``kind`` up in :data:`MECHANISMS`; adding a mechanism is
one new file plus one line here (and its config class in :mod:`medmtl.config`).
"""

from medmtl.sharing.base import SharingMechanism
from medmtl.sharing.cross_stitch import CrossStitch
from medmtl.sharing.hard import HardSharing
from medmtl.sharing.lora import ModalityLoRA
from medmtl.sharing.mixture_of_lora import MixtureOfLoRA
from medmtl.sharing.mtlora import MTLoRA
from medmtl.sharing.shared_kernels import SharedKernels
from medmtl.sharing.sluice import Sluice
from medmtl.sharing.soft import SoftSharing

MECHANISMS: dict[str, type[SharingMechanism]] = {
    "soft": SoftSharing,
    "cross_stitch": CrossStitch,
    "sluice": Sluice,
    "hard": HardSharing,
    "shared_kernels": SharedKernels,
    "lora": ModalityLoRA,
    "mtlora": MTLoRA,
    "mixture_of_lora": MixtureOfLoRA,
}


def build_mechanism(cfg) -> SharingMechanism:
    """Instantiate the mechanism named by ``cfg.kind`` with its own config section."""
    return MECHANISMS[cfg.kind](cfg=cfg)


__all__ = ["MECHANISMS", "SharingMechanism", "build_mechanism"]
