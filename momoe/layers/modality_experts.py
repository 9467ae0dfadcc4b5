"""MoMa's modality-aware experts (Lin et al. 2024, arXiv 2407.21770, §2.2): the FFN experts are split
into one group per modality, every token goes to its own modality's group (deterministic), and inside a
group the experts pick their tokens by expert choice.

All groups' experts live in one `ExpertFFN` bank (group 0's experts first), so however many groups
there are, a layer runs two grouped GEMMs: the routed rows of every group are concatenated (grouped by
expert) and dispatched once with `run_experts`. Only the routing decisions are made per group (a loop
over the M <= 3 modalities, each a top-k over its own tokens), never a loop over experts or tokens.

A group with a single expert has nothing to route: its expert processes every token of the modality
with weight 1 (MoMa's 1t1i is modality-specific FFNs, as in Mixture-of-Transformers).

`routing="token_choice"` replaces expert choice inside each group by top-k token choice with the
load-balancing and z losses (`TokenChoiceRouter`): causal by construction, no auxiliary routers needed,
at the price of an auxiliary loss and uneven expert loads.

Shape legend: B batch, L time, T tokens (B * L), D d_model, F d_ff, E experts of all groups, R rows.
"""
from typing import List, Optional, Sequence

import torch
from torch import nn

from momoe.layers.experts import ExpertFFN, run_experts
from momoe.layers.modality_linear import ModalityRouting
from momoe.layers.routers import ExpertChoiceRouter, RoutingContext, TokenChoiceRouter
from momoe.ops import gather_rows, sort_by_group

EXPERT_ROUTINGS = ("expert_choice", "token_choice")


class ModalityExperts(nn.Module):
    """Modality groups of SwiGLU experts with expert-choice routing inside each group.

    Args:
        d_model, d_ff: sizes of every expert.
        experts_per_modality: experts of each modality's group, e.g. ``[4, 4]`` for MoMa 4t4i.
        modality_names: one name per group (names the routers: ``routers.text``).
        capacity_factor: expert choice capacity ``C = ceil(capacity_factor * T_m / E_m)`` over the
            T_m tokens of the group in the call (MoMa computes it over the batch).
        aux_hidden, gumbel_noise: see `ExpertChoiceRouter`.
        routing: "expert_choice" (MoMa) or "token_choice"; top_k: experts per token with token choice.

    Example::

        >>> moe = ModalityExperts(16, 32, [2, 1], ["text", "image"])
        >>> modality_ids = torch.randint(0, 2, (2, 6))
        >>> y = moe(torch.randn(2, 6, 16), ModalityRouting.from_ids(modality_ids, 2))   # (2, 6, 16)
    """

    def __init__(self, d_model: int, d_ff: int, experts_per_modality: Sequence[int], modality_names: Sequence[str],
                 capacity_factor: float = 1.0, aux_hidden: Optional[int] = None, gumbel_noise: bool = False,
                 routing: str = "expert_choice", top_k: int = 1) -> None:
        super().__init__()
        if routing not in EXPERT_ROUTINGS:
            raise ValueError(f"momoe: unknown expert routing {routing!r}; choose one of {EXPERT_ROUTINGS}")
        if len(experts_per_modality) != len(modality_names):
            raise ValueError(f"momoe: experts_per_modality {list(experts_per_modality)} needs one entry per "
                             f"modality {list(modality_names)}")
        if any(e < 1 for e in experts_per_modality):
            raise ValueError(f"momoe: every modality needs at least one expert, got {list(experts_per_modality)}")
        self.d_model, self.d_ff = d_model, d_ff
        self.experts_per_modality: List[int] = list(experts_per_modality)
        self.modality_names: List[str] = list(modality_names)
        self.experts = ExpertFFN(d_model, d_ff, sum(self.experts_per_modality))

        def router(e: int) -> nn.Module:
            if routing == "token_choice":
                return TokenChoiceRouter(d_model, e, top_k=top_k)
            return ExpertChoiceRouter(d_model, e, capacity_factor=capacity_factor, aux_hidden=aux_hidden,
                                      gumbel_noise=gumbel_noise)

        self.routers = nn.ModuleDict({name: router(e) for name, e in zip(self.modality_names, self.experts_per_modality)
                                      if e > 1})

    @property
    def num_modalities(self) -> int:
        return len(self.experts_per_modality)

    def forward(self, x: torch.Tensor, routing: ModalityRouting, ctx: Optional[RoutingContext] = None,
                name: str = "experts") -> torch.Tensor:
        """x: (..., D) in token order; routing: the same tokens sorted by modality -> (..., D).

        Tokens that no expert of their group picked get 0 (the block's residual carries them)."""
        ctx = RoutingContext() if ctx is None else ctx
        if routing.num_tokens * self.d_model != x.numel():
            raise ValueError(f"momoe: routing is for {routing.num_tokens} tokens, x has shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.d_model)
        token_index, gates, sizes = [], [], []
        start = 0
        for name_m, e_m, t_m in zip(self.modality_names, self.experts_per_modality, routing.sizes.tolist()):
            tokens = routing.order[start:start + t_m]  # (T_m,) this modality's tokens
            start += t_m
            if e_m == 1:
                token_index.append(tokens)
                gates.append(torch.ones(t_m, dtype=torch.float32, device=x.device))
                sizes.append(routing.sizes.new_full((1,), t_m))
                continue
            router = self.routers[name_m]
            x_m = gather_rows(x_TD, tokens)
            if isinstance(router, TokenChoiceRouter):
                rows, row_gates, row_sizes = self.route_token_choice(router, x_m, ctx, f"{name}.{name_m}")
                token_index.append(tokens[rows])
                gates.append(row_gates)
                sizes.append(row_sizes)
                continue
            decision = router(x_m, causal=ctx.causal)
            if ctx.train_aux_routers and t_m > 0:  # no tokens: no targets (a mean over none is NaN)
                ctx.aux_losses.append(router.aux_router_loss(x_m, decision))
            ctx.stats[f"{name}.{name_m}"] = decision.stats
            token_index.append(tokens[decision.token_index])
            gates.append(decision.gates)
            sizes.append(decision.sizes)
        y = run_experts(x_TD, torch.cat(token_index), torch.cat(gates), torch.cat(sizes), self.experts)
        return y.reshape(x.shape)

    @staticmethod
    def route_token_choice(router: TokenChoiceRouter, x_m: torch.Tensor, ctx: RoutingContext,
                           name: str) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """Top-k token choice in one group: (rows (R,) into the group's tokens grouped by expert, gates (R,),
        sizes (E_m,)); the balancing and z losses go to ctx (not in the auxiliary routers' stage)."""
        decision = router(x_m)
        if x_m.shape[0] > 0 and not ctx.train_aux_routers:
            ctx.aux_losses.append(decision.aux_loss)
        ctx.stats[name] = decision.stats
        order, sizes = sort_by_group(decision.expert_ids, router.num_experts)  # (T_m * k,), (E_m,)
        return order // router.top_k, decision.gates.reshape(-1)[order], sizes

    def active_experts_per_token(self) -> List[float]:
        """Experts one token of each modality goes through on average: capacity_factor in an expert-choice
        group (E_m experts x C = cf * T_m / E_m tokens each), top_k with token choice, 1 in a
        single-expert group."""
        def active(router: Optional[nn.Module]) -> float:
            if router is None:
                return 1.0
            return float(router.top_k) if isinstance(router, TokenChoiceRouter) else router.capacity_factor

        return [active(self.routers[n] if e > 1 else None) for n, e in zip(self.modality_names, self.experts_per_modality)]

    def extra_repr(self) -> str:
        groups = ", ".join(f"{n}: {e}" for n, e in zip(self.modality_names, self.experts_per_modality))
        return f"experts_per_modality={{{groups}}}"
