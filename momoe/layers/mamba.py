"""The Mamba (S6) mixer, with optional modality-specific parameters (Mixture-of-Mamba).

Mixture-of-Mamba (Liang et al., 2025) gives each modality its own in_proj, x_proj, dt_proj (weight and
bias) and out_proj; the causal conv1d and the SSM parameters A and D stay shared. Which projections
are split is a set (the paper's ablation decouples them one by one); `split_ssm` additionally gives
each modality its own A, D and dt bias, through the selective scan's `modality` argument. With no
split (or one modality) this is mamba-ssm's `Mamba` block (v1).

Shape legend: B batch, L time, D d_model, E d_inner (= expand * D), N d_state, R dt_rank, M modalities.
"""
import dataclasses
import math
from typing import FrozenSet, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from momoe.layers.modality_linear import ModalityLinear, ModalityRouting
from momoe.ops import selective_scan, selective_state_update

try:  # optional extra (CUDA only): Tri Dao's fused causal conv1d
    from causal_conv1d import causal_conv1d_fn
except (ImportError, OSError):  # not installed, or installed without its CUDA extension
    causal_conv1d_fn = None

SPLITTABLE_PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


@dataclasses.dataclass
class MambaState:
    """Decoding state of one mixer: conv_state (B, E, d_conv - 1), the last inputs of the conv;
    ssm_state (B, E, N) in fp32."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prev: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Channel-last causal depthwise conv: y[b, t] = bias + sum_k weight[:, 0, k] * x[b, t - K + 1 + k].

    x: (B, L, E); weight: (E, 1, K) (nn.Conv1d's); prev: (B, K - 1, E), the inputs before x (zeros
    when None). Returns (B, L, E) contiguous. On CUDA the `causal-conv1d` package is used when it is
    installed.
    """
    if x.is_cuda and causal_conv1d_fn is not None:
        # The package takes channel-last (B, E, L) views, as x.transpose(1, 2) is.
        initial = None if prev is None else prev.transpose(1, 2)
        return causal_conv1d_fn(x.transpose(1, 2), weight[:, 0, :], bias, initial_states=initial).transpose(1, 2)
    K, L = weight.shape[-1], x.shape[1]
    xp = torch.cat([prev, x], dim=1) if prev is not None else F.pad(x, (0, 0, K - 1, 0))
    w = weight[:, 0, :].to(x.dtype)
    y = xp[:, 0:L] * w[:, 0]
    if bias is not None:
        y = y + bias.to(x.dtype)
    for k in range(1, K):
        y = torch.addcmul(y, xp[:, k : k + L], w[:, k])
    return y


def conv_tail(x: torch.Tensor, prev: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """The last k conv inputs after x: (B, L, E) (zeros before the start) -> (B, k, E)."""
    xp = torch.cat([prev, x], dim=1) if prev is not None else F.pad(x, (0, 0, k, 0))
    return xp[:, xp.shape[1] - k :].detach()


class MambaMixer(nn.Module):
    """in_proj -> causal depthwise conv1d -> SiLU -> x_proj -> dt_proj -> selective scan (D skip,
    SiLU(z) gate) -> out_proj, each projection per modality when it is in `split`."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        num_modalities: int = 1,
        split: Iterable[str] = (),
        split_ssm: bool = False,
        conv_bias: bool = True,
        bias: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        split = frozenset(split)
        unknown = split - set(SPLITTABLE_PROJECTIONS)
        if unknown:
            raise ValueError(f"momoe: unknown projections to split {sorted(unknown)}; choose from {SPLITTABLE_PROJECTIONS}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.num_modalities = num_modalities
        self.split: FrozenSet[str] = split if num_modalities > 1 else frozenset()
        self.split_ssm = split_ssm and num_modalities > 1

        def linear(name: str, fan_in: int, fan_out: int, with_bias: bool) -> ModalityLinear:
            return ModalityLinear(fan_in, fan_out, num_modalities if name in self.split else 1, bias=with_bias)

        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = linear("in_proj", d_model, 2 * E, bias)
        self.conv1d = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = linear("x_proj", E, R + 2 * N, False)
        self.dt_proj = linear("dt_proj", R, E, False)
        # dt's bias is applied inside the scan (in fp32, as mamba-ssm does): one row per modality
        # when dt_proj or the SSM parameters are split.
        bias_rows = num_modalities if ("dt_proj" in self.split or self.split_ssm) else 1
        ssm_rows = num_modalities if self.split_ssm else 1
        self.dt_bias = nn.Parameter(torch.empty(bias_rows, E))
        self.A_log = nn.Parameter(torch.empty(ssm_rows, E, N))
        self.D = nn.Parameter(torch.empty(ssm_rows, E))
        self.out_proj = linear("out_proj", E, d_model, bias)
        self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

    def reset_ssm_parameters(self, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        """mamba-ssm's initialisation: dt_proj weights U(+-R^-0.5); dt bias = softplus^-1 of a dt drawn
        log-uniformly in [dt_min, dt_max]; A = -(1, 2, ..., N) (S4D-real); D = 1."""
        with torch.no_grad():
            std = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand_as(self.A_log)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)

    # ------------------------------------------------------------------ SSM parameters
    def _ssm_parameters(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """A (E, N) | (M, E, N), D, dt bias in fp32, and whether the scan needs `modality`."""
        A = -torch.exp(self.A_log.float())
        D, bias = self.D.float(), self.dt_bias.float()
        if A.shape[0] == 1 and bias.shape[0] == 1:
            return A[0], D[0], bias[0], False
        M = self.num_modalities
        return A.expand(M, -1, -1), D.expand(M, -1), bias.expand(M, -1), True

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden: torch.Tensor,
        modality_ids: torch.Tensor,
        routing: Optional[ModalityRouting] = None,
        state: Optional[MambaState] = None,
        return_state: bool = False,
    ) -> Tuple[torch.Tensor, Optional[MambaState]]:
        """hidden: (B, L, D); modality_ids: (B, L); routing: the tokens sorted by modality (needed when
        a projection is split); state: continue from it (chunked prefill). Returns (B, L, D) and,
        with return_state, the state after the last token.

        Activations stay time-major, (B, L, E), from in_proj to out_proj: the conv runs channel-last
        and the scan reads and writes that layout through its strides, so nothing is transposed."""
        x, z = self.in_proj(hidden, routing).chunk(2, dim=-1)  # (B, L, E) each
        prev = None if state is None else state.conv_state.transpose(1, 2).to(x.dtype)  # (B, d_conv - 1, E)
        u = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias, prev))
        x_dbl = self.x_proj(u, routing)  # (B, L, R + 2N)
        dt_low, B_, C_ = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt_low, routing)  # (B, L, E), bias applied in the scan
        A, D, dt_bias, by_modality = self._ssm_parameters()
        out = selective_scan(
            u.transpose(1, 2), dt.transpose(1, 2), A, B_.transpose(1, 2), C_.transpose(1, 2), D=D,
            z=z.transpose(1, 2), delta_bias=dt_bias, delta_softplus=True,
            modality=modality_ids if by_modality else None,
            initial_state=None if state is None else state.ssm_state, return_last_state=return_state,
        )
        y, last = out if return_state else (out, None)
        y = self.out_proj(y.transpose(1, 2), routing)
        if not return_state:
            return y, None
        return y, MambaState(conv_tail(x, prev, self.d_conv - 1).transpose(1, 2).contiguous(), last)

    # ------------------------------------------------------------------ decoding
    def empty_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> MambaState:
        return MambaState(
            conv_state=torch.zeros(batch, self.d_inner, self.d_conv - 1, dtype=dtype, device=device),
            ssm_state=torch.zeros(batch, self.d_inner, self.d_state, dtype=torch.float32, device=device),
        )

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, modality_ids: torch.Tensor, state: MambaState,
             routing: Optional[ModalityRouting] = None) -> torch.Tensor:
        """One token per sequence. hidden: (B, D); modality_ids: (B,); state updated in place."""
        x, z = self.in_proj(hidden, routing).chunk(2, dim=-1)  # (B, E)
        window = torch.cat([state.conv_state, x.unsqueeze(-1).to(state.conv_state.dtype)], dim=-1)  # (B, E, d_conv)
        x = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        state.conv_state.copy_(window[..., 1:])
        x = F.silu(x).to(hidden.dtype)
        dt_low, B_, C_ = torch.split(self.x_proj(x, routing), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt_low, routing)
        A, D, dt_bias, by_modality = self._ssm_parameters()
        y = selective_state_update(state.ssm_state, x, dt, A, B_, C_, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                   modality=modality_ids if by_modality else None)
        return self.out_proj(y, routing)
