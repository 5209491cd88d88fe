"""Turning chat messages into prompt token ids."""

from __future__ import annotations

import torch


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> torch.Tensor:
    """``[1, L]`` prompt ids for ``messages`` (``{"role", "content"}`` dicts) ending with a user turn;
    an assistant's earlier answer may be empty (a model that ended its answer at once).

    Uses the tokenizer's chat template with the generation prompt; a tokenizer without a template
    gets the contents joined by blank lines as a plain completion prompt.
    """
    if not messages or not all(isinstance(m.get("content"), str) for m in messages) \
            or not all(m["content"] or m.get("role") == "assistant" for m in messages):
        raise ValueError("messages must be a non-empty list of messages with non-empty content "
                         "(an assistant's answer may be empty)")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    else:
        ids = tokenizer("\n\n".join(m["content"] for m in messages), return_tensors="pt")["input_ids"]
    return ids.to(torch.long)
