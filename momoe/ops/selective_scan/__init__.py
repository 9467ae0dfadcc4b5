"""Selective scan (Mamba), optionally with per-token modality parameters.

Shape legend: B batch, D channels (dim), L time, N state size, G groups of B/C, M modalities.
"""
from typing import Optional, Tuple, Union

import torch

from momoe.ops.backend import require_extension, use_reference, extension_available
from momoe.ops.selective_scan import naive
from momoe.ops.selective_scan import selective_scan as _registrations  # noqa: F401  (fake + autograd)

__all__ = ["selective_scan", "selective_state_update"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _light_checks(op: str, x: torch.Tensor, rank: int, x_name: str, A: torch.Tensor, modality) -> None:
    """Cheap Python-side checks (no host syncs): ranks and dtypes; the kernel checks the rest."""
    if x.dim() != rank:
        raise ValueError(f"{op}: {x_name} must have rank {rank}, got rank {x.dim()} (shape {tuple(x.shape)})")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: {x_name} must have dtype float32, bfloat16 or float16, got {x.dtype}")
    expected_rank = 2 if modality is None else 3
    if A.dim() != expected_rank:
        layout = "(dim, N) without modality" if modality is None else "(M, dim, N) when modality is given"
        raise ValueError(f"{op}: A must have shape {layout}, got rank {A.dim()}")
    if modality is not None and (modality.is_floating_point() or modality.is_complex() or modality.dtype == torch.bool):
        raise ValueError(f"{op}: modality must be an integer tensor, got {modality.dtype}")


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
    r"""Selective scan (Mamba's S6) in mamba-ssm's layout, optionally with per-token modality parameters.

    For every batch ``b``, channel ``d`` and time ``t`` (``m = modality[b, t]``, ``g`` the group of ``d``)::

        dt   = softplus?(delta[b, d, t] + delta_bias[m, d])
        h    = exp(dt * A[m, d]) * h + dt * B[b, g, :, t] * u[b, d, t]
        y    = (h * C[b, g, :, t]).sum() + D[m, d] * u[b, d, t]
        out  = y * silu(z[b, d, t])

    With ``modality=None`` this is exactly mamba-ssm's ``selective_scan_fn`` (real ``A``).
    All math is in fp32; differentiable w.r.t. every float input.

    Args:
        u (Tensor): inputs of shape `[B, D, L]`, fp32, bf16 or fp16.
        delta (Tensor): time steps of shape `[B, D, L]`, same dtype as ``u``.
        A (Tensor): state matrix (diagonal) of shape `[D, N]`, or `[M, D, N]` with ``modality``.
        B (Tensor): input projection of shape `[B, N, L]` or `[B, G, N, L]` (``D % G == 0``).
        C (Tensor): output projection of shape `[B, N, L]` or `[B, G, N, L]`.
        D (Optional[Tensor]): skip weights of shape `[D]`, or `[M, D]` with ``modality``.
        z (Optional[Tensor]): gate of shape `[B, D, L]`, same dtype as ``u``.
        delta_bias (Optional[Tensor]): bias added to ``delta`` of shape `[D]`, or `[M, D]` with ``modality``.
        delta_softplus (bool): apply softplus to ``delta + delta_bias`` (identity above 20).
        modality (Optional[LongTensor]): modality of every token of shape `[B, L]`, values in `[0, M)`,
            any integer dtype; ``M = A.shape[0]``.
        initial_state (Optional[Tensor]): state before the first step of shape `[B, D, N]`.
        return_last_state (bool): also return the state after the last step.
        A, B, C, D, delta_bias and initial_state may be fp32 or ``u``'s dtype.

    Returns:
        out (Tensor): of shape `[B, D, L]` in ``u``'s dtype; with ``return_last_state``, also
        last_state (Tensor): of shape `[B, D, N]` in fp32.

    Example::

        >>> u, delta, z = torch.randn(2, 16, 32), torch.rand(2, 16, 32), torch.randn(2, 16, 32)
        >>> A, D = -torch.rand(3, 16, 4), torch.randn(3, 16)   # 3 modalities
        >>> B, C = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
        >>> modality = torch.randint(0, 3, (2, 32))
        >>> out, last = selective_scan(u, delta, A, B, C, D, z, delta_softplus=True,
        ...                            modality=modality, return_last_state=True)
        >>> out.shape, last.shape
        (torch.Size([2, 16, 32]), torch.Size([2, 16, 4]))
    """
    _light_checks("selective_scan", u, 3, "u", A, modality)
    if use_reference():
        return naive.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, modality, initial_state, return_last_state
        )
    if not extension_available():
        require_extension()
    out, last_state, _ = torch.ops.momoe.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, modality, initial_state
    )
    return (out, last_state) if return_last_state else out


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
    r"""One decoding step of :func:`selective_scan`, updating ``state`` in place (inference only).

    Args:
        state (Tensor): SSM state of shape `[B, D, N]`, fp32 or ``x``'s dtype; updated in place.
        x (Tensor): input of the token of shape `[B, D]`, fp32, bf16 or fp16.
        dt (Tensor): time step of shape `[B, D]`, same dtype as ``x``.
        A (Tensor): of shape `[D, N]`, or `[M, D, N]` with ``modality``.
        B (Tensor): of shape `[B, N]` or `[B, G, N]` (``D % G == 0``).
        C (Tensor): of shape `[B, N]` or `[B, G, N]`.
        D (Optional[Tensor]): of shape `[D]`, or `[M, D]` with ``modality``.
        z (Optional[Tensor]): gate of shape `[B, D]`.
        dt_bias (Optional[Tensor]): of shape `[D]`, or `[M, D]` with ``modality``.
        dt_softplus (bool): apply softplus to ``dt + dt_bias``.
        modality (Optional[LongTensor]): modality of the token of every sequence, shape `[B]`, in `[0, M)`.

    Returns:
        y (Tensor): of shape `[B, D]` in ``x``'s dtype.

    Example::

        >>> state = torch.zeros(2, 16, 4)
        >>> x, dt = torch.randn(2, 16), torch.rand(2, 16)
        >>> A, B, C = -torch.rand(16, 4), torch.randn(2, 4), torch.randn(2, 4)
        >>> y = selective_state_update(state, x, dt, A, B, C)   # state now holds h after the token
        >>> y.shape
        torch.Size([2, 16])
    """
    _light_checks("selective_state_update", x, 2, "x", A, modality)
    if torch.is_grad_enabled():
        for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("dt_bias", dt_bias)):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"selective_state_update: is inference only and not differentiable, but {name} requires "
                    "grad; call it under torch.no_grad() / torch.inference_mode() or pass detached tensors "
                    "(use selective_scan for training)"
                )
    if use_reference():
        return naive.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, modality)
    if not extension_available():
        require_extension()
    return torch.ops.momoe.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, modality)
