"""Shared fixtures: tiny randomly initialised models and scripted drafters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafters import DraftContext, Drafter
from trees import TokenTree


def tiny_llama(vocab_size: int = 96, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention, fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    # Larger output weights give decisive (non-tied) argmaxes, so equality tests test logic, not noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def untrained_head(model, seed: int = 12):
    """A randomly initialised `drafters.HeadFile` for ``model`` reading out its whole vocabulary
    (its trees are wide and mostly rejected: it exercises the head's plumbing, not its training)."""
    from drafters.head import DraftHead, HeadFile, model_identity

    torch.manual_seed(seed)
    hidden = model.config.hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]
    from specdec.distill.training import head_heads

    head = DraftHead(hidden, 2 * hidden, head_heads(hidden), window=8)
    return HeadFile(head, torch.arange(vocab), model_identity(model), {})


@pytest.fixture(autouse=True)
def no_saved_heads(tmp_path_factory, monkeypatch):
    """Tests never see heads that `specdec distill` saved on this machine (``auto`` would use them)."""
    monkeypatch.setenv("SPECDEC_HOME", str(tmp_path_factory.getbasetemp() / "specdec-home"))


@pytest.fixture(scope="session")
def model():
    return tiny_llama()


def hf_greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos_token_id=-1) -> torch.Tensor:
    """``model.generate(do_sample=False)`` with no padding inference (explicit all-ones mask)."""
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=0,
    )


class ScriptedDrafter(Drafter):
    """Drafts from a known continuation of the prompt.

    ``reference`` is the full greedy sequence (prompt + continuation). At each step the drafter
    looks up where the context ends in it and proposes the next ``depth`` reference tokens as a
    chain; ``corrupt(depth_idx)`` may replace a token (the true one then becomes a rank-1 sibling
    when ``sibling`` is set), modelling the mixed regime. ``reference=None`` proposes random tokens.
    """

    name = "scripted"

    def __init__(self, reference, depth: int = 4, corrupt=None, sibling: bool = True, vocab_size: int = 96,
                 seed: int = 0):
        self.reference = None if reference is None else list(map(int, reference))
        self.depth = depth
        self.corrupt = corrupt or (lambda step, d: False)
        self.sibling = sibling
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def propose(self, ctx: DraftContext, budget: int) -> TokenTree:
        self.step += 1
        if self.reference is None:
            return TokenTree.chain(self.rng.integers(0, self.vocab_size, size=min(budget, self.depth)))
        start = len(ctx.token_ids)
        truth = self.reference[start : start + min(budget, self.depth)]
        tokens, parents = [], []
        chain_parent = -1
        for d, token in enumerate(truth):
            if self.corrupt(self.step, d):
                wrong = (token + 1 + d) % self.vocab_size
                tokens.append(wrong)
                parents.append(chain_parent)
                if not self.sibling or len(tokens) >= budget:
                    break
                tokens.append(token)
                parents.append(chain_parent)
            else:
                tokens.append(token)
                parents.append(chain_parent)
            chain_parent = len(tokens) - 1
            if len(tokens) >= budget:
                break
        return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def read_one(accepted):
    """The host outcome of one tree's acceptance (`specdec.step.accept.Accepted` of a batch of one)."""
    from specdec.step.accept import Accepted, read_outcomes

    rows = Accepted(path=accepted.path[None], block=accepted.block[None], count=accepted.count.view(1))
    return read_outcomes(rows, None, [0])[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + a word-level tokenizer with a chat template, saved as an HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(60)]
    words += "hello there and again what is this".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    model = tiny_llama(vocab_size=len(vocab), seed=5)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
