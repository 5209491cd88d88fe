"""The ``specdec`` command line: ``generate``, ``chat``, ``distill`` and ``serve``, plus the commands
other packages register (``bench``, ``bench-chat``, ``bench-verify`` from the ``bench`` package)."""

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
@click.option("--drafter", default="auto", show_default=True,
              help="auto, recycling, ngram, head, or several joined by +.")
@click.option("--tree-budget", type=int, default=None, help="Draft nodes per verify step (default: scheduled).")
@click.option("--tp", is_flag=True, help="Shard the model across the ranks of this torchrun job (tensor parallelism).")
@click.option("--head", "head_path", type=click.Path(dir_okay=False), default=None,
              help="Trained draft head (default: the one `specdec distill` saved for the model, if any).")
def generate(prompt: str, model_path: str | None, dtype: str, device: str, max_new_tokens: int, drafter: str,
             tree_budget: int | None, tp: bool, head_path: str | None) -> None:
    """Answer PROMPT (with the chat template) and print speed statistics (under ``--tp``: rank 0 prints)."""
    from specdec import SpeculativeDecoder
    from specdec.models.prompts import encode_chat

    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    model, tokenizer = _load(model_path, dtype, device, tp)
    try:
        options = {} if tree_budget is None else {"tree_budget": tree_budget}
        decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter, draft_head=head_path, **options)
        prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        out = decoder.generate(prompt_ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    except (ValueError, TypeError, FileNotFoundError) as err:
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

    from specdec.models.distributed import TensorParallelError
    from specdec.models.loading import ModelLoadError, load_default_model, load_model

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


@main.command()
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, or alias (default: SmolLM2-135M-Instruct).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Head file to write (default: the model's cache entry, where `auto` finds it).")
@click.option("--minutes", type=float, default=30.0, show_default=True, help="Time budget, data included.")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(dir_okay=False),
              help="Spec-Bench JSONL or one prompt per line (repeatable); read, never copied.")
@click.option("--self-prompts", type=int, default=256, show_default=True,
              help="Prompts the model writes for itself (Magpie-style).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True,
              help="The target's dtype while distilling (labels at prefill speed; the head serves any dtype).")
@click.option("--text-chars", type=int, default=6_000_000, show_default=True,
              help="Characters of documentation shipped with installed packages to label (0: replies only).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Prompts answered together.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Reply length per prompt.")
@click.option("--max-prompt-tokens", type=int, default=1024, show_default=True, help="Longer prompts are skipped.")
@click.option("--seed", type=int, default=0, show_default=True)
def distill(model_path, out_path, minutes, prompt_files, self_prompts, dtype, text_chars, batch_size, max_new_tokens,
            max_prompt_tokens, seed) -> None:
    """Train a draft head for the model by self-distillation (resumable: rerun to continue)."""
    import resource
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from drafters import default_head_path
    from specdec.distill import DistillError, read_prompts
    from specdec.distill import distill as run_distill

    if not minutes > 0 or min(batch_size, max_new_tokens, max_prompt_tokens) < 1 or min(self_prompts, text_chars) < 0:
        raise click.UsageError("--minutes must be > 0, --batch-size, --max-new-tokens and --max-prompt-tokens >= 1, "
                               "--self-prompts and --text-chars >= 0")
    try:
        prompts = [p for f in prompt_files for p in read_prompts(f)]
    except DistillError as err:
        raise click.UsageError(str(err)) from None
    model, tokenizer = _load(model_path, dtype, "cpu")
    out = Path(out_path) if out_path else default_head_path(model)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=_stderr_console()) as bar:
        tasks = {"data": bar.add_task("replies + labels", total=1.0), "train": bar.add_task("training", total=1.0)}
        try:
            report = run_distill(model, tokenizer, out, minutes, prompts, self_prompts, batch_size, max_new_tokens,
                                 max_prompt_tokens, text_chars=text_chars, seed=seed,
                                 progress=lambda phase, done: bar.update(tasks[phase], completed=done))
        except DistillError as err:
            raise click.UsageError(str(err)) from None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = report.held_out
    click.echo(f"head saved to {out} ({report.file_mb:.1f} MB): {report.tokens} labelled tokens "
               f"({report.reply_tokens} of the model's replies to {report.prompts} prompts, {report.text_tokens} of "
               f"text) in {report.data_seconds / 60:.1f} min, {report.train_steps} training steps in "
               f"{report.train_seconds / 60:.1f} min, readout {report.readout_size} tokens; held-out per depth: top-1 "
               f"{held.get('top1')}, chain {held.get('chain')}; peak memory {peak_mb:.0f} MB")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


CHAT_HELP = "commands: /reset (new conversation), /save PATH, /load PATH, /quit (or end of input)"


@main.command()
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, alias (gemma3-270m) or random:<shape> (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--drafter", default="auto", show_default=True,
              help="auto, recycling, ngram, head, or several joined by +.")
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
    except (ValueError, TypeError, FileNotFoundError) as err:
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
        def show(chunk: str) -> None:
            click.echo(chunk, nl=False)
            sys.stdout.flush()

        try:  # the steps run on this thread (the one that loaded the model): one OpenMP team
            session.send(line, on_text=show, **options)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        stats = session.last_stats
        seconds = stats.prefill_seconds + stats.decode_seconds
        click.echo()
        click.echo(f"[{stats.new_tokens} tokens, {stats.new_tokens / max(seconds, 1e-9):.1f} tok/s, "
                   f"mean accepted tokens per step {stats.mean_accepted_tokens:.2f}, "
                   f"prefilled {stats.prefilled_tokens} (reused {stats.reused_prefix_tokens})]", err=True)
    if state_path:
        decoder.save(state_path)


@main.command()
@click.option("--model", "model_path", default=None,
              help="Local HF model dir, .gguf, alias (gemma3-270m) or random:<shape> (default: SmolLM2-135M).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--drafter", default="auto", show_default=True,
              help="auto, recycling, ngram, head, or several joined by +.")
@click.option("--tree-budget", type=int, default=None, help="Draft nodes per verify step (default: scheduled).")
@click.option("--api-key", envvar="SPECDEC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 requests (default: $SPECDEC_API_KEY, else none).")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=2048, show_default=True,
              help="The largest max_tokens a request may ask for (and the length of one that sets none).")
@click.option("--served-model-name", default=None,
              help="The model name clients send (default: the model's directory name, or SmolLM2-135M-Instruct).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (each holds a row of the KV cache).")
@click.option("--max-queued", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests waiting for a row; more are refused at once with 429 and Retry-After.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="The largest request body (413 above).")
@click.option("--max-messages", type=click.IntRange(min=1), default=256, show_default=True,
              help="The most messages of a chat request.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="The longest prompt after the chat template.")
@click.option("--compile", "compile_step", is_flag=True,
              help="Verify through torch.compile: faster steps once the first requests have compiled them.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds a request may take, queueing included.")
def serve(model_path, dtype, device, host, port, drafter, tree_budget, api_key, max_tokens_limit,
          served_model_name, max_batch, max_queued, max_body_bytes, max_messages, max_prompt_tokens,
          request_timeout, compile_step) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions
    (streamed or not), /v1/models, /health and /metrics; concurrent requests are batched. The server
    listens at once and answers 503 until the model has loaded."""
    import threading

    import uvicorn

    from specdec import SpeculativeDecoder
    from specdec.serving.limits import ServerLimits
    from specdec.serving.server import build_app

    name = served_model_name or _served_name(model_path)
    try:
        limits = ServerLimits(max_body_bytes, max_messages, max_prompt_tokens, request_timeout)
        app = build_app(None, name, api_key=api_key, max_tokens_limit=max_tokens_limit, limits=limits)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    failures: list[click.ClickException] = []

    def load() -> None:
        try:
            model, tokenizer = _load(model_path, dtype, device)
            options = {} if tree_budget is None else {"tree_budget": tree_budget}
            app.state.served.set(SpeculativeDecoder(model, tokenizer, drafter=drafter, max_batch=max_batch,
                                                    max_queued=max_queued, compile=compile_step, **options))
            click.echo(f"specdec serve: {name} loaded, ready", err=True)
        except click.ClickException as err:
            failures.append(err)
            server.should_exit = True
        except (ValueError, TypeError, FileNotFoundError) as err:
            failures.append(click.UsageError(str(err)))
            server.should_exit = True
        except Exception as err:  # no ready server without a model: report and stop
            failures.append(click.ClickException(f"loading the model failed: {type(err).__name__}: {err}"))
            server.should_exit = True

    click.echo(f"specdec serve: {name} at http://{host}:{port}/v1 (OpenAI API"
               f"{', API key required' if api_key else ''}; loading the model, 503 until ready; Ctrl-C stops)",
               err=True)
    threading.Thread(target=load, name="specdec-load", daemon=True).start()
    server.run()
    if failures:
        raise failures[0]


def _served_name(model_path: str | None) -> str:
    """The default ``--served-model-name``: the model's directory (or file) name."""
    from pathlib import Path

    from specdec.models.loading import DEFAULT_MODEL_NAME

    if not model_path:
        return DEFAULT_MODEL_NAME
    path = Path(model_path)
    return path.stem if path.suffix == ".gguf" else path.name


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
