"""What a constrained generation must produce: a JSON schema, any JSON object, a regular expression
or a Lark grammar, compiled once by llguidance into the grammar its matchers run.

Why llguidance (over xgrammar and outlines-core, all three on PyPI): a tree step needs the token mask
at every node *given that node's own path*, so the matcher must step forward and back cheaply.
llguidance's `LLMatcher` consumes a token, computes a mask (about 25 us for a 49k vocabulary here)
and rolls back one token without copying state; it computes the tokens a grammar forces
(`compute_ff_tokens`, the grammar drafter's proposals); it compiles a JSON schema in well under a
millisecond (no per-schema vocabulary index, which outlines-core builds ahead and which costs seconds
for large schemas); it covers JSON schema, regular expressions and Lark context-free grammars; it is
a self-contained Rust wheel with no torch pin (xgrammar requires its own torch); and it is
maintained by Microsoft's guidance team and used by vLLM, SGLang and llama.cpp.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import llguidance

# How JSON is laid out between tokens of structure: one space after ':' and ',' and nowhere else,
# as json.dumps writes it. Fixed layout makes every separator a forced token (the grammar drafter's
# free nodes) and keeps answers short. A schema's own "x-guidance" options win over these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, pattern or grammar larger than this is refused
KINDS = ("json_schema", "json_object", "regex", "grammar")


class ConstraintError(ValueError):
    """A constraint that cannot be compiled: ``argument`` names what was given, ``reason`` says why."""

    def __init__(self, argument: str, reason: str) -> None:
        super().__init__(f"{argument}: {reason}")
        self.argument = argument
        self.reason = reason


@dataclass(frozen=True)
class Constraint:
    """A compiled output constraint (build one with `json_schema`, `json_object`, `regex`, `grammar`
    or `from_response_format`).

    Attributes:
        kind: one of ``"json_schema"``, ``"json_object"``, ``"regex"``, ``"grammar"``.
        source: what was given (the schema as JSON text, the pattern or the Lark text).
        grammar: llguidance's compiled grammar text (what its matchers run).
    """

    kind: str
    source: str
    grammar: str

    @classmethod
    def json_schema(cls, schema: dict | str, argument: str = "constraint") -> Constraint:
        """Output that is one JSON value valid against ``schema`` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ConstraintError(argument, f"the schema is not valid JSON ({err})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(argument, f"a JSON schema must be an object, got {type(schema).__name__}")
        text = json.dumps(schema)
        _check_size(argument, text)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as err:
            raise ConstraintError(argument, f"unsupported JSON schema: {err}") from None
        return cls("json_schema", text, _validated(argument, grammar))

    @classmethod
    def json_object(cls, argument: str = "constraint") -> Constraint:
        """Output that is any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return dataclasses.replace(cls.json_schema({"type": "object"}, argument), kind="json_object", source="")

    @classmethod
    def regex(cls, pattern: str, argument: str = "constraint") -> Constraint:
        """Output that matches ``pattern`` (a regular expression, anchored at both ends)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError(argument, "a regular expression must be a non-empty string")
        _check_size(argument, pattern)
        return cls("regex", pattern, _validated(argument, llguidance.LLMatcher.grammar_from_regex(pattern)))

    @classmethod
    def grammar(cls, lark: str, argument: str = "constraint") -> Constraint:
        """Output that the context-free grammar ``lark`` (Lark syntax, start rule ``start``) derives."""
        if not isinstance(lark, str) or not lark.strip():
            raise ConstraintError(argument, "a grammar must be a non-empty Lark text")
        _check_size(argument, lark)
        return cls("grammar", lark, _validated(argument, llguidance.LLMatcher.grammar_from_lark(lark)))

    @classmethod
    def from_response_format(cls, response_format, argument: str = "response_format") -> Constraint | None:
        """The constraint of an OpenAI ``response_format``: ``{"type": "text"}`` (None: unconstrained),
        ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name": ..., "schema":
        {...}}}``; specdec also takes ``{"type": "regex", "regex": ...}`` and ``{"type": "grammar",
        "grammar": ...}`` (Lark)."""
        if isinstance(response_format, Constraint):
            return response_format
        if not isinstance(response_format, dict):
            raise ConstraintError(argument, f"must be an object with a 'type', got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object(argument)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise ConstraintError(f"{argument}.json_schema", "must be an object holding 'schema' (and a 'name')")
            return cls.json_schema(spec["schema"], f"{argument}.json_schema.schema")
        if kind == "regex":
            return cls.regex(response_format.get("regex"), f"{argument}.regex")
        if kind == "grammar":
            return cls.grammar(response_format.get("grammar"), f"{argument}.grammar")
        raise ConstraintError(f"{argument}.type",
                              f"unknown type {kind!r}: use one of 'text', {', '.join(map(repr, KINDS))}")


def _check_size(argument: str, text: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ConstraintError(argument, f"{len(text)} characters, above the limit of {MAX_GRAMMAR_CHARS}")


def _validated(argument: str, grammar: str) -> str:
    """``grammar`` once llguidance accepts it (its message names the problem otherwise)."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise ConstraintError(argument, messages[0])
    return grammar
