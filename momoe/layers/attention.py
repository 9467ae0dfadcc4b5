"""Causal self-attention with rotary positions, grouped-query heads, optional QK-norm and optional
per-modality projections (Mixture-of-Transformers, Liang et al. 2024: each modality has its own
wq, wk, wv, wo and QK-norms, while attention itself stays global over the whole interleaved
sequence). With one modality it is a dense Llama-style attention.

Shape legend: B batch, L new tokens, T all tokens (cached + new), D d_model, H query heads,
K key/value heads, E head_dim.
"""
import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from momoe.layers.modality_linear import ModalityLinear, ModalityRouting
from momoe.layers.modality_norm import ModalityRMSNorm
from momoe.layers.rotary import apply_rotary


@dataclasses.dataclass
class KVCache:
    """Keys and values of one attention layer: k, v (B, K, T, E) (rotated keys), None while empty."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        """T, the number of tokens cached."""
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' k, v (B, K, L, E); returns all keys and values (B, K, T + L, E)."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


def attention_mask(L: int, T: int, attn_mask: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The boolean mask (True = may attend) for L new queries over T keys, the queries being the last
    L of the T tokens: (1, 1, L, T) causal, or (B, 1, L, T) combined with attn_mask (B, L, T).
    None when scaled_dot_product_attention needs none: one query with no attn_mask sees every key,
    and L == T without attn_mask is its own is_causal."""
    if attn_mask is None and (L == 1 or L == T):
        return None
    causal = torch.ones(L, T, dtype=torch.bool, device=device).tril(diagonal=T - L)
    if attn_mask is None:
        return causal[None, None]
    if attn_mask.dtype != torch.bool or attn_mask.shape[1:] != (L, T):
        raise ValueError(f"momoe: attn_mask must be a boolean (B, {L}, {T}) tensor, got {attn_mask.dtype} "
                         f"{tuple(attn_mask.shape)}")
    return (causal & attn_mask)[:, None]


class Attention(nn.Module):
    """Causal self-attention: wq, wk, wv (per modality) -> QK-norm (optional, per modality) -> RoPE ->
    softmax(q k^T / sqrt(E)) v over every earlier token of any modality -> wo (per modality).

    Example:
        >>> attn = Attention(64, n_heads=8, n_kv_heads=2, num_modalities=2, qk_norm=True)
        >>> modality_ids = torch.randint(0, 2, (2, 10))
        >>> routing = ModalityRouting.from_ids(modality_ids, 2)
        >>> y = attn(torch.randn(2, 10, 64), routing, torch.arange(10))  # (2, 10, 64)
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        num_modalities: int = 1,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        bias: bool = False,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(f"momoe: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"momoe: n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"momoe: rotary embeddings need an even head_dim, got {self.head_dim} "
                             f"(d_model {d_model} / n_heads {n_heads})")
        self.num_modalities, self.rope_theta = num_modalities, rope_theta
        E, kv_dim = self.head_dim, n_kv_heads * self.head_dim
        self.wq = ModalityLinear(d_model, d_model, num_modalities, bias=bias)
        self.wk = ModalityLinear(d_model, kv_dim, num_modalities, bias=bias)
        self.wv = ModalityLinear(d_model, kv_dim, num_modalities, bias=bias)
        self.wo = ModalityLinear(d_model, d_model, num_modalities, bias=bias)
        self.q_norm = ModalityRMSNorm(E, num_modalities, eps=norm_eps) if qk_norm else None
        self.k_norm = ModalityRMSNorm(E, num_modalities, eps=norm_eps) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        routing: Optional[ModalityRouting],
        positions: torch.Tensor,
        cache: Optional[KVCache] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, L, D); routing: the B * L tokens sorted by modality (needed when M > 1);
        positions: (L,) or (B, L) absolute positions (for RoPE); cache: earlier tokens' keys and
        values, extended in place with the new ones; attn_mask: (B, L, T) boolean, True = may attend
        (T = cached + new tokens), combined with causality. Returns (B, L, D).

        The new tokens are the last L of the T: each attends to every cached token and causally
        among the new ones, so a whole sequence, a chunked prefill and a one-token step agree."""
        B, L, _ = x.shape
        q, k, v = self.project_qkv(x, routing, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, T, E)
        y = self.attend(q, k, v, attention_mask(L, k.shape[2], attn_mask, x.device))
        return self.wo(y.transpose(1, 2).reshape(B, L, self.d_model), routing)

    def project_qkv(self, x: torch.Tensor, routing: Optional[ModalityRouting],
                    positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> rotated q (B, H, L, E), rotated k and v (B, K, L, E)."""
        B, L, _ = x.shape
        q = self.wq(x, routing).view(B, L, self.n_heads, self.head_dim)
        k = self.wk(x, routing).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.wv(x, routing).view(B, L, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.norm_qk(q, k, routing)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, L, E)
        q, k = apply_rotary(q, k, positions, self.rope_theta)
        return q, k, v

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, routing: Optional[ModalityRouting],
                        positions: torch.Tensor) -> torch.Tensor:
        """The causal attention maps softmax(q k^T / sqrt(E)) of x: (B, L, D) -> (B, H, L, L), fp32
        (for analysis, e.g. γ-MoD's ARank; the forward never materialises them)."""
        q, k, _ = self.project_qkv(x, routing, positions)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = q.float() @ k.float().transpose(-1, -2) / self.head_dim ** 0.5  # (B, H, L, L)
        L = x.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor, routing: Optional[ModalityRouting]) -> Tuple[torch.Tensor, torch.Tensor]:
        """q: (B, L, H, E), k: (B, L, K, E) -> both RMS-normalised over E, with each token's modality's weights."""
        if routing is None:
            return self.q_norm(q), self.k_norm(k)
        modality = routing.modality.view(*q.shape[:2], 1)  # (B, L, 1)
        return self.q_norm(q, modality.expand(q.shape[:3])), self.k_norm(k, modality.expand(k.shape[:3]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q: (B, H, L, E); k, v: (B, K, T, E); mask: boolean, broadcastable to (B, H, L, T), or None
        for plain causal (L == T) or a single query -> (B, H, L, E).

        Grouped-query heads go to the kernel as they are when there is no mask (FlashAttention and
        the math kernel take them); the fused kernels that take a mask do not, so with a mask the
        key/value heads are repeated (head h reads kv head h // (H / K))."""
        n_rep = self.n_heads // self.n_kv_heads
        if mask is not None and n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=mask is None and n_rep > 1)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"num_modalities={self.num_modalities}, qk_norm={self.q_norm is not None}, "
                f"rope_theta={self.rope_theta}")
