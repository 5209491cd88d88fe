"""Randomly initialised models at known shapes, for cost benchmarks without downloaded weights.

``random:<shape>`` names a model with the layer sizes of a real one (Llama architecture unless the
shape names another ``model_type``) and random weights (seeded), plus a byte-level tokenizer built
in memory, so ``specdec bench --model random:smollm2-135m`` and ``specdec bench-verify`` run
anywhere, a bare GPU machine included. Nothing is accepted from random weights: such runs measure
costs, not speedups. The hybrid shapes (``mamba2-130m``: state-spaces/mamba2-130m's sizes;
``gdn-hybrid-0.5b``: a Qwen3.5-style Gated DeltaNet hybrid at sizes chosen here, three linear-
attention layers to one full-attention layer) price trees through recurrent layers.
"""

from __future__ import annotations

import torch

PREFIX = "random:"

# Layer sizes of the real models (weights random).
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "mamba2-130m": dict(model_type="mamba2", vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128,
                        expand=2, head_dim=64, num_heads=24, n_groups=1, conv_kernel=4, chunk_size=256,
                        tie_word_embeddings=True),
    "gdn-hybrid-0.5b": dict(model_type="qwen3_5_text", vocab_size=151936, hidden_size=1024, num_hidden_layers=24,
                            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6, intermediate_size=3584,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                            linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                            linear_conv_kernel_dim=4, max_position_embeddings=8192, tie_word_embeddings=True),
}


def is_random(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def random_model(name: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for ``random:<shape>`` (see `SHAPES`), initialised on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = name[len(PREFIX):]
    if shape not in SHAPES:
        raise ValueError(f"unknown random model {name!r}; known: {', '.join(PREFIX + s for s in SHAPES)}")
    torch.manual_seed(0)
    sizes = dict(SHAPES[shape])
    config = AutoConfig.for_model(sizes.pop("model_type", "llama"), **sizes, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return model, byte_tokenizer()


def byte_tokenizer():
    """A tokenizer with one token per byte (ids 3..258) and a plain chat template, made in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    return tokenizer
