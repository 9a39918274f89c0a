"""Precision policy ``fp32 | bf16 | fp16``.

Autocast on CUDA (fp16 with a ``GradScaler``), bf16 autocast on CPU; fp16 on CPU is refused because
CPU kernels gain nothing from it and a scaler is CUDA-only here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from medmtl.errors import ConfigError

__all__ = ["Precision", "PrecisionMode", "resolve_device"]

PrecisionMode = Literal["fp32", "bf16", "fp16"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error naming ``train.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; set train.device=cpu or auto")
    return torch.device(name)


@dataclass
class Precision:
    """Autocast context and (for fp16) the gradient scaler of one run."""

    mode: PrecisionMode
    device: torch.device

    def __post_init__(self) -> None:
        if self.mode == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 (or fp32) on CPU")
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.mode == "fp16")

    def autocast(self):
        """Context manager for the forward pass and loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        """Current loss scale (1.0 unless fp16)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
