"""The ``specdec`` command line: ``generate`` and ``chat``, plus the commands other packages register
(``bench``, ``bench-chat``, ``bench-verify`` from the ``bench`` package)."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="specdec")
def main() -> None:
    """Lossless speculative decoding for Hugging Face causal LMs."""


@main.command()
@click.argument("prompt")
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, alias (gemma3-270m) or random:<shape> (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--drafter", default="auto", show_default=True, help="auto, recycling, ngram, or several joined by +.")
@click.option("--tree-budget", type=int, default=None, help="Draft nodes per verify step (default: scheduled).")
@click.option("--tp", is_flag=True, help="Shard the model across the ranks of this torchrun job (tensor parallelism).")
def generate(prompt: str, model_path: str | None, dtype: str, device: str, max_new_tokens: int, drafter: str,
             tree_budget: int | None, tp: bool) -> None:
    """Answer PROMPT (with the chat template) and print speed statistics (under ``--tp``: rank 0 prints)."""
    from specdec import SpeculativeDecoder
    from specdec.prompts import encode_chat

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    model, tokenizer = _load(model_path, dtype, device, tp)
    try:
        options = {} if tree_budget is None else {"tree_budget": tree_budget}
        decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter, **options)
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        out = decoder.generate(prompt_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from None
    stats = out.spec_stats
    if tp and _rank() != 0:
        return
    click.echo(tokenizer.decode(out.sequences[0, prompt_ids.shape[1] :], skip_special_tokens=True))
    seconds = stats.prefill_seconds + stats.decode_seconds
    click.echo(
        f"\n[{stats.new_tokens} tokens in {seconds:.2f} s: {stats.new_tokens / max(seconds, 1e-9):.1f} tok/s, "
        f"{stats.steps} verify steps, mean accepted tokens per step {stats.mean_accepted_tokens:.2f}]",
        err=True,
    )


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _load(model_path: str | None, dtype: str, device: str, tp: bool = False):
    """The model and tokenizer for a command; a bad ``--model``, ``--device`` or ``--tp`` is a usage
    error (exit status 2)."""
    import torch

    from specdec.distributed import TensorParallelError
    from specdec.models import ModelLoadError, load_default_model, load_model

    try:
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise click.UsageError("--device cuda: no CUDA device is available here")
        if tp and torch_device.type == "cuda":
            import os

            torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        options = {"dtype": dtype, "device": torch_device, "tensor_parallel": tp}
        return load_model(model_path, **options) if model_path else load_default_model(**options)
    except (ModelLoadError, TensorParallelError, RuntimeError) as err:
        raise click.UsageError(str(err)) from None


CHAT_HELP = "commands: /reset (new conversation), /save PATH, /load PATH, /quit (or end of input)"


@main.command()
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, alias (gemma3-270m) or random:<shape> (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--drafter", default="auto", show_default=True, help="auto, recycling, ngram, or several joined by +.")
@click.option("--temperature", type=float, default=None, help="Sample at this temperature (default: greedy).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), default=None,
              help="Drafter + scheduler state file: loaded if it exists, saved on exit.")
def chat(model_path, dtype, device, system_prompt, max_new_tokens, drafter, temperature, state_path) -> None:
    """Interactive chat: streams each answer, then prints tokens/s and mean accepted tokens per step."""
    import os
    import sys

    from specdec import ChatSession, SpeculativeDecoder

    try:  # line editing when available; plain stdin otherwise (pipes, other programs)
        import readline  # noqa: F401
    except ImportError:
        pass
    model, tokenizer = _load(model_path, dtype, device)
    try:
        decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter)
    except (ValueError, TypeError) as err:
        raise click.UsageError(str(err)) from None
    if state_path and os.path.exists(state_path):
        try:
            decoder.load(state_path)
        except (OSError, ValueError) as err:
            click.echo(f"[--state {state_path} not loaded: {err}; starting with fresh drafter state, and "
                       "leaving that file untouched on exit]", err=True)
            state_path = None
    session = ChatSession(decoder, system_prompt)
    options = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        options.update(do_sample=True, temperature=temperature)
    click.echo(f"specdec chat ({CHAT_HELP})", err=True)
    while True:
        click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            click.echo("[new conversation]", err=True)
            continue
        if line.startswith(("/save", "/load")):
            command, _, path = line.partition(" ")
            if not path.strip():
                click.echo(f"[{command} needs a file name]", err=True)
                continue
            try:
                if command == "/save":
                    session.save(path.strip())
                else:
                    session = ChatSession.load(path.strip(), decoder)
                click.echo(f"[{command[1:]}d {path.strip()}]", err=True)
            except (OSError, ValueError) as err:
                click.echo(f"[{command} failed: {err}]", err=True)
            continue
        if line.startswith("/"):
            click.echo(f"[unknown command; {CHAT_HELP}]", err=True)
            continue
        answer = session.stream(line, **options)
        try:
            for chunk in answer:
                click.echo(chunk, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            answer.close()
            click.echo(" [stopped]", nl=False)
        stats = session.last_stats
        seconds = stats.prefill_seconds + stats.decode_seconds
        click.echo()
        click.echo(f"[{stats.new_tokens} tokens, {stats.new_tokens / max(seconds, 1e-9):.1f} tok/s, "
                   f"mean accepted tokens per step {stats.mean_accepted_tokens:.2f}, "
                   f"prefilled {stats.prefilled_tokens} (reused {stats.reused_prefix_tokens})]", err=True)
    if state_path:
        decoder.save(state_path)


def _add_plugin_commands() -> None:
    """Commands that other packages register under the entry-point group ``specdec.commands``
    (the ``bench`` package registers ``bench``, ``bench-chat`` and ``bench-verify``); specdec
    itself imports none of them."""
    import importlib.metadata

    for entry in importlib.metadata.entry_points(group="specdec.commands"):
        if entry.name not in main.commands:
            main.add_command(entry.load(), entry.name)


_add_plugin_commands()


if __name__ == "__main__":
    main()
