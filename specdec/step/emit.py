"""Where plain decoding would have stopped inside an accepted block: EOS, the length limit and the
request's stopping criteria, checked after every token as ``model.generate`` checks them."""

from __future__ import annotations

import numpy as np
import torch

from specdec.step.accept import Outcome
from specdec.step.request import TokenLogprob
from specdec.step.sequence import Sequence


def cut_at_stop(block: list[int], room: int, eos_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Truncate a committed block at the first EOS (kept) and at ``room`` tokens.

    Returns the tokens to emit and whether generation is finished.
    """
    for i, token in enumerate(block[:room]):
        if token in eos_ids:
            return block[: i + 1], True
    return block[:room], len(block) >= room


def cut_at_criteria(stop, seq: Sequence, emitted: list[int], scores: torch.Tensor,
                    path_slots: list[int]) -> tuple[list[int], bool]:
    """Check ``stop`` after every emitted token, as plain decoding would; cut after the first hit."""
    ids = torch.from_numpy(np.concatenate([seq.history[: seq.n_committed], emitted]))[None]  # [1, L + e] host
    for i, slot in enumerate(path_slots[: len(emitted)]):
        if stop(ids[:, : seq.n_committed + i + 1], scores[slot : slot + 1].float()):
            return emitted[: i + 1], True
    return emitted, False


def emit(seq: Sequence, outcome: Outcome, logits: torch.Tensor, scores: torch.Tensor,
         path: torch.Tensor) -> tuple[list[int], bool]:
    """``seq``'s accepted block cut where plain decoding would stop, added to its result (with the
    scores and logits ``[n+1, V]`` of the slots that chose each token when asked). Returns
    (emitted tokens, finished)."""
    request, result = seq.request, seq.result
    emitted, finished = cut_at_stop(outcome.tokens, request.max_new_tokens - len(result.tokens), request.eos_ids)
    if request.stop is not None:
        emitted, stopped = cut_at_criteria(request.stop, seq, emitted, scores, outcome.path_slots)
        finished = finished or stopped
    result.tokens.extend(emitted)
    chose = path[: len(emitted)]  # device: the slot whose scores chose each emitted token
    if request.keep_scores:
        result.scores.extend(scores.float()[chose].unbind())
    if request.keep_logits:
        result.logits.extend(logits.float()[chose].unbind())
    if request.logprobs is not None and emitted:
        result.logprobs.extend(token_logprobs(logits if request.logprobs_mode == "raw" else scores, chose,
                                              emitted, request.logprobs))
    return emitted, finished


def token_logprobs(scores: torch.Tensor, chose: torch.Tensor, emitted: list[int], top: int) -> list[TokenLogprob]:
    """The log-probability of each of ``emitted`` under the softmax of its slot's ``scores``
    (``[n+1, V]``; ``chose [e]`` the slots, device), with the ``top`` most likely tokens' (tokens
    a mask removed are left out of ``top``). One read of ``[e, 1 + 2 top]`` numbers."""
    logprobs = torch.log_softmax(scores.float()[chose], dim=-1)  # [e, V]
    tokens = torch.tensor(emitted, dtype=torch.long, device=logprobs.device)[:, None]  # host-built
    chosen = logprobs.gather(1, tokens)  # [e, 1]
    best = logprobs.topk(top, dim=-1) if top else None
    packed = chosen if best is None else torch.cat([chosen, best.values, best.indices.to(chosen.dtype)], dim=1)
    rows = packed.cpu().tolist()
    out = []
    for token, row in zip(emitted, rows):
        pairs = [(int(i), v) for v, i in zip(row[1 : 1 + top], row[1 + top :]) if v != float("-inf")]
        out.append(TokenLogprob(token, row[0], pairs))
    return out
