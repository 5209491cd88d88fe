"""``specdec bench-verify``: what a verify forward of an n-node tree costs on this hardware, with the
csrc tree-attention kernel and with sdpa plus a float tree mask, and the host time a decode step
spends outside the forward.

Both attention paths run the engine's cache and verify forward (`specdec.step.verify.verify_rows`)
on the same cached prefix and the same trees, interleaved repeat by repeat (median of the repeats,
the device synchronised around each forward). A model with recurrent layers (hybrids, state-space
models) adds transformers' own forward of the same number of tokens in a row (``chain``): what its
tree pass costs against the model's own multi-token path. As in the
scheduler's T(n), the tree's upload is not timed, and the kernel runs only where specdec's
equivalence probe (`specdec.step.support.support_for`) proves it exact for the model. Costs are
reported relative to plain decoding (a one-token forward, n = 0): T(n+1 tokens) / T(1 token).
"""

from __future__ import annotations

import statistics
import time

import click
import numpy as np
import torch

PATHS = ("sdpa", "kernel", "chain")


def best_first_tree(n: int, vocab: int, seed: int):
    """An n-node tree in Token Recycling's typical shape (best-first over the default rank prior)."""
    from trees import DEFAULT_RANK_PRIOR, TokenTree, best_first

    shape = best_first(n, DEFAULT_RANK_PRIOR)
    rng = np.random.default_rng(seed)
    return TokenTree(torch.from_numpy(rng.integers(0, vocab, size=len(shape.parents))),
                     torch.from_numpy(shape.parents))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(model, context: int, sizes: list[int], repeats: int) -> list[dict]:
    """Median ms of one verify forward per tree size n after ``context`` cached positions, through
    the engine's own cache and verify forward: with the tree kernel (when the model family allows
    it) and with the model's attention plus a mask (``sdpa``). For a model with recurrent layers
    (`specdec.device.hybrid`) also ``chain``: transformers' own forward of n + 1 tokens in a row on its
    own cache (its multi-token path), the price of the same tokens without a tree."""
    import copy

    from drafters.modeling import forward_with_cache
    from specdec.device.cache import RowCache
    from specdec.device.tree import HostBuffer, RowTree, upload_rows
    from specdec.step.support import support_for
    from specdec.step.verify import prefill_row, takes_positions, verify_rows

    device = model.device
    support = support_for(model, None)
    if support.reason is not None:
        raise ValueError(f"specdec cannot verify trees with this model: {support.reason}")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prefix = torch.randint(0, vocab, (context,), device=device)
    cache = RowCache.for_model(model)
    cache.fit(1, context + max(sizes) + 2)
    prefill_row(model, cache, 0, prefix[:-1], 1)  # the last prefix token is every tree's root
    chain_cache = _hf_prefilled(model, prefix[:-1]) if cache.recurrent else None
    paths = ["sdpa"] + (["kernel"] if support.kernel is not None else [])
    paths += ["chain"] if chain_cache is not None else []
    buffer = HostBuffer(device)
    rows = []
    for n in sizes:
        tree = best_first_tree(n, vocab, seed=n)
        chain = torch.randint(0, vocab, (1, n + 1), device=device)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(repeats + 1):
            for name in paths:
                if name == "chain":
                    state = copy.deepcopy(chain_cache)  # not timed: the run below extends it
                    kwargs = ({"position_ids": torch.arange(context - 1, context + n, device=device)[None]}
                              if takes_positions(model) else {})
                else:
                    batch = upload_rows([RowTree(tree, int(prefix[-1]), length=context - 1)], [context - 1], buffer)
                _synchronize(device)  # the upload has landed: T(n) is the forward alone
                started = time.perf_counter()
                if name == "chain":
                    forward_with_cache(model, state, input_ids=chain, **kwargs)
                else:
                    verify_rows(model, cache, batch, support.kernel if name == "kernel" else None)
                _synchronize(device)
                if repeat:  # the first round warms up
                    times[name].append(1e3 * (time.perf_counter() - started))
        rows.append({"n": n} | {f"{name}_ms": statistics.median(values) for name, values in times.items()})
    for name in paths:
        base = next((row[f"{name}_ms"] for row in rows if row["n"] == 0), None)
        for row in rows:
            row[f"{name}_ratio"] = row[f"{name}_ms"] / base if base else None
    return rows


def _hf_prefilled(model, ids: torch.Tensor):
    """transformers' own cache of ``model`` after ``ids`` (``[m]``)."""
    from transformers import DynamicCache

    from drafters.modeling import forward_with_cache
    from specdec.step.verify import takes_positions

    cache = DynamicCache(config=model.config)
    kwargs = {"position_ids": torch.arange(ids.numel(), device=ids.device)[None]} if takes_positions(model) else {}
    forward_with_cache(model, cache, input_ids=ids[None], **kwargs)
    return cache


@torch.inference_mode()
def host_overhead(model, tokenizer, budgets: list[int], steps: int) -> list[dict]:
    """Per fixed tree budget: ms per decode step outside the verify forward and inside it, from
    whole generations (Token Recycling drafts; with random weights nothing is accepted)."""
    from specdec import SpeculativeDecoder
    from specdec.models.prompts import encode_chat

    prompt = encode_chat(tokenizer, [{"role": "user", "content": "Describe the water cycle in detail."}])
    rows = []
    for budget in budgets:
        decoder = SpeculativeDecoder(model, tokenizer, drafter="recycling", tree_budget=budget)
        decoder.generate(prompt, max_new_tokens=4, eos_token_id=-1)  # warm-up
        stats = decoder.generate(prompt, max_new_tokens=steps, eos_token_id=-1, return_dict_in_generate=True,
                                 ).spec_stats.as_dict()
        rows.append({"budget": budget, "host_ms": stats["host_ms_per_step"], "verify_ms": stats["verify_ms_per_step"],
                     "tree": stats["mean_tree_size"], "mat": stats["mean_accepted_tokens"]})
    return rows


@click.command("bench-verify")
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, alias, or random:smollm2-135m / random:llama-1b "
                   "(default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--context", type=int, default=300, show_default=True, help="Cached prefix length.")
@click.option("--sizes", default="0,1,2,4,8,16,32,48,64", show_default=True, help="Tree sizes n (draft nodes).")
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option("--steps", type=int, default=32, show_default=True,
              help="Decode steps per budget for the host-overhead table (0 skips it).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures.")
def bench_verify(model_path, dtype, device, context, sizes, repeats, steps, json_path):
    """Verify-forward cost T(n) relative to plain decoding (tree kernel and sdpa + mask; for models
    with recurrent layers also the model's own chain of n + 1 tokens), and the host time per decode
    step outside the forward."""
    import json

    from rich.console import Console
    from rich.table import Table

    from bench.cli import BenchError, load_target
    try:
        sizes_n = sorted({int(s) for s in sizes.split(",") if s.strip()})
    except ValueError:
        raise BenchError(f"--sizes must be a comma list of ints, got {sizes!r}") from None
    if not sizes_n or min(sizes_n) < 0 or context < 2 or repeats < 1 or steps < 0:
        raise BenchError("--sizes must be >= 0, --context >= 2 (its last token is every tree's root), --repeats >= 1, "
                         "--steps >= 0")
    model, tokenizer, torch_device = load_target(model_path, dtype, device)
    label = model_path or "SmolLM2-135M-Instruct"
    name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "CPU"
    rows = measure(model, context, sizes_n, repeats)
    console = Console(width=120)
    table = Table(title=f"verify forward of n draft nodes (+ root), {label}, {dtype}, {name}, context {context}, "
                        f"median of {repeats}")
    columns = ["n"] + [c for path in PATHS if f"{path}_ms" in rows[0] for c in (f"{path} ms", f"{path} T(n+1)/T(1)")]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        cells = [str(row["n"])]
        for path in PATHS:
            if f"{path}_ms" in row:
                ratio = row[f"{path}_ratio"]
                cells += [f"{row[f'{path}_ms']:.2f}", "-" if ratio is None else f"{ratio:.2f}"]
        table.add_row(*cells)
    console.print(table)
    overhead = host_overhead(model, tokenizer, [b for b in (0, 8, 32) if b <= max(sizes_n)], steps) if steps else []
    if overhead:
        table = Table(title=f"decode steps ({steps} per budget, recycling drafter): time outside the verify forward")
        for column in ("tree budget", "mean tree", "verify ms/step", "host ms/step"):
            table.add_column(column, justify="right")
        for row in overhead:
            table.add_row(str(row["budget"]), f"{row['tree']:.1f}", f"{row['verify_ms']:.2f}", f"{row['host_ms']:.2f}")
        console.print(table)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump({"model": label, "dtype": dtype, "device": name, "context": context, "verify": rows,
                       "host": overhead}, out, indent=2)
