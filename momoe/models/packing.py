"""Packed documents: rows that hold several documents back to back, marked by `seq_idx`.

Models whose time mixing must not cross documents (the Mamba scan and conv) run the documents as
rows of their own: `unpack` gathers each document into a row of a (num_docs, max_len) batch,
`repack` puts per-token results back. Padding sits after each document, where causal models never
look. Attention models keep the packed rows instead (`document_attention`): positions restart at
each document and a block-diagonal mask keeps attention inside it, so no padding is added (and
batch-level routing decisions see exactly the real tokens).
"""
import dataclasses

import torch


@dataclasses.dataclass
class Documents:
    """index (num_docs, max_len): flat position (b * L + t) of each document token; valid: the
    same shape, False on padding; shape: the packed (B, L)."""

    index: torch.Tensor
    valid: torch.Tensor
    shape: "tuple[int, int]"

    @classmethod
    def from_seq_idx(cls, seq_idx: torch.Tensor) -> "Documents":
        """seq_idx: (B, L) integers, non-decreasing along each row; a change starts a new document."""
        if seq_idx.dim() != 2 or seq_idx.is_floating_point():
            raise ValueError(f"momoe: seq_idx must be an integer tensor of shape (B, L), got {seq_idx.dtype} "
                             f"{tuple(seq_idx.shape)}")
        B, L = seq_idx.shape
        if L > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("momoe: seq_idx must be non-decreasing along each row (documents are contiguous)")
        starts = torch.ones(B, L, dtype=torch.bool, device=seq_idx.device)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        doc = starts.reshape(-1).long().cumsum(0) - 1  # (B*L,) document of each token
        num_docs = int(doc[-1].item()) + 1 if doc.numel() else 0
        lengths = torch.bincount(doc, minlength=num_docs)
        first = torch.zeros(num_docs, dtype=torch.long, device=seq_idx.device)
        first[1:] = lengths.cumsum(0)[:-1]
        positions = torch.arange(B * L, device=seq_idx.device)
        offset = positions - first[doc]
        max_len = int(lengths.max().item()) if num_docs else 0
        index = torch.zeros(num_docs, max_len, dtype=torch.long, device=seq_idx.device)
        valid = torch.zeros(num_docs, max_len, dtype=torch.bool, device=seq_idx.device)
        index[doc, offset] = positions
        valid[doc, offset] = True
        return cls(index=index, valid=valid, shape=(B, L))

    def unpack(self, x: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """x: (B, L, ...) packed -> (num_docs, max_len, ...), `pad` on padding."""
        flat = x.reshape(self.shape[0] * self.shape[1], *x.shape[2:])
        out = flat[self.index]
        mask = self.valid.reshape(*self.valid.shape, *([1] * (x.dim() - 2)))
        return torch.where(mask, out, torch.full_like(out, pad))

    def repack(self, y: torch.Tensor) -> torch.Tensor:
        """y: (num_docs, max_len, ...) -> (B, L, ...) (padding dropped)."""
        B, L = self.shape
        out = y.new_empty(B * L, *y.shape[2:])
        out[self.index[self.valid]] = y[self.valid]
        return out.reshape(B, L, *y.shape[2:])


def document_attention(seq_idx: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """seq_idx: (B, L) non-decreasing document ids -> positions (B, L) within each document, mask
    (B, L, L) bool (True where query and key are in the same document; causality is the attention's),
    starts (B, L) bool (True at the first token of each document)."""
    Documents.from_seq_idx(seq_idx)  # validates
    B, L = seq_idx.shape
    starts = torch.ones(B, L, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    t = torch.arange(L, device=seq_idx.device).expand(B, L)
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - first, seq_idx[:, :, None] == seq_idx[:, None, :], starts
