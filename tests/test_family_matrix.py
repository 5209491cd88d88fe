"""Every decoder-only causal-LM family transformers can build from a config: specdec's greedy output
equals ``model.generate``'s (a scripted drafter's wide, partly wrong trees at budget 16; the learned
drafters adaptive and at budget 4; the tree kernel where specdec chooses it, and the mask path; for
models with recurrent layers also a left-padded batch of two rows verified together),
or specdec refuses the model with `UnsupportedGeneration` before any forward. Never a different
token, never another exception.

Models are tiny and random (fp32, output projection scaled so argmaxes are decisive), built the
way transformers' own tests build them: from the family's config class with small sizes.
Families whose tiny config transformers itself cannot instantiate or run are listed as skipped,
with the reason.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from specdec import SpeculativeDecoder, UnsupportedGeneration
from specdec.device.hybrid.seams import recurrent_mixers
from tests.conftest import ScriptedDrafter

PROMPT = [5, 17, 33, 8, 41, 17, 33, 9, 60, 61, 5, 17, 33]
NEW = 16
MAX_PARAMS = 20_000_000
# Small values for whichever of these attribute names a config has.
SIZES = [
    ({"hidden_size", "n_embd", "d_model", "n_embed", "embed_dim"}, 64),
    ({"num_hidden_layers", "n_layer", "num_layers", "n_layers"}, 2),
    ({"num_attention_heads", "n_head", "num_heads", "n_heads"}, 4),
    ({"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "kv_n_heads"}, 2),
    ({"head_dim", "kv_channels"}, 16),
    ({"intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size"}, 128),
    ({"moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"}, 32),
    ({"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}, 4),
    ({"num_experts_per_tok", "moe_topk", "num_experts_per_token"}, 2),
    ({"n_group", "topk_group"}, 1),
    ({"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"}, 256),
    ({"kv_lora_rank"}, 16), ({"q_lora_rank"}, 32), ({"qk_rope_head_dim"}, 8), ({"qk_nope_head_dim"}, 8),
    ({"v_head_dim"}, 16), ({"sliding_window", "attention_chunk_size"}, 8), ({"rotary_dim"}, 8),
    ({"linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"}, 16),  # linear-attention layers
    ({"linear_num_key_heads"}, 2), ({"linear_num_value_heads", "linear_num_heads"}, 4),
]
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Hybrid and state-space families whose generic tiny config does not build (no attention layer left, or
# sizes the config validates against each other): their layouts, one layer of each kind.
FAMILY_SIZES = {
    "mamba": {"state_size": 16, "expand": 2, "conv_kernel": 4, "time_step_rank": 8},
    "mamba2": {"num_heads": 8, "head_dim": 16, "expand": 2, "n_groups": 1, "state_size": 16, "chunk_size": 16},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
              "mamba_n_groups": 1, "mamba_chunk_size": 16},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 8, "mamba_d_head": 16,
                         "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
              "mamba_d_state": 16},
    "zamba2": {"hybrid_layer_ids": [1], "layers_block_type": ["mamba", "hybrid"], "mamba_headdim": 16,
               "n_mamba_heads": 8, "mamba_d_state": 16, "mamba_ngroups": 1, "chunk_size": 16, "num_mem_blocks": 1},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    # refused (mixers outside transformers' shared seams): built so that the refusal is what is tested
    "zamba": {"layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"], "num_hidden_layers": 4,
              "attn_layer_period": 2, "attn_layer_offset": 1, "attention_head_dim": 16, "n_mamba_heads": 2,
              "mamba_dt_rank": 8, "use_mamba_kernels": False},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 64},
    # MLA: every query head gets its own expanded key (as in the released configs); with fewer kv heads
    # transformers' own masked attention repeats the keys past the query heads
    **dict.fromkeys(["kimi_linear", "bailing_hybrid", "deepseek_v32", "glm_moe_dsa", "axk2"],
                    {"num_key_value_heads": 4}),
    # ... and rotary over the rope part of the head alone (head_dim is qk_rope_head_dim there)
    **dict.fromkeys(["deepseek_v3", "longcat_flash", "axk1"], {"num_key_value_heads": 4, "head_dim": 8}),
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "nemotron_h": {"mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1, "chunk_size": 16},
    "falcon_h1": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_ssm": 128, "mamba_d_state": 16,
                  "mamba_n_groups": 1, "mamba_chunk_size": 16},
}


def causal_families() -> list[str]:
    """Model types with a causal-LM class whose config is a plain decoder (no encoder, no vision)."""
    families = []
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if re.search(r"ForConditionalGeneration|Vision|Audio|Speech|Assistant", class_name):
            continue
        families.append(model_type)
    return families


def tiny_model(model_type: str, vocab_size: int = 128, logit_scale: float = 8.0):
    """A tiny random fp32 model of the family (output projection times ``logit_scale``: decisive
    argmaxes by default), its prompt and ``model.generate``'s greedy continuation, or a skip naming
    why transformers cannot build or run one."""
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if model_class is None:
        pytest.skip("the model class is not importable")
    default = AutoConfig.for_model(model_type)
    if getattr(default, "is_encoder_decoder", False) or any(
            re.search(r"vision|audio|encoder|image|speech", name) for name in (default.sub_configs or {})):
        pytest.skip("not a decoder-only text model (encoder-decoder or multimodal config)")
    values = default.to_dict()
    layers = next((values[k] for k in SIZES[1][0] if isinstance(values.get(k), int)), None)
    overrides = {}
    for names, small in SIZES:
        for name in names & set(values):
            unset_kv_heads = values[name] is None and "num_key_value_heads" in names  # None: as many as query heads
            if (isinstance(values[name], int) and not isinstance(values[name], bool)) or unset_kv_heads:
                overrides[name] = small
    for name, value in values.items():
        if "vocab_size" in name and isinstance(value, int):
            overrides[name] = vocab_size
        if isinstance(value, list) and layers and len(value) == layers and layers > 2 and name != "layer_types":
            overrides[name] = value[:2]
    if isinstance(values.get("layer_types"), list) and layers:
        kinds = list(dict.fromkeys(values["layer_types"]))  # one layer of each kind, in order
        overrides["layer_types"] = kinds if len(kinds) > 1 else kinds * 2
        for names, _ in SIZES[1:2]:
            for name in names & set(values):
                overrides[name] = len(overrides["layer_types"])
    overrides.update({k: v for k, v in TOKENS.items() if k in values})
    overrides.update(FAMILY_SIZES.get(model_type, {}))
    if "is_decoder" in values:
        overrides["is_decoder"] = True
    try:
        config = AutoConfig.for_model(model_type, **overrides)
        with torch.device("meta"):
            params = sum(p.numel() for p in model_class(config).parameters())
        if params > MAX_PARAMS:
            pytest.skip(f"the tiny config still has {params:,} parameters")
        torch.manual_seed(0)
        model = model_class(config).float().eval()
        with torch.no_grad():
            out, inp = model.get_output_embeddings(), model.get_input_embeddings()
            if out.weight.data_ptr() == inp.weight.data_ptr():  # untie: sharpen the output only
                out.weight = torch.nn.Parameter(out.weight.detach().clone())
            out.weight.mul_(logit_scale)
            prompt = torch.tensor([PROMPT]) % inp.num_embeddings
            reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
    except Exception as err:  # transformers itself cannot build or run this tiny config
        pytest.skip(f"transformers cannot build or run a tiny {model_type}: {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:120] if str(err) else ''}")
    return model, prompt, reference


class ForwardCounter:
    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.calls += 1


# Families that must be supported (not refused): the mainstream decoders.
MUST_SUPPORT = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "phi3", "olmo2",
                "starcoder2", "gpt_neox", "falcon", "cohere", "deepseek_v3", "smollm3",
                # hybrids and state-space models: trees through their recurrent seams (specdec.device.hybrid)
                "qwen3_5_text", "qwen3_next", "kimi_linear", "olmo_hybrid", "nemotron_h", "granitemoehybrid",
                "falcon_h1", "bamba", "mamba2", "jamba", "mamba", "falcon_mamba", "lfm2"}


@pytest.mark.parametrize("model_type", causal_families())
def test_every_family_is_exact_or_refused(model_type):
    model, prompt, reference = tiny_model(model_type)
    vocab = model.get_input_embeddings().num_embeddings
    # Scripted trees that are partly right (every depth, wide), then the learned drafters, adaptive and fixed.
    runs = [("mixed", 16, None), ("recycling+ngram", None, None), ("recycling+ngram", 4, None)]
    counter = ForwardCounter(model)
    for name, budget, kernel in runs:
        drafter = (ScriptedDrafter(reference[0], depth=6, corrupt=lambda step, d: (step + d) % 3 == 0, vocab_size=vocab)
                   if name == "mixed" else name)
        decoder = SpeculativeDecoder(model, drafter=drafter, tree_budget=budget, tree_kernel=kernel)
        if decoder.unsupported:
            assert model_type not in MUST_SUPPORT, decoder.unsupported
            before = counter.calls
            with pytest.raises(UnsupportedGeneration):
                decoder.generate(prompt, max_new_tokens=NEW, eos_token_id=-1)
            assert counter.calls == before  # refused before any forward
            return
        out = decoder.generate(prompt, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
        assert out.tolist() == reference.tolist(), f"{model_type}: {name}, budget {budget}, kernel {kernel}"
        if kernel is None and decoder.kernel is not None:
            runs.append(("mixed", 16, False))  # the kernel was chosen: the mask path must be exact too
    if recurrent_mixers(model):  # rows of a batch verify together, each with its own recurrent states
        second = (prompt[0, 3:] * 3 + 1) % vocab
        batch = torch.stack([prompt[0], torch.cat([prompt.new_zeros(3), second])])  # the second left-padded
        mask = torch.ones_like(batch)
        mask[1, :3] = 0
        out = SpeculativeDecoder(model, drafter="recycling+ngram", tree_budget=8).generate(
            batch, attention_mask=mask, max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
        alone = model.generate(second[None], attention_mask=torch.ones_like(second[None]), do_sample=False,
                               max_new_tokens=NEW, eos_token_id=-1, pad_token_id=0)
        assert out[0].tolist() == reference[0].tolist(), f"{model_type}: batched, row 0"
        assert out[1, batch.shape[1]:].tolist() == alone[0, second.numel():].tolist(), f"{model_type}: batched, row 1"
