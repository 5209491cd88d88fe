"""Text to distil on that is already on this machine: documentation shipped with installed packages.

Chat replies are mostly explanations in prose and markdown, often with code. The nearest text a
fresh machine holds without a download is the same kind of writing about software:

- the long descriptions (README files) of the installed distributions (markdown, the closest:
  an overview, lists, examples);
- the Python reference topics of ``pydoc_data`` (explanatory prose with examples);
- docstrings of the standard library and installed packages (explanations of one thing each).

Each text becomes a chat turn: a user request naming the subject, the text as the assistant's
reply, cut into pieces of at most `PIECE_TOKENS` tokens. The target's soft labels on it are what
the target would say there, so the text's own authorship does not matter.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MIN_CHARS = 300  # shorter texts teach little
PIECE_TOKENS = 256  # reply tokens per sequence


@dataclass(frozen=True)
class Text:
    """One chat turn to teacher-force: the user's ``request`` and the ``reply``, from ``source``."""

    request: str
    reply: str
    source: str


def readme_texts() -> list[Text]:
    """The long descriptions of installed distributions."""
    texts = []
    for dist in metadata.distributions():
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        name = dist.metadata.get("Name")
        if isinstance(body, str) and name and len(body.strip()) >= MIN_CHARS:
            texts.append(Text(f"Tell me about the Python package {name}.", body.strip(), "readme"))
    return texts


def reference_texts() -> list[Text]:
    """The Python language reference topics of ``pydoc_data``."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [Text(f"Explain {name} in Python.", body.strip(), "reference")
            for name, body in sorted(topics.items()) if len(body.strip()) >= MIN_CHARS]


def docstring_texts(root: Path, package: str, limit_chars: int) -> list[Text]:
    """Docstrings (modules, classes, functions) of the ``.py`` files under ``root``, up to
    ``limit_chars`` characters in all."""
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if total >= limit_chars or "site-packages" in parts or any(part.startswith("test") for part in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        module = f"{package}.{module}" if package else module
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                texts.append(Text(f"What does `{name}` do?", doc, "docstring"))
                total += len(doc)
    return texts


def packaged_texts(limit_chars: int, seed: int = 0) -> list[Text]:
    """READMEs, reference topics and docstrings (standard library first, then installed
    packages) up to about ``limit_chars`` characters, shuffled (a budget that ends early still
    samples every source)."""
    texts = readme_texts() + reference_texts()
    total = sum(len(t.reply) for t in texts)
    roots = [(Path(sysconfig.get_paths()["stdlib"]), "")]
    site = Path(sysconfig.get_paths()["purelib"])
    roots += [(site / name, name) for name in ("transformers", "torch", "numpy", "click", "rich", "fastapi")]
    for root, package in roots:
        if total >= limit_chars:
            break
        if root.is_dir():
            found = docstring_texts(root, package, limit_chars - total)
            texts += found
            total += sum(len(t.reply) for t in found)
    random.Random(seed).shuffle(texts)
    return texts
