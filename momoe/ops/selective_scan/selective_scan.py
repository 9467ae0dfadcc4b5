"""Fake (meta) and autograd registrations of torch.ops.momoe.selective_scan_* .

Shape legend: B batch, D channels (dim), L time, N state size, G groups of B/C, M modalities.
"""
from typing import Optional

import torch

from momoe.ops.backend import extension_available

CHUNK = 256  # timesteps per saved state in chunk_states (the kernel's recompute granularity)


def _check_devices(op: str, reference: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Same-device check in the fakes (a meta tensor mixed with CPU tensors dispatches here)."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(
                t.device == reference.device,
                lambda: f"{op}: {name} must be on the same device as the other inputs ({reference.device}), "
                f"got {t.device}",
            )


def _is_time_major(x: torch.Tensor) -> bool:
    """The kernel's rule (csrc/selective_scan/selective_scan_cpu.cpp): channels contiguous, time not."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1 and x.stride(2) != 1


def _empty_bdl(like: torch.Tensor, time_major: bool) -> torch.Tensor:
    """An uninitialised (batch, dim, L) tensor in the kernel's output layout."""
    batch, dim, L = like.shape
    if time_major:
        return like.new_empty((batch, L, dim)).transpose(1, 2)
    return like.new_empty((batch, dim, L))


def _empty_like_absent(u: torch.Tensor) -> torch.Tensor:
    """The (0,) tensor the backward returns for an input that was None."""
    return u.new_empty((0,))


if extension_available():

    @torch.library.register_fake("momoe::selective_scan_fwd")
    def _selective_scan_fwd_fake(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor],
        z: Optional[torch.Tensor],
        delta_bias: Optional[torch.Tensor],
        delta_softplus: bool,
        modality: Optional[torch.Tensor],
        initial_state: Optional[torch.Tensor],
    ):
        torch._check(u.dim() == 3, lambda: f"selective_scan_fwd: u must have rank 3, got {u.dim()}")
        _check_devices("selective_scan_fwd", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                       modality=modality, initial_state=initial_state)
        batch, dim, L = u.shape
        N = A.shape[-1]
        n_chunks = (L + (CHUNK - 1)) // CHUNK
        out = _empty_bdl(u, _is_time_major(u) or (z is not None and _is_time_major(z)))
        last_state = u.new_empty((batch, dim, N), dtype=torch.float32)
        chunk_states = u.new_empty((batch, dim, n_chunks, N), dtype=torch.float32)
        return out, last_state, chunk_states

    @torch.library.register_fake("momoe::selective_scan_bwd")
    def _selective_scan_bwd_fake(
        dout: torch.Tensor,
        dlast_state: Optional[torch.Tensor],
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor],
        z: Optional[torch.Tensor],
        delta_bias: Optional[torch.Tensor],
        delta_softplus: bool,
        modality: Optional[torch.Tensor],
        initial_state: Optional[torch.Tensor],
        chunk_states: torch.Tensor,
    ):
        def like(x: Optional[torch.Tensor]) -> torch.Tensor:
            return _empty_like_absent(u) if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)

        def like_activation(x: Optional[torch.Tensor]) -> torch.Tensor:
            return _empty_like_absent(u) if x is None else _empty_bdl(x, _is_time_major(x))

        return (
            like_activation(u),
            like_activation(delta),
            like(A),
            like(B),
            like(C),
            like(D),
            like_activation(z),
            like(delta_bias),
            like(initial_state),
        )

    @torch.library.register_fake("momoe::selective_state_update")
    def _selective_state_update_fake(
        state: torch.Tensor,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor],
        z: Optional[torch.Tensor],
        dt_bias: Optional[torch.Tensor],
        dt_softplus: bool,
        modality: Optional[torch.Tensor],
    ) -> torch.Tensor:
        torch._check(x.dim() == 2, lambda: f"selective_state_update: x must have rank 2, got {x.dim()}")
        _check_devices("selective_state_update", x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                       modality=modality)
        return x.new_empty(x.shape)

    def _setup_context(ctx, inputs, output) -> None:
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, modality, initial_state = inputs
        _, _, chunk_states = output
        ctx.delta_softplus = delta_softplus
        optional = (D, z, delta_bias, modality, initial_state)
        ctx.has = tuple(x is not None for x in optional)
        saved = [u, delta, A, B, C, chunk_states]
        saved += [x for x in optional if x is not None]
        ctx.save_for_backward(*saved)

    def _backward(ctx, dout, dlast_state, dchunk_states):
        u, delta, A, B, C, chunk_states, *rest = ctx.saved_tensors
        optional = iter(rest)
        D, z, delta_bias, modality, initial_state = (next(optional) if has else None for has in ctx.has)
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = torch.ops.momoe.selective_scan_bwd(
            dout,
            dlast_state,
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            ctx.delta_softplus,
            modality,
            initial_state,
            chunk_states,
        )
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            None,  # delta_softplus
            None,  # modality
            dinitial_state if initial_state is not None else None,
        )

    torch.library.register_autograd("momoe::selective_scan_fwd", _backward, setup_context=_setup_context)
