"""The draft head's network: EAGLE's layout, one attention block over a window of past positions.

Each position ``p`` of the committed text is one *entry*: the target's feature ``f_p`` (what its LM
head read there) fused with the embedding of the token that followed, ``x_{p+1}``. One decoder
block (attention over the last ``window`` entries, then an MLP, both residual) turns an entry into
the predicted feature ``f_{p+1}``, which the target's frozen LM head reads out. Drafting deeper
feeds a predicted feature back with the drafted token as a new entry, a *chain* entry that attends
to the window and to the chain entries of its own ancestors (EAGLE's tree drafting; training
unrolls the same chains, "training-time test").

Norms read fp32 (under training's bf16 autocast too). Keys and values depend on an entry alone,
so the drafter computes them once per committed position; one function, `attend`, serves training
(a band mask over a chunk) and drafting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROPE_THETA = 10000.0


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[..., n, d]`` at ``positions`` ``[n]`` (any origin:
    attention sees only differences)."""
    half = x.shape[-1] // 2
    freq = ROPE_THETA ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # [d/2]
    angle = positions.to(torch.float32)[:, None] * freq  # [n, d/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def attend(q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, ctx_mask: torch.Tensor | None,
           chain_k: torch.Tensor, chain_v: torch.Tensor) -> torch.Tensor:
    """Attention of queries over shared context entries plus each query's own chain entries.

    Shapes: ``q`` ``[B, H, Q, d]``; ``ctx_k``/``ctx_v`` ``[B or 1, H, C, d]`` with ``ctx_mask``
    ``[B or 1, Q, C]`` bool (None: all visible); ``chain_k``/``chain_v`` ``[B, H, Q, J, d]``, the
    ``J`` chain entries query ``q`` alone sees (J may be 0). Returns ``[B, H, Q, d]``.
    """
    scale = q.shape[-1] ** -0.5
    ctx_scores = (q @ ctx_k.transpose(-1, -2)) * scale  # [B, H, Q, C]
    if ctx_mask is not None:
        ctx_scores = ctx_scores.masked_fill(~ctx_mask[:, None], float("-inf"))
    chain_scores = (q.unsqueeze(-2) * chain_k).sum(-1) * scale  # [B, H, Q, J]
    weights = torch.softmax(torch.cat([ctx_scores, chain_scores], dim=-1).float(), dim=-1).to(q.dtype)
    width = ctx_scores.shape[-1]
    return weights[..., :width] @ ctx_v + (weights[..., width:].unsqueeze(-1) * chain_v).sum(-2)


class DraftHead(nn.Module):
    """Entries ``(f_p, embed(x_{p+1}))`` -> predicted features ``f_{p+1}``.

    Args:
        hidden: the target's feature size ``h``.
        inner: the MLP's inner size.
        heads: attention heads (``h`` must divide by it, into an even head size).
        window: how many latest committed entries a query attends to (its own included).
    """

    def __init__(self, hidden: int, inner: int, heads: int, window: int) -> None:
        super().__init__()
        if hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"hidden size {hidden} must split into {heads} heads of an even size")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.hidden, self.inner, self.heads, self.window = hidden, inner, heads, window
        self.feature_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.token_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.fuse = nn.Linear(2 * hidden, hidden)
        self.attn_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def entries(self, features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``[..., h]`` features and next-token embeddings -> ``[..., h]`` fused entries."""
        return self.fuse(torch.cat([self.feature_norm(features.float()), self.token_norm(embeddings.float())], dim=-1))

    def project(self, entries: torch.Tensor, positions: torch.Tensor):
        """``[B, n, h]`` entries at ``positions`` ``[n]`` -> rotated queries, rotated keys and
        values, each ``[B, H, n, h / H]``."""
        batch, n, _ = entries.shape
        q, k, v = self.qkv(self.attn_norm(entries.float())).view(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return rotate(q, positions), rotate(k, positions), v

    def finish(self, entries: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The block's residual output ``[B, n, h]`` from its entries and their attention
        ``[B, H, n, h / H]``: the predicted next features."""
        batch, _, n, _ = attended.shape
        x = entries + self.attn_out(attended.transpose(1, 2).reshape(batch, n, self.hidden))
        return x + self.down(F.silu(self.up(self.mlp_norm(x.float()))))
