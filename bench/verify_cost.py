"""``specdec bench-verify``: one verify forward of an n-node tree, csrc tree kernel vs sdpa + float mask.

Both paths run the same model on the same cached prefix and the same trees, interleaved repeat by
repeat; the table gives the median milliseconds of each and their ratio.
"""

from __future__ import annotations

import statistics
import time

import click
import numpy as np
import torch

# A Llama 3.2 1B-shaped config (16 layers, GQA 32/8, head_dim 64), randomly initialised.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True)


def random_llama(dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(dtype).eval()
    return model


def best_first_tree(n: int, vocab: int, seed: int):
    """An n-node tree in Token Recycling's typical shape (best-first over the default rank prior)."""
    from trees import DEFAULT_RANK_PRIOR, TokenTree, best_first

    shape = best_first(n, DEFAULT_RANK_PRIOR)
    rng = np.random.default_rng(seed)
    return TokenTree(torch.from_numpy(rng.integers(0, vocab, size=len(shape.parents))),
                     torch.from_numpy(shape.parents))


@torch.inference_mode()
def measure(model, context: int, sizes: list[int], repeats: int, device: str) -> list[dict]:
    """Median ms per verify forward for each tree size, with and without the tree kernel."""
    from transformers import DynamicCache

    from drafters.modeling import forward_with_cache
    from specdec.attention import tree_kernel_for
    from specdec.verify import tree_forward

    kernel = tree_kernel_for(model, True)
    vocab = model.config.vocab_size
    cache = DynamicCache(config=model.config)
    prompt = torch.randint(0, vocab, (1, context), device=device)
    forward_with_cache(model, cache, input_ids=prompt)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    for n in sizes:
        tree = best_first_tree(n, vocab, seed=n)
        times: dict[str, list[float]] = {"mask": [], "kernel": []}
        for repeat in range(repeats + 1):
            for name, use in (("mask", None), ("kernel", kernel)):
                sync()
                started = time.perf_counter()
                tree_forward(model, cache, 1, tree, context, use)
                sync()
                if repeat:  # the first round warms up
                    times[name].append(1e3 * (time.perf_counter() - started))
                cache.crop(-(n + 1))
        mask_ms, kernel_ms = statistics.median(times["mask"]), statistics.median(times["kernel"])
        rows.append({"n": n, "sdpa_mask_ms": mask_ms, "kernel_ms": kernel_ms, "speedup": mask_ms / kernel_ms})
    return rows


@click.command("bench-verify")
@click.option("--model", "model_path", default=None, help="Local HF model dir or .gguf (default: SmolLM2-135M).")
@click.option("--random-llama-1b", is_flag=True, help="A randomly initialised Llama-1B-shaped model instead.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--context", type=int, default=300, show_default=True, help="Cached prefix length.")
@click.option("--sizes", default="8,16,32,64", show_default=True, help="Tree sizes n (draft nodes).")
@click.option("--repeats", type=int, default=10, show_default=True)
def bench_verify(model_path, random_llama_1b, dtype, device, context, sizes, repeats):
    """Verify-forward time: the csrc tree-attention kernel vs sdpa with a float tree mask."""
    from rich.console import Console
    from rich.table import Table

    from specdec import ops
    from specdec.models import load_default_model, load_model, resolve_dtype

    if not ops.load():
        raise click.ClickException(f"the csrc extension is {ops.status()}")
    sizes_n = [int(s) for s in sizes.split(",") if s.strip()]
    if not sizes_n or min(sizes_n) < 1 or context < 1 or repeats < 1:
        raise click.BadParameter("--sizes, --context and --repeats must be positive")
    if random_llama_1b:
        model = random_llama(resolve_dtype(dtype), device)
        label = "random Llama-1B config"
    else:
        model = (load_model(model_path, dtype=dtype) if model_path else load_default_model(dtype=dtype))[0].to(device)
        label = model_path or "SmolLM2-135M-Instruct"
    rows = measure(model, context, sizes_n, repeats, device)
    table = Table(title=f"verify forward, {label}, {dtype}, {device}, context {context}, median of {repeats}")
    for column in ("n", "sdpa + float mask (ms)", "tree kernel (ms)", "speedup"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["n"]), f"{row['sdpa_mask_ms']:.1f}", f"{row['kernel_ms']:.1f}", f"{row['speedup']:.2f}x")
    Console().print(table)
