"""Text to distil on that is already on this machine: documentation shipped with installed packages.

Chat replies are mostly explanations in prose and markdown, often with code. The nearest text a
fresh machine holds without a download is the same kind of writing about software:

- the long descriptions (README files) of the installed distributions (markdown, the closest:
  an overview, lists, examples);
- the Python reference topics of ``pydoc_data`` (explanatory prose with examples);
- docstrings of the standard library and installed packages (explanations of one thing each).

Each text is used twice. As a chat turn to teacher-force: a user request naming the subject, the
text as the assistant's reply, cut into pieces of at most `PIECE_TOKENS` tokens (the target's soft
labels on it are what the target would say there). And as material for requests the target
answers itself (`task_prompts`: summarise, explain, translate, list, ...): measured, a head trained
on the text alone agrees with the target on its own replies far less than on held-out text (22 %
against 52 % at depth 1), so the target's replies, though slow to generate, come first.
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


TASKS = (
    "Summarize the following text in two or three sentences.\n\n{excerpt}",
    "Explain the following to a beginner, with an example.\n\n{excerpt}",
    "Translate the following text into {language}:\n\n{sentence}",
    "List the key points of this text as bullet points.\n\n{excerpt}",
    "{request}",
    "Write two questions a reader might ask about this text, and answer them.\n\n{excerpt}",
    "Rewrite the following more clearly and concisely.\n\n{sentence}",
    "{request} Keep it short.",
)
LANGUAGES = ("French", "German", "Spanish", "Italian")
EXCERPT_CHARS = 700
SENTENCE_CHARS = 240


def task_prompts(texts: list[Text], count: int) -> list[str]:
    """``count`` chat requests built from ``texts`` (summarise, explain, translate, list, ask...,
    the Spec-Bench kinds of task), for the target to answer: its replies are the closest data."""
    prompts = []
    for i, text in enumerate(texts[:count]):
        excerpt = text.reply[:EXCERPT_CHARS].rsplit(" ", 1)[0] if len(text.reply) > EXCERPT_CHARS else text.reply
        sentence = text.reply[:SENTENCE_CHARS].rsplit(" ", 1)[0]
        prompts.append(TASKS[i % len(TASKS)].format(excerpt=excerpt, sentence=sentence, request=text.request,
                                                    language=LANGUAGES[(i // len(TASKS)) % len(LANGUAGES)]))
    return prompts
