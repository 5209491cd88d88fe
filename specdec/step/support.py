"""Which models tree verification reproduces exactly, and through which attention path.

specdec verifies a tree in one forward by giving the model depth-based ``position_ids`` and a 4D
attention mask (or the csrc tree kernel), and afterwards keeps only the accepted rows of its
attention KV cache. `support_for` decides, once per model, before any generation:

1. statically, from the model's class and config, the families that cannot work (no KV cache, no
   ``position_ids`` beside attention layers, chunked or compressed attention layers, recurrent
   mixers outside the seams `specdec.device.hybrid.seams` knows, ALiBi position biases computed from key
   indices, encoder-decoders); the recurrent mixers it knows then get their tree-aware seams;
2. then by an equivalence probe on a small prompt and a branching tree, through the engine's own
   cache, upload and verify forward: the tree forward's logits (mask path, and kernel path where
   the kernel could run) must equal sequential decoding's, and the cache compacted to the second
   sibling's path must continue exactly. A path that raises or differs is not used; a model
   with no exact path is refused with `UnsupportedGeneration` naming what differed.

Models with learned absolute positions also have a hard position limit (`position_limit`), past
which draft nodes are pruned.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from drafters.modeling import forward_with_cache, returned_cache
from specdec.device.attention import tree_kernel_for
from specdec.device.cache import RECURRENT_LAYER_TYPES, RowCache, layer_types_of
from specdec.device.hybrid.seams import install, recurrent_mixers, unknown_mixers
from specdec.device.tree import HostBuffer, RowTree, upload_rows
from specdec.step.per_model import entry_for
from specdec.step.verify import prefill_row, takes_positions, verify_rows
from trees import TokenTree


class UnsupportedGeneration(ValueError):
    """A ``generate()`` request specdec does not run speculatively (beam search, contrastive search,
    an assistant model, ...). `specdec.patch` can hand these to transformers instead."""


def vocab_size_of(model) -> int:
    """Number of token ids the model's embedding accepts."""
    return int(model.get_input_embeddings().num_embeddings)


ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
ALIBI_FAMILIES = frozenset({"bloom", "mpt"})


def static_reason(model) -> str | None:
    """Why ``model`` cannot verify trees, from its class and config alone (None: it may)."""
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; specdec verifies trees with decoder-only causal LMs"
    parameters = inspect.signature(type(model).forward).parameters
    if "cache" not in parameters and "past_key_values" not in parameters:
        return f"{name} keeps no KV cache, so a verified tree cannot be kept or rolled back"
    layer_types = set(layer_types_of(config)) - {"dummy"}  # dummy: mlp / moe layers, no state
    recurrent = recurrent_mixers(model)
    if "position_ids" not in parameters and (layer_types & ATTENTION_LAYER_TYPES or not recurrent):
        return f"{name}.forward takes no position_ids, so tree nodes cannot sit at their depth's position"
    others = layer_types - ATTENTION_LAYER_TYPES - (RECURRENT_LAYER_TYPES if recurrent else set())
    if others:
        return (f"{name} has {', '.join(sorted(map(str, others)))} layers (chunked, compressed or recurrent state "
                "outside the seams specdec knows), which a tree cannot be verified through and rolled back to its "
                "accepted path")
    if unknown := unknown_mixers(model):
        return (f"{name} has recurrent mixers specdec does not know ({', '.join(unknown)}): their order-dependent "
                "work is not in transformers' shared seam functions, so a tree cannot be verified through them")
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False) \
            or config.model_type in ALIBI_FAMILIES:
        return (f"{name} uses ALiBi position biases computed from key indices, not from the tree's positions, "
                "so tree attention would change its logits")
    return None


# A prompt and a tree that exercise what trees need: siblings that must not see each other, a node
# two deep, and the compacted cache continuing from an accepted path. The ids are offsets from the
# middle of the vocabulary: ordinary tokens. Special tokens (the first ids of most vocabularies)
# drive bf16 models into activations where HF's own full and cached forwards part by a third of
# the logits' scale (SmolLM2 loaded in bf16, ids 5 9 2 7 3 4 6 8: 12.9 of 24), which no tolerance
# can tell from a wrong tree.
_PROBE_PROMPT = (0, 331, 1187, 74, 2549)
_PROBE_ROOT = 612
_PROBE_TREE = ((1409, 58, 3071), (-1, -1, 0))  # tokens, parents: two siblings, a child of the first
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative to the logits' scale; 3e-2 otherwise


def _sequential_logits(model, prefix: torch.Tensor, path: list[int]) -> torch.Tensor:
    """``[V]`` float32 logits after ``prefix`` then ``path``, decoded as ``model.generate`` does: the
    prefix in one forward, then one token at a time on the cache transformers builds for the model
    (its own, not specdec's `SlotCache`, so the reference shares no code with the tree path)."""
    device = prefix.device
    positions = takes_positions(model)  # explicit, as generate passes them: some hybrids count from 0 without
    out = model(input_ids=prefix[None], use_cache=True,
                **({"position_ids": torch.arange(prefix.numel(), device=device)[None]} if positions else {}))
    for offset, token in enumerate(path, start=prefix.numel()):
        out = forward_with_cache(model, returned_cache(out), input_ids=torch.tensor([[token]], device=device),
                                 **({"position_ids": torch.tensor([[offset]], device=device)} if positions else {}))
    return out.logits[0, -1].float()


@torch.inference_mode()
def probe(model, kernel=None) -> str | None:
    """Run a small tree through ``model`` (``kernel``: a `specdec.device.attention.TreeKernel`, or None for
    the mask path) and compare with sequential decoding; None when exact, else what differed."""
    vocab = model.get_input_embeddings().num_embeddings
    middle = vocab // 2
    prefix = (torch.tensor(_PROBE_PROMPT, device=model.device) + middle) % vocab
    tokens = [(t + middle) % vocab for t in _PROBE_TREE[0]]
    tree = TokenTree(torch.tensor(tokens), torch.tensor(_PROBE_TREE[1]))
    root = (_PROBE_ROOT + middle) % vocab
    paths = [[root], [root, tokens[0]], [root, tokens[1]], [root, tokens[0], tokens[2]]]  # slot order
    try:
        expected = torch.stack([_sequential_logits(model, prefix, path) for path in paths])  # [4, V]
        continued = _sequential_logits(model, prefix, [root, tokens[1], tokens[2]])  # [V] after the second sibling
        cache = RowCache.for_model(model)
        cache.fit(1, len(_PROBE_PROMPT) + len(tokens) + 2)
        prefill_row(model, cache, 0, prefix, 1)
        batch = upload_rows([RowTree(tree, root, length=len(_PROBE_PROMPT))], [len(_PROBE_PROMPT)],
                            HostBuffer(model.device))
        got = verify_rows(model, cache, batch, kernel)[0].float()  # [4, V]
        cache.compact_row(0, torch.tensor([0, 2], device=model.device), [0, 2], batch.queries)  # the second sibling
        after = prefill_row(model, cache, 0, torch.tensor([tokens[2]], device=model.device), 1)[0, -1].float()
    except Exception as err:  # a family-specific failure is a reason to refuse, not a crash later
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        return f"the tree forward raised {type(err).__name__}: {first}"
    scale = expected.abs().max().clamp(min=1.0)
    tolerance = _TOLERANCE.get(model.dtype, 3e-2) * scale
    differs = (got - expected).abs().max()
    if differs > tolerance:
        return f"tree logits differ from sequential decoding by {float(differs):.3g} (scale {float(scale):.3g})"
    if (after - continued).abs().max() > tolerance:
        return "the compacted cache does not continue like sequential decoding"
    return None


@dataclass(frozen=True)
class Support:
    """How a model verifies trees: ``reason`` it cannot (None when it can), and the tree-attention
    ``kernel`` when that path is proven exact (None: the model's own attention with a mask)."""

    reason: str | None
    kernel: object | None


def support_for(model, tree_kernel: bool | None = None) -> Support:
    """`Support` of ``model`` (probed once per model, dtype, device and ``tree_kernel`` setting).

    ``tree_kernel``: None uses the kernel where it loads and is proven exact, True requires it
    (ValueError / RuntimeError when it cannot be used), False never uses it.
    """
    key = (tree_kernel, model.dtype, str(model.device))
    entry = entry_for(model)
    known = entry.support.get(key)  # decided once: later calls (inside steps too) take no lock
    if known is not None:
        return known
    with entry.lock:  # the probe runs forwards on the model
        if key in entry.support:
            return entry.support[key]
        reason = static_reason(model)
        if reason is None and recurrent_mixers(model):
            install(model)  # tree-aware seams for its recurrent layers (specdec.device.hybrid.seams)
        kernel = None if reason else tree_kernel_for(model, tree_kernel)
        if kernel is not None and (kernel_failure := probe(model, kernel)):
            if tree_kernel:
                raise ValueError(f"tree_kernel=True, but the tree kernel is not exact for {type(model).__name__}: "
                                 f"{kernel_failure}")
            kernel = None
        if reason is None and kernel is None and (mask_failure := probe(model, None)):
            reason = (f"tree verification does not reproduce {type(model).__name__}'s sequential decoding "
                      f"({mask_failure})")
        entry.support[key] = Support(reason, kernel)
        return entry.support[key]
