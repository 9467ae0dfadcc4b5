"""`momoe demo`: a tiny modality-split mixture-of-experts FFN run through the momoe ops.

Tokens of three modalities (text, image, speech) are routed top-k among their own modality's
experts, dispatched with sort_by_group/gather_rows, run through a ReLU^2 FFN of two grouped
GEMMs and combined with scatter_rows. Forward and backward are compared
with the pure-PyTorch reference backend and timed.
"""
import time
from typing import Dict, Tuple

import torch

from momoe.ops import gather_rows, grouped_gemm, scatter_rows, sort_by_group, use_backend

MODALITIES = ("text", "image", "speech")


def modality_moe_ffn(
    x: torch.Tensor,
    modality: torch.Tensor,
    router: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    experts_per_modality: int,
    top_k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One modality-aware MoE FFN.

    Args:
        x (Tensor): tokens `[T, D]`; modality (Tensor): `[T]` ids in [0, 3).
        router (Tensor): `[D, M*E]`; w_in (Tensor): `[M*E, D, F]`; w_out (Tensor): `[M*E, F, D]`.
    Returns:
        y `[T, D]` and the tokens per expert `[M*E]`.
    """
    T = x.shape[0]
    num_experts = w_in.shape[0]
    logits = x @ router
    # Each token may only pick experts of its own modality.
    own = torch.arange(num_experts, device=x.device) // experts_per_modality == modality[:, None]
    logits = logits.masked_fill(~own, float("-inf"))
    gates, expert_ids = logits.softmax(-1).topk(top_k, dim=-1)
    order, sizes = sort_by_group(expert_ids, num_experts)
    token_of_row = order // top_k
    h = grouped_gemm(gather_rows(x, token_of_row), w_in, sizes)
    h = torch.relu(h).square()
    out = grouped_gemm(h, w_out, sizes)
    y = scatter_rows(out, token_of_row, T, weight=gates.flatten()[order])
    return y, sizes


def run_once(inputs: Dict[str, torch.Tensor], experts: int, top_k: int):
    leaves = {k: inputs[k].detach().requires_grad_() for k in ("x", "router", "w_in", "w_out")}
    start = time.perf_counter()
    y, sizes = modality_moe_ffn(leaves["x"], inputs["modality"], leaves["router"], leaves["w_in"],
                                leaves["w_out"], experts, top_k)
    y.square().mean().backward()
    seconds = time.perf_counter() - start
    return y.detach(), {k: v.grad for k, v in leaves.items()}, sizes, seconds


def main(tokens: int = 2048, d_model: int = 256, d_ff: int = 512, experts: int = 2, top_k: int = 1) -> None:
    torch.manual_seed(0)
    num_experts = len(MODALITIES) * experts
    inputs = {
        "x": torch.randn(tokens, d_model),
        "modality": torch.randint(0, len(MODALITIES), (tokens,)),
        "router": torch.randn(d_model, num_experts) / d_model**0.5,
        "w_in": torch.randn(num_experts, d_model, d_ff) / d_model**0.5,
        "w_out": torch.randn(num_experts, d_ff, d_model) / d_ff**0.5,
    }
    run_once(inputs, experts, top_k)  # warm-up
    y, grads, sizes, t_kernel = run_once(inputs, experts, top_k)
    with use_backend("reference"):
        y_ref, grads_ref, _, t_ref = run_once(inputs, experts, top_k)

    print(f"modality-split MoE FFN: {tokens} tokens, d_model={d_model}, d_ff={d_ff}, "
          f"{experts} experts per modality, top-{top_k}")
    print(f"{'modality':<8} {'tokens':>7}   tokens per expert")
    for m, name in enumerate(MODALITIES):
        count = int((inputs["modality"] == m).sum())
        per_expert = sizes[m * experts : (m + 1) * experts].tolist()
        print(f"{name:<8} {count:>7}   {per_expert}")
    print(f"\n{'tensor':<10} {'max |kernel - reference|':>25}")
    print(f"{'y':<10} {(y - y_ref).abs().max().item():>25.2e}")
    for name in grads:
        print(f"{'d' + name:<10} {(grads[name] - grads_ref[name]).abs().max().item():>25.2e}")
    print(f"\nforward+backward: kernels {t_kernel * 1e3:.1f} ms, reference {t_ref * 1e3:.1f} ms "
          f"({t_ref / t_kernel:.1f}x)")


if __name__ == "__main__":
    main()
