"""Low-rank kernel deltas for 3D convolutions (LoRA, Hu et al. 2022), shared by the LoRA-family mechanisms.

A :class:`LowRankDelta` is ``Delta W = (alpha / r) * (B @ A).reshape(W.shape)`` with ``B`` ``(W.shape[0], r)``
initialised to zero (training starts exactly from the base kernel) and ``A`` ``(r, prod(W.shape[1:]))``
Kaiming-uniform, as in LoRA and HF ``peft``. For ``nn.Conv3d`` the weight is ``(C_out, C_in/g, k, k, k)``,
so the delta has rank ``r`` between output channels and input patches, exactly peft's ``Conv3d`` LoRA
(``lora_B`` 1x1x1 after ``lora_A`` k x k x k). For ``nn.ConvTranspose3d`` (the decoders' upsampling) the
weight is ``(C_in, C_out/g, k, k, k)`` and the same reshaping gives a rank-``r`` delta between input
channels and output patches; peft does not adapt transposed convolutions at all.

:class:`LoRAConv` wraps a base convolution and adds one or more deltas (``lora``: one per modality;
``mtlora``: a shared one plus one per modality; ``mixture_of_lora``: K experts mixed per sample by a
router's gates). Without dropout it convolves once with the merged kernel ``W + sum Delta W`` (no extra
convolution: the step costs what the base column costs, plus a few small matrix products); with dropout
in training it adds ``conv(dropout(x), sum Delta W)`` as peft does (one more convolution). Per-sample
kernels (mixture) run as one grouped convolution with the batch folded into the groups.
:meth:`LoRAConv.merged` returns a plain convolution with the deltas folded in, for deployment.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankDelta", "LoRAConv", "CONV_TYPES", "adapter_parameters"]

CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


class LowRankDelta(nn.Module):
    """One low-rank kernel delta ``(alpha / r) B A`` for a convolution weight of shape ``weight_shape``.

    Args:
        weight_shape: the base weight's shape, ``(C_out, C_in/g, k, k, k)`` (or transposed ``(C_in, C_out/g, ...)``).
        rank: ``r``, at most ``min(weight_shape[0], prod(weight_shape[1:]))``.
        alpha: scale numerator; the delta is multiplied by ``alpha / r``.
    """

    def __init__(self, *, weight_shape: tuple[int, ...], rank: int, alpha: float) -> None:
        super().__init__()
        rows, cols = weight_shape[0], math.prod(weight_shape[1:])
        if rank > min(rows, cols):
            raise ValueError(f"LoRA rank {rank} exceeds the rank of a {rows}x{cols} kernel matrix; use rank <= {min(rows, cols)}")
        self.weight_shape = tuple(weight_shape)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, cols))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank))  # zero: Delta W = 0 at the start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) default

    def delta(self) -> torch.Tensor:
        """``(alpha / r) * B @ A`` reshaped to the base weight's shape."""
        return (self.scaling * (self.lora_B @ self.lora_A)).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        """Rank, alpha and the adapted kernel shape."""
        return f"rank={self.rank}, alpha={self.alpha}, weight_shape={self.weight_shape}"


class LoRAConv(nn.Module):
    """A ``Conv3d`` or ``ConvTranspose3d`` with low-rank deltas: ``y = conv(x, W + sum_i g_i Delta W_i) + b``.

    Args:
        base: the convolution whose weight and bias are used (and possibly shared with another wrapper).
        deltas: the deltas added to its kernel (each :class:`LowRankDelta` may be shared between wrappers).
        dropout: dropout probability on the deltas' input (peft's ``lora_dropout``); 0 = merged-kernel path.
        gates: ``None`` (every delta with weight 1), or a callable returning the current per-sample gates
            ``(B, len(deltas))`` (a mixture of experts; set by the router before the stage runs).

    Input and output ``(B, C, D, H, W)`` as the base convolution's.
    """

    def __init__(self, *, base: nn.Module, deltas: list[LowRankDelta], dropout: float = 0.0,
                 gates: Callable[[], torch.Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(base, CONV_TYPES):
            raise TypeError(f"LoRAConv adapts Conv3d or ConvTranspose3d, got {type(base).__name__}")
        self.base = base
        self.deltas = nn.ModuleList(deltas)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._gates = gates

    @property
    def routed(self) -> bool:
        """True when per-sample gates mix the deltas (a mixture of experts: not mergeable)."""
        return self._gates is not None

    @property
    def transposed(self) -> bool:
        """True for a transposed convolution."""
        return isinstance(self.base, nn.ConvTranspose3d)

    def delta_weight(self) -> torch.Tensor:
        """``sum_i Delta W_i`` (ungated), shaped like the base weight."""
        return torch.stack([d.delta() for d in self.deltas]).sum(0)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        b = self.base
        if self.transposed:
            return F.conv_transpose3d(x, weight, bias, b.stride, b.padding, b.output_padding, groups, b.dilation)
        if b.padding_mode != "zeros":
            raise NotImplementedError(f"LoRAConv supports zero padding only, not {b.padding_mode!r}")
        return F.conv3d(x, weight, bias, b.stride, b.padding, b.dilation, groups)

    def _per_sample(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One grouped convolution with kernel ``weights[b]`` for sample ``b``; ``weights`` ``(B, *W.shape)``."""
        n, g = x.shape[0], self.base.groups
        folded = x.reshape(1, n * x.shape[1], *x.shape[2:])
        w = weights.reshape(n * weights.shape[1], *weights.shape[2:])
        y = self._conv(folded, w, None if bias is None else bias.repeat(n), groups=n * g)
        return y.reshape(n, y.shape[1] // n, *y.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W) -> (B, C_out, D', H', W')``."""
        w, bias = self.base.weight, self.base.bias
        stack = torch.stack([d.delta() for d in self.deltas])  # (n_deltas, *W.shape)
        if self._gates is None:
            delta = stack.sum(0)
            if self.dropout is None or not self.training:
                return self._conv(x, w + delta, bias, self.base.groups)
            return self._conv(x, w, bias, self.base.groups) + self._conv(self.dropout(x), delta, None, self.base.groups)
        gates = self._gates()  # (B, n_deltas)
        if gates.shape != (x.shape[0], len(self.deltas)):
            raise RuntimeError(f"gates of shape {tuple(gates.shape)} for a batch of {x.shape[0]} and {len(self.deltas)} experts")
        delta = torch.einsum("be,e...->b...", gates.to(stack.dtype), stack)  # (B, *W.shape)
        if self.dropout is None or not self.training:
            return self._per_sample(x, w.unsqueeze(0) + delta, bias)
        return self._conv(x, w, bias, self.base.groups) + self._per_sample(self.dropout(x), delta, None)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain copy of the base convolution with ``W + sum_i Delta W_i`` as its kernel (ungated deltas only)."""
        if self._gates is not None:
            raise ValueError("a routed mixture of LoRA experts chooses its kernel per input and cannot be merged into one")
        import copy

        plain = copy.deepcopy(self.base)
        plain.weight.copy_(self.base.weight + self.delta_weight())
        return plain


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of every :class:`LowRankDelta` under ``module`` (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in module.modules():
        if isinstance(m, LowRankDelta):
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())
