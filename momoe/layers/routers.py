"""Learned routers for the expert banks of `momoe.layers.experts`.

- `ExpertChoiceRouter`: MoMa's expert-choice routing with sigmoid gates (Lin et al. 2024,
  arXiv 2407.21770, §2.2), and its auxiliary routers for causal inference (§2.4).
- `TokenChoiceRouter`: top-k softmax routing with the Switch/GShard load-balancing loss
  (Fedus et al. 2021, arXiv 2101.03961, eq. 4) and the ST-MoE router z-loss (Zoph et al. 2022,
  arXiv 2202.08906, eq. 5).
- `KMeansRouter`: MixER's top-1 routing by the nearest K-means centroid of a context vector
  (Nzoyem et al. 2025, arXiv 2502.05335); the centroids are a buffer updated by K-means, never by
  gradients.

Router logits are computed in fp32 with autocast off (ST-MoE's selective precision). A router only
decides; the experts run through `momoe.layers.experts.run_experts` / `dispatch_combine`. In MoMa a
router sees the tokens of one modality group (the model splits tokens by modality first).

Shape legend: T tokens, D d_model, E experts, C capacity (tokens per expert), k experts per token,
R routed (token, expert) rows, H hidden size of an auxiliary router, N routing units of
`KMeansRouter` (sequences or tokens), Z context size.
"""
import dataclasses
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from momoe.ops import scatter_rows


@dataclasses.dataclass
class RouterStats:
    """tokens_per_expert (E,) int64: routed rows per expert; fraction_routed_to (E+1,) float32:
    entry n is the fraction of tokens processed by exactly n experts (entry 0: tokens no expert took)."""

    tokens_per_expert: torch.Tensor
    fraction_routed_to: torch.Tensor

    @classmethod
    def from_rows(cls, expert_index: torch.Tensor, token_index: torch.Tensor, num_tokens: int,
                  num_experts: int) -> "RouterStats":
        """expert_index, token_index: (R,) expert and token of every routed row."""
        experts_per_token = torch.bincount(token_index, minlength=num_tokens)  # (T,)
        histogram = torch.bincount(experts_per_token, minlength=num_experts + 1)
        return cls(tokens_per_expert=torch.bincount(expert_index, minlength=num_experts),
                   fraction_routed_to=histogram.float() / max(num_tokens, 1))


@dataclasses.dataclass
class RoutingContext:
    """What a forward asks of its learned routers, and what they report back.

    causal: route every token on its own (auxiliary routers / predictors), as decoding must; False is
    the training-time routing that looks at the whole batch (expert choice, MoD top-k).
    train_aux_routers: compute the auxiliary routers' BCE against the training-time decisions
    (the second training stage of MoMa §2.4 / MoD §3.5); the losses land in `aux_losses`.
    Routers append their auxiliary losses (already weighted) to `aux_losses` and their RouterStats to
    `stats` under the layer's name.
    """

    causal: bool = False
    train_aux_routers: bool = False
    aux_losses: List[torch.Tensor] = dataclasses.field(default_factory=list)
    stats: Dict[str, "RouterStats"] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.causal and self.train_aux_routers:
            raise ValueError("momoe: the auxiliary routers learn the training-time (non-causal) decisions; "
                             "train_aux_routers needs causal=False")

    def total_aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """The sum of the auxiliary losses (0, as a tensor like `like`, without any)."""
        return torch.stack(self.aux_losses).sum() if self.aux_losses else like.new_zeros((), dtype=torch.float32)


@dataclasses.dataclass
class SortedRouting:
    """Routed (token, expert) rows grouped by expert: what `run_experts` consumes.

    token_index (R,) int64: token of each row, expert 0's rows first; gates (R,) float32
    (differentiable); sizes (E,) int64: rows per expert; logits (T, E) float32: router logits;
    stats: RouterStats; decided_over: the number of tokens the decision was taken over (None: these
    T; expert parallelism decides over the tokens of several ranks).
    """

    token_index: torch.Tensor
    gates: torch.Tensor
    sizes: torch.Tensor
    logits: torch.Tensor
    stats: RouterStats
    decided_over: Optional[int] = None

    @property
    def expert_index(self) -> torch.Tensor:
        """(R,) int64: the expert of each row."""
        experts = torch.arange(self.sizes.shape[0], device=self.sizes.device)
        return torch.repeat_interleave(experts, self.sizes)

    def selection_mask(self) -> torch.Tensor:
        """(T, E) bool: True where expert e processes token t."""
        mask = torch.zeros(self.logits.shape, dtype=torch.bool, device=self.logits.device)
        mask[self.token_index, self.expert_index] = True
        return mask


@dataclasses.dataclass
class TokenChoiceRouting:
    """expert_ids (T, k) int64, gates (T, k) float32 (differentiable), probs (T, E) softmax of the
    logits (T, E); load_balance_loss, z_loss (unscaled) and aux_loss (their weighted sum, to add to the
    training loss) are scalars; stats: RouterStats."""

    expert_ids: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    stats: RouterStats


@dataclasses.dataclass
class KMeansRouting:
    """expert_ids (N,) int64: nearest centroid of each unit; gates (N,) float32, all ones;
    stats: RouterStats over the N units."""

    expert_ids: torch.Tensor
    gates: torch.Tensor
    stats: RouterStats


def check_rows(x: torch.Tensor, features: int, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"momoe: {name} must have shape (rows, {features}), got {tuple(x.shape)}")


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (T, D), weight: (E, D) -> (T, E) in fp32, whatever the autocast state."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def _linear_init(weight: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class AuxRouter(nn.Module):
    """MoMa's auxiliary router (§2.4): ``logits = SiLU(x W_1) W_2`` with W_1: D -> H (MoMa: H = D / 2)
    and W_2: H -> E, no biases; ``sigmoid(logits[t, e]) > 0.5`` predicts that expert (or MoD layer) e
    would select token t. Evaluated per token only (causal)."""

    def __init__(self, d_model: int, num_experts: int, hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"momoe: aux_hidden must be >= 1, got {hidden}")
        self.num_experts, self.hidden = num_experts, hidden
        self.w_in = nn.Linear(d_model, hidden, bias=False)
        self.w_out = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> logits (T, E) in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            return self.w_out(F.silu(self.w_in(x.float())))


def default_aux_hidden(d_model: int) -> int:
    """MoMa's auxiliary router width: d_model / 2."""
    return max(1, d_model // 2)


class ExpertChoiceRouter(nn.Module):
    r"""MoMa's expert-choice routing with sigmoid gates (Lin et al. 2024, §2.2).

    Every expert e picks the C tokens with the highest router logit ``x_t · W_g[e]`` among the T tokens
    it is given (the whole batch of one modality group, not per sequence), and token t's output is
    ``sum over experts e that picked t of sigmoid(logit[t, e]) * expert_e(x_t)``. Sigmoid instead of a
    softmax makes each expert's gate independent of the others. Every expert processes exactly C
    tokens; a token may be processed by 0, 1 or several experts.

    Capacity: ``C = ceil(capacity_factor * T / E)``, computed over all T tokens of the call.
    A capacity factor of 1 gives the balanced load T/E. Rounding a fractional value up is our choice
    (the paper text we could read does not say): every expert gets at least one token and, since
    ``capacity_factor <= E``, never more than T.

    Optional Gumbel-sigmoid noise in training (`gumbel_noise`, off by default):
    ``sigmoid(logit + G' - G'')`` with G', G'' ~ Gumbel(0, 1); the noisy logits choose the tokens and
    give the gates. In eval mode routing is deterministic.

    Causal inference (MoMa §2.4): expert choice needs every token of the batch, so decoding uses one
    auxiliary router (`aux_router`, `AuxRouter`: a SiLU MLP with `aux_hidden` units, MoMa's d_model / 2
    by default, and one output per expert) that predicts whether the token would be among the
    expert's top C. It is trained in a second stage, with the main model frozen, by binary cross-entropy
    against the expert-choice decisions (`aux_router_loss`); `forward(x, causal=True)` then routes every
    token on its own to the experts e with ``sigmoid(aux_router(x)[t, e]) > 0.5``, gated by the main
    router's sigmoid as in training.

    Example::

        >>> from momoe.layers.experts import ExpertFFN, run_experts
        >>> router, experts = ExpertChoiceRouter(16, 4), ExpertFFN(16, 32, 4)
        >>> x = torch.randn(12, 16)
        >>> routing = router(x)                     # 4 experts x 3 tokens each
        >>> y = run_experts(x, routing.token_index, routing.gates, routing.sizes, experts)
        >>> aux_loss = router.aux_router_loss(x, routing)   # stage 2: train router.aux_router only
        >>> causal = router(x, causal=True)         # inference: per-token decisions
    """

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.0,
                 aux_hidden: Optional[int] = None, gumbel_noise: bool = False) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"momoe: ExpertChoiceRouter needs num_experts >= 1, got {num_experts}")
        if not 0 < capacity_factor <= num_experts:
            raise ValueError(
                f"momoe: capacity_factor must be in (0, num_experts = {num_experts}] (each expert takes "
                f"capacity_factor * T / E of the T tokens, at most all of them), got {capacity_factor}"
            )
        aux_hidden = default_aux_hidden(d_model) if aux_hidden is None else aux_hidden
        self.d_model, self.num_experts = d_model, num_experts
        self.capacity_factor, self.gumbel_noise = capacity_factor, gumbel_noise
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        _linear_init(self.weight, d_model)
        self.aux_router = AuxRouter(d_model, num_experts, aux_hidden)

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(capacity_factor * T / E) tokens per expert (at most T)."""
        # round() first so that e.g. 1.2 * 10 / 4 = 3.0000000000000004 gives 3, not 4
        return min(num_tokens, math.ceil(round(self.capacity_factor * num_tokens / self.num_experts, 9)))

    def forward(self, x: torch.Tensor, causal: bool = False) -> SortedRouting:
        """x: (T, D) -> SortedRouting: token_index (R,) grouped by expert, gates (R,), sizes (E,).

        Expert choice (default): R = E * C, every expert takes exactly C tokens. causal=True: each token
        goes to the experts its auxiliary routers accept (R varies; no dependence on other tokens).
        """
        check_rows(x, self.d_model, "x")
        logits = router_logits(x, self.weight)  # (T, E)
        if causal:
            return self._route_causal(x, logits)
        scores = logits
        if self.training and self.gumbel_noise:
            scores = logits + gumbel_like(logits) - gumbel_like(logits)
        capacity = self.capacity(x.shape[0])
        top_scores, token_index = scores.t().topk(capacity, dim=1)  # (E, C) each
        sizes = torch.full((self.num_experts,), capacity, dtype=torch.int64, device=x.device)
        expert_index = torch.arange(self.num_experts, device=x.device).repeat_interleave(capacity)
        token_index = token_index.reshape(-1)
        stats = RouterStats.from_rows(expert_index, token_index, x.shape[0], self.num_experts)
        return SortedRouting(token_index=token_index, gates=torch.sigmoid(top_scores).reshape(-1),
                             sizes=sizes, logits=logits, stats=stats)

    def _route_causal(self, x: torch.Tensor, logits: torch.Tensor) -> SortedRouting:
        accepted = self.aux_router(x) > 0  # (T, E): sigmoid(aux logit) > 0.5
        expert_index, token_index = accepted.t().nonzero(as_tuple=True)  # grouped by expert, tokens ascending
        stats = RouterStats.from_rows(expert_index, token_index, x.shape[0], self.num_experts)
        return SortedRouting(token_index=token_index, gates=torch.sigmoid(logits[token_index, expert_index]),
                             sizes=accepted.sum(0), logits=logits, stats=stats)

    def aux_router_loss(self, x: torch.Tensor, routing: SortedRouting) -> torch.Tensor:
        """Mean BCE of the auxiliary routers against the expert-choice decisions.

        Args:
            x (Tensor): the router's input of shape `[T, D]` (detached here: only `aux_router` learns).
            routing (SortedRouting): `self(x)` in expert-choice mode (the targets).

        Returns:
            Scalar: mean over (token, expert) of BCE(sigmoid(aux logit), token picked by expert).
        """
        check_rows(x, self.d_model, "x")
        if routing.logits.shape[0] != x.shape[0]:
            raise ValueError(f"momoe: routing is for {routing.logits.shape[0]} tokens, x has {x.shape[0]}")
        targets = routing.selection_mask().float()
        return F.binary_cross_entropy_with_logits(self.aux_router(x.detach()), targets)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"capacity_factor={self.capacity_factor}, gumbel_noise={self.gumbel_noise}")


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples shaped like x: -log(-log(u)), u ~ U(0, 1)."""
    u = torch.rand_like(x).clamp(1e-9, 1 - 1e-7)
    return -torch.log(-torch.log(u))


class TokenChoiceRouter(nn.Module):
    r"""Top-k softmax routing (GShard / Switch) with the load-balancing loss and the router z-loss.

    ``probs = softmax(x W_r^T)`` over the E experts; each token goes to its k most probable experts
    with gates ``probs[t, e]`` (Switch, GShard's raw top-k weights; `renormalize=False`, the default) or
    ``probs[t, e] / sum of its k probs`` (`renormalize=True`, Mixtral-style; with k = 1 every gate is
    then 1 and the router gets gradients from the auxiliary losses only). No capacity: every routed
    copy is processed (the grouped GEMM takes any split).

    Losses (returned unscaled, and as ``aux_loss = load_balance_coef * lb + z_loss_coef * z``):

    - load balancing (Switch eq. 4): ``lb = E * sum_e f_e * P_e`` with f_e the fraction of the T*k routed
      copies sent to e and P_e the mean router probability of e. We divide the counts by T*k (Switch,
      k = 1, divides by T) so that lb = 1 for uniform routing at any k, and grows to E when every token
      goes, confidently, to one expert.
    - router z-loss (ST-MoE eq. 5): ``z = mean_t logsumexp(logits_t)^2``.

    Defaults follow the papers: load_balance_coef = 1e-2 (Switch), z_loss_coef = 1e-3 (ST-MoE).

    Example::

        >>> from momoe.layers.experts import ExpertFFN, dispatch_combine
        >>> router, experts = TokenChoiceRouter(16, 4, top_k=2), ExpertFFN(16, 32, 4)
        >>> x = torch.randn(12, 16)
        >>> routing = router(x)
        >>> y = dispatch_combine(x, routing.expert_ids, routing.gates, experts)
        >>> loss = y.square().mean() + routing.aux_loss
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, load_balance_coef: float = 1e-2,
                 z_loss_coef: float = 1e-3, renormalize: bool = False) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"momoe: TokenChoiceRouter needs num_experts >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"momoe: top_k must be in [1, num_experts = {num_experts}], got {top_k}")
        for name, value in (("load_balance_coef", load_balance_coef), ("z_loss_coef", z_loss_coef)):
            if value < 0:
                raise ValueError(f"momoe: {name} must be >= 0, got {value}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.load_balance_coef, self.z_loss_coef, self.renormalize = load_balance_coef, z_loss_coef, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        _linear_init(self.weight, d_model)

    def forward(self, x: torch.Tensor) -> TokenChoiceRouting:
        """x: (T, D) -> TokenChoiceRouting with expert_ids and gates of shape (T, k)."""
        check_rows(x, self.d_model, "x")
        num_tokens = x.shape[0]
        logits = router_logits(x, self.weight)  # (T, E)
        probs = logits.softmax(-1)
        gates, expert_ids = probs.topk(self.top_k, dim=-1)  # (T, k) each
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        tokens_per_expert = torch.bincount(expert_ids.reshape(-1), minlength=self.num_experts)
        fraction = tokens_per_expert.float() / max(num_tokens * self.top_k, 1)  # f_e
        mean_prob = probs.sum(0) / max(num_tokens, 1)  # P_e
        load_balance = self.num_experts * (fraction * mean_prob).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() / max(num_tokens, 1)
        routed_to = torch.zeros(self.num_experts + 1, device=x.device)
        routed_to[self.top_k] = 1.0 if num_tokens else 0.0
        return TokenChoiceRouting(
            expert_ids=expert_ids, gates=gates, probs=probs, logits=logits, load_balance_loss=load_balance,
            z_loss=z_loss, aux_loss=self.load_balance_coef * load_balance + self.z_loss_coef * z_loss,
            stats=RouterStats(tokens_per_expert=tokens_per_expert, fraction_routed_to=routed_to),
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"load_balance_coef={self.load_balance_coef}, z_loss_coef={self.z_loss_coef}, "
                f"renormalize={self.renormalize}")


class KMeansRouter(nn.Module):
    r"""MixER's top-1 router (Nzoyem et al. 2025): each unit goes to the expert of its nearest centroid.

    Routing unit: MixER routes one context vector per *environment* (a dataset / task; all of its
    samples use the same expert), so in a sequence model the natural unit is a sequence: pass
    ``context: (B, Z)`` and expand the ids to the tokens (``ids.repeat_interleave(L)``). Per-token
    routing is the special case ``context: (T, Z)``. Where the context comes from (a learned
    per-sequence vector as in MixER, or a pooled hidden state) is the caller's choice; it is only read
    here (detached).

    Centroids (a buffer (E, Z), never a parameter) are updated by K-means in training mode: on the first
    training call they are seeded by k-means++ from the batch (needs at least E units), then every
    training call runs `kmeans_iters` Lloyd iterations (nearest-centroid assignment, then each
    non-empty cluster's mean) warm-started from the current centroids, and blends the result in:
    ``centroids = ema_decay * centroids + (1 - ema_decay) * kmeans_result``. ema_decay = 0 (the default)
    is MixER's update (it re-runs K-means, warm-started, on the contexts it sees); ema_decay > 0 smooths
    over small batches. The unit is then routed with the updated centroids. Eval mode never updates.

    Gates are 1: MixER's layer outputs the selected expert's output unweighted (hard top-1).

    Differences from MixER's code (github.com/ddrous/MixER): it assigns by mean absolute difference,
    we use the squared Euclidean distance that K-means' mean update minimises; it routes through a
    linear gate fitted by least squares to the cluster labels, we route by the nearest centroid
    directly (the decision that gate approximates); it matches clusters to experts by the experts'
    losses, here cluster e is expert e; it skips the whole update when a cluster is empty, here an empty
    cluster keeps its centroid; it seeds the centroids at U(-1e-3, 1e-3), here by k-means++.

    Example::

        >>> from momoe.layers.experts import ExpertFFN, dispatch_combine
        >>> router, experts = KMeansRouter(context_dim=8, num_experts=4), ExpertFFN(16, 32, 4)
        >>> B, L = 6, 5
        >>> x, context = torch.randn(B * L, 16), torch.randn(B, 8)   # one context per sequence
        >>> routing = router(context)                             # (B,) experts, updates the centroids
        >>> ids = routing.expert_ids.repeat_interleave(L)          # (B * L,)
        >>> y = dispatch_combine(x, ids, routing.gates.repeat_interleave(L), experts)
    """

    centroids: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, context_dim: int, num_experts: int, kmeans_iters: int = 10, ema_decay: float = 0.0) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"momoe: KMeansRouter needs num_experts >= 1, got {num_experts}")
        if context_dim < 1:
            raise ValueError(f"momoe: KMeansRouter needs context_dim >= 1, got {context_dim}")
        if kmeans_iters < 1:
            raise ValueError(f"momoe: kmeans_iters must be >= 1, got {kmeans_iters}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"momoe: ema_decay must be in [0, 1) (0: replace by the K-means means), got {ema_decay}")
        self.context_dim, self.num_experts = context_dim, num_experts
        self.kmeans_iters, self.ema_decay = kmeans_iters, ema_decay
        self.register_buffer("centroids", torch.zeros(num_experts, context_dim))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, context: torch.Tensor) -> KMeansRouting:
        """context: (N, Z) -> KMeansRouting with expert_ids (N,); updates the centroids in training mode."""
        check_rows(context, self.context_dim, "context")
        if self.training:
            self.update(context)
        expert_ids = self.assign(context)
        stats = RouterStats.from_rows(expert_ids, torch.arange(context.shape[0], device=context.device),
                                      context.shape[0], self.num_experts)
        gates = torch.ones(context.shape[0], dtype=torch.float32, device=context.device)
        return KMeansRouting(expert_ids=expert_ids, gates=gates, stats=stats)

    @torch.no_grad()
    def assign(self, context: torch.Tensor) -> torch.Tensor:
        """context: (N, Z) -> (N,) int64, the nearest centroid (squared Euclidean distance)."""
        check_rows(context, self.context_dim, "context")
        if not bool(self.initialized):
            raise ValueError("momoe: KMeansRouter has no centroids yet: run it once in training mode, "
                             "or call init_centroids(context)")
        return _nearest(context.detach().float(), self.centroids)

    @torch.no_grad()
    def init_centroids(self, context: torch.Tensor) -> None:
        """k-means++ seeding (Arthur & Vassilvitskii 2007) from context: (N, Z), N >= E."""
        check_rows(context, self.context_dim, "context")
        points = context.detach().float()
        if points.shape[0] < self.num_experts:
            raise ValueError(f"momoe: seeding {self.num_experts} centroids needs at least {self.num_experts} "
                             f"context vectors, got {points.shape[0]}")
        first = torch.randint(points.shape[0], (1,), device=points.device)
        chosen = [points[first]]
        dist2 = (points - chosen[0]).square().sum(-1)  # (N,) to the nearest chosen centroid
        for _ in range(1, self.num_experts):  # one-off seeding: E sequential draws by definition
            weights = dist2 if bool(dist2.sum() > 0) else torch.ones_like(dist2)
            chosen.append(points[torch.multinomial(weights, 1)])
            dist2 = torch.minimum(dist2, (points - chosen[-1]).square().sum(-1))
        self.centroids.copy_(torch.cat(chosen))
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, context: torch.Tensor) -> None:
        """K-means step on context: (N, Z), warm-started from the centroids, blended by ema_decay."""
        if not bool(self.initialized):
            self.init_centroids(context)
        points = context.detach().float()
        centroids = self.centroids
        for _ in range(self.kmeans_iters):
            cluster = _nearest(points, centroids)  # (N,)
            sums = scatter_rows(points, cluster, self.num_experts)  # (E, Z)
            counts = torch.bincount(cluster, minlength=self.num_experts).unsqueeze(-1)  # (E, 1)
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        self.centroids.mul_(self.ema_decay).add_((1.0 - self.ema_decay) * centroids)

    def extra_repr(self) -> str:
        return (f"context_dim={self.context_dim}, num_experts={self.num_experts}, "
                f"kmeans_iters={self.kmeans_iters}, ema_decay={self.ema_decay}")


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """points: (N, Z), centroids: (E, Z), both fp32 -> (N,) index of the nearest centroid."""
    return torch.cdist(points, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(-1)
