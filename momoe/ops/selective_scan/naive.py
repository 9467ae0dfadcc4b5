"""Pure-PyTorch reference of the (modality-split) selective scan and its decoding step.

Shape legend (torchtitan-style suffixes): B batch, D channels (dim), L time, N state size,
G groups of B/C, M modalities.

Semantics (mamba-ssm layout, see momoe/ops/selective_scan/__init__.py): for every batch b,
channel d and time t, with m the modality of token (b, t) and g the group of channel d,
    dt      = softplus?(delta[b, d, t] + delta_bias[m, d])
    h[n]    = exp(dt * A[m, d, n]) * h[n] + dt * B[b, g, n, t] * u[b, d, t]
    y       = sum_n h[n] * C[b, g, n, t] + D[m, d] * u[b, d, t]
    out     = y * silu(z[b, d, t])
All math is done in fp32; the loop over time is plain (vectorised over batch, channels and the
state within a step), and every operation is differentiable by autograd.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_float(op: str, name: str, x: torch.Tensor, allowed: Tuple[torch.dtype, ...]) -> None:
    if x.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{op}: {name} must have dtype in ({names}), got {x.dtype}")


def _check_shape(op: str, name: str, x: torch.Tensor, shape: Tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _check_modality_values(op: str, modality: torch.Tensor, num_modalities: int) -> None:
    if modality.numel() == 0:
        return
    lo, hi = int(modality.min()), int(modality.max())
    if lo < 0 or hi >= num_modalities:
        raise ValueError(
            f"{op}: modality values must be in [0, {num_modalities}) (M = A.shape[0]), "
            f"got values in [{lo}, {hi}]"
        )


def _check_params(
    op: str,
    A: torch.Tensor,
    D: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    bias_name: str,
    modality: Optional[torch.Tensor],
    modality_shape: Tuple[int, ...],
    dim: int,
    dtype: torch.dtype,
) -> Tuple[int, int]:
    """Check A, D, delta_bias/dt_bias and modality; return (M or 0, N)."""
    allowed = (torch.float32, dtype)
    _check_float(op, "A", A, allowed)
    if modality is None:
        if A.dim() != 2:
            raise ValueError(
                f"{op}: A must have shape (dim, N) without modality, got rank {A.dim()} "
                f"(a per-modality A (M, dim, N) needs the modality argument)"
            )
        num_modalities, N = 0, A.shape[1]
        _check_shape(op, "A", A, (dim, N))
        param_shape: Tuple[int, ...] = (dim,)
    else:
        if modality.dtype not in INT_DTYPES or modality.is_floating_point():
            raise ValueError(f"{op}: modality must be an integer tensor, got {modality.dtype}")
        _check_shape(op, "modality", modality, modality_shape)
        if A.dim() != 3:
            raise ValueError(
                f"{op}: A must have shape (M, dim, N) when modality is given, got rank {A.dim()}"
            )
        num_modalities, N = A.shape[0], A.shape[2]
        _check_shape(op, "A", A, (num_modalities, dim, N))
        param_shape = (num_modalities, dim)
    for name, p in (("D", D), (bias_name, bias)):
        if p is None:
            continue
        _check_float(op, name, p, allowed)
        if modality is not None and p.dim() == 2 and p.shape[0] != num_modalities:
            raise ValueError(
                f"{op}: mismatched modality counts: A has M={num_modalities} but {name} has "
                f"{p.shape[0]}"
            )
        _check_shape(op, name, p, param_shape)
    if modality is not None:
        _check_modality_values(op, modality, num_modalities)
    return num_modalities, N


def _check_bc(op: str, name: str, x: torch.Tensor, batch: int, dim: int, N: int, tail: Tuple[int, ...], dtype):
    """B/C: (batch, N, *tail) or (batch, G, N, *tail) with dim % G == 0; returns G."""
    _check_float(op, name, x, (torch.float32, dtype))
    rank = 2 + len(tail)
    if x.dim() == rank:
        _check_shape(op, name, x, (batch, N) + tail)
        return 1
    if x.dim() == rank + 1:
        G = x.shape[1]
        _check_shape(op, name, x, (batch, G, N) + tail)
        if G == 0 or dim % G != 0:
            raise ValueError(f"{op}: dim ({dim}) must be divisible by the number of groups of {name} ({G})")
        return G
    raise ValueError(f"{op}: {name} must have rank {rank} or {rank + 1}, got rank {x.dim()}")


def _expand_groups(x: torch.Tensor, grouped: bool, dim: int) -> torch.Tensor:
    """fp32 copy of B/C with a channel axis: (B, D, N, ...) (channel d uses group d // (dim // G))."""
    x = x.float()
    if not grouped:
        return x.unsqueeze(1)  # (B, 1, N, ...) broadcasts over channels
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    modality: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Reference of momoe.ops.selective_scan.selective_scan (same arguments, same results)."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, dim, L), got rank {u.dim()}")
    _check_float("selective_scan", "u", u, FLOAT_DTYPES)
    batch, dim, L = u.shape
    for name, x in (("delta", delta), ("z", z)):
        if x is None:
            continue
        if x.dtype != u.dtype:
            raise ValueError(f"selective_scan: {name} must have u's dtype {u.dtype}, got {x.dtype}")
        _check_shape("selective_scan", name, x, (batch, dim, L))
    params = (("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias), ("initial_state", initial_state))
    for name, x in params:
        if x is not None and (x.device != u.device):
            raise ValueError(f"selective_scan: {name} is on {x.device} but u is on {u.device}")
    if modality is not None and modality.device != u.device:
        raise ValueError(f"selective_scan: modality is on {modality.device} but u is on {u.device}")
    _, N = _check_params("selective_scan", A, D, delta_bias, "delta_bias", modality, (batch, L), dim, u.dtype)
    _check_bc("selective_scan", "B", B, batch, dim, N, (L,), u.dtype)
    _check_bc("selective_scan", "C", C, batch, dim, N, (L,), u.dtype)
    if C.shape != B.shape:
        raise ValueError(f"selective_scan: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if initial_state is not None:
        _check_float("selective_scan", "initial_state", initial_state, (torch.float32, u.dtype))
        _check_shape("selective_scan", "initial_state", initial_state, (batch, dim, N))

    u_BDL, dt_BDL = u.float(), delta.float()
    if modality is not None:
        mod_BL = modality.long()
        A_BLDN = A.float()[mod_BL]  # per-token A
    if delta_bias is not None:
        bias = delta_bias.float()
        dt_BDL = dt_BDL + (bias[mod_BL].transpose(1, 2) if modality is not None else bias[:, None])
    if delta_softplus:
        dt_BDL = F.softplus(dt_BDL, beta=1.0, threshold=20.0)
    B_BDNL = _expand_groups(B, B.dim() == 4, dim)
    C_BDNL = _expand_groups(C, C.dim() == 4, dim)
    if modality is not None:
        dA_BDLN = torch.exp(dt_BDL.unsqueeze(-1) * A_BLDN.transpose(1, 2))
    else:
        dA_BDLN = torch.exp(dt_BDL.unsqueeze(-1) * A.float()[:, None, :])
    dBu_BDLN = (dt_BDL * u_BDL).unsqueeze(-1) * B_BDNL.transpose(2, 3)
    C_BDLN = C_BDNL.transpose(2, 3)

    if initial_state is not None:
        h_BDN = initial_state.float()
    else:
        h_BDN = u_BDL.new_zeros(batch, dim, N)
    ys = []
    # unbind (one backward node) rather than indexing [:, :, t] (whose backward is O(L) each)
    for dA_BDN, dBu_BDN, C_BDN in zip(dA_BDLN.unbind(2), dBu_BDLN.unbind(2), C_BDLN.unbind(2)):
        h_BDN = dA_BDN * h_BDN + dBu_BDN
        ys.append((h_BDN * C_BDN).sum(-1))
    y_BDL = torch.stack(ys, dim=-1) if L > 0 else u_BDL.new_zeros(batch, dim, 0)
    if D is not None:
        D32 = D.float()
        D_BDL = D32[mod_BL].transpose(1, 2) if modality is not None else D32[:, None]
        y_BDL = y_BDL + D_BDL * u_BDL
    if z is not None:
        y_BDL = y_BDL * F.silu(z.float())
    out = y_BDL.to(u.dtype)
    return (out, h_BDN) if return_last_state else out


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    modality: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of momoe.ops.selective_scan.selective_state_update (one token, `state` updated in place)."""
    if x.dim() != 2:
        raise ValueError(f"selective_state_update: x must have shape (batch, dim), got rank {x.dim()}")
    _check_float("selective_state_update", "x", x, FLOAT_DTYPES)
    batch, dim = x.shape
    for name, t in (("dt", dt), ("z", z)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"selective_state_update: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        _check_shape("selective_state_update", name, t, (batch, dim))
    for name, t in (("state", state), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias), ("modality", modality)):
        if t is not None and t.device != x.device:
            raise ValueError(f"selective_state_update: {name} is on {t.device} but x is on {x.device}")
    _, N = _check_params("selective_state_update", A, D, dt_bias, "dt_bias", modality, (batch,), dim, x.dtype)
    _check_bc("selective_state_update", "B", B, batch, dim, N, (), x.dtype)
    _check_bc("selective_state_update", "C", C, batch, dim, N, (), x.dtype)
    if C.shape != B.shape:
        raise ValueError(f"selective_state_update: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    _check_float("selective_state_update", "state", state, (torch.float32, x.dtype))
    _check_shape("selective_state_update", "state", state, (batch, dim, N))

    x_BD, dt_BD = x.float(), dt.float()
    if modality is not None:
        mod_B = modality.long()
    if dt_bias is not None:
        bias = dt_bias.float()
        dt_BD = dt_BD + (bias[mod_B] if modality is not None else bias)
    if dt_softplus:
        dt_BD = F.softplus(dt_BD, beta=1.0, threshold=20.0)
    A_BDN = A.float()[mod_B] if modality is not None else A.float()
    B_BDN = _expand_groups(B, B.dim() == 3, dim)
    C_BDN = _expand_groups(C, C.dim() == 3, dim)
    h_BDN = torch.exp(dt_BD.unsqueeze(-1) * A_BDN) * state.float() + (dt_BD * x_BD).unsqueeze(-1) * B_BDN
    y_BD = (h_BDN * C_BDN).sum(-1)
    if D is not None:
        D32 = D.float()
        y_BD = y_BD + (D32[mod_B] if modality is not None else D32) * x_BD
    if z is not None:
        y_BD = y_BD * F.silu(z.float())
    with torch.no_grad():
        state.copy_(h_BDN.to(state.dtype))
    return y_BD.to(x.dtype)
