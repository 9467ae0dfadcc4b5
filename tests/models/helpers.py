"""Inputs and utilities shared by the model tests."""
import torch

from momoe.models.modeling_utils import PreTrainedModel
from tests.utils import assert_close


def batch(cfg, B=2, L=19, seed=0):
    """Random token ids and modality ids (B, L) for a config."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=gen)
    mod = torch.randint(0, cfg.num_modalities, (B, L), generator=gen)
    return ids, mod


def randomize(model: PreTrainedModel, seed=0) -> PreTrainedModel:
    """Perturb every parameter so per-modality copies differ (and tied/zero init hides nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def modality_task(B, L, gen):
    """Interleaved spans of three 'modalities' with different deterministic successor rules over
    disjoint vocabulary ranges: text counts up, image counts down by 2, speech repeats pairs."""
    ids = torch.empty(B, L, dtype=torch.long)
    mod = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        t = 0
        while t < L:
            m = int(torch.randint(0, 3, (1,), generator=gen))
            span = int(torch.randint(4, 10, (1,), generator=gen))
            start = int(torch.randint(0, 16, (1,), generator=gen))
            for i in range(min(span, L - t)):
                step = {0: i, 1: -2 * i, 2: i // 2}[m]
                ids[b, t] = 16 * m + (start + step) % 16
                mod[b, t] = m
                t += 1
    return ids, mod


def train_on_modality_task(model: PreTrainedModel, steps: int, L: int, lr: float = 3e-3):
    """AdamW on modality_task for `steps` steps; returns (loss before, output on a fresh batch after)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids, mod = modality_task(8, L, gen)
    first = model(ids, mod, labels=ids).loss.item()
    for _ in range(steps):
        ids, mod = modality_task(8, L, gen)
        loss = model(ids, mod, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, mod = modality_task(16, L, gen)
    return first, model(ids, mod, labels=ids)


def decode_in_pieces(model: PreTrainedModel, ids: torch.Tensor, mod: torch.Tensor):
    """ids, mod: (B, L), L > 10, decoded as a prefill of 6 tokens, a chunk of 4 that continues its cache,
    then one token at a time with `step` -> (logits (B, L, V), the cache, extended to all L tokens)."""
    prefill = model(ids[:, :6], mod[:, :6], return_cache=True)
    second = model(ids[:, 6:10], mod[:, 6:10], cache=prefill.cache, return_cache=True)
    steps = [model.step(ids[:, t], mod[:, t], second.cache) for t in range(10, ids.shape[1])]
    return torch.cat([prefill.logits, second.logits, torch.stack(steps, 1)], 1), second.cache


def assert_same_as_dense(dense: PreTrainedModel, sparse: PreTrainedModel, ids, mod, tol) -> None:
    """`sparse` (per-modality copies of `dense`'s parameters) gives dense's logits, and each dense
    gradient is the sum of the per-modality gradients."""
    out_d, out_s = dense(ids, mod, labels=ids), sparse(ids, mod, labels=ids)
    assert_close("logits", out_d.logits, out_s.logits, **tol)
    out_d.loss.backward()
    out_s.loss.backward()
    sparse_params = dict(sparse.named_parameters())
    for name, p in dense.named_parameters():
        g = sparse_params[name].grad
        g = g.sum(0, keepdim=True) if g.shape != p.grad.shape else g
        assert_close(f"grad {name}", p.grad, g, atol=1e-5, rtol=1e-4)
