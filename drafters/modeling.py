"""Calling a transformers model with an explicit cache, whatever the transformers version.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns
until its removal in 5.40); older 5.x versions only know ``past_key_values`` and silently swallow
``cache`` into ``**kwargs``. The name is therefore read from the model's own forward signature.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_keyword(forward_type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """``"cache"`` or ``"past_key_values"``: the name ``model.forward`` takes its KV cache by."""
    return _cache_keyword(type(model))


def forward_with_cache(model, cache, **kwargs):
    """``model(**kwargs)`` with ``cache`` passed under the right name and ``use_cache=True``."""
    return model(**{cache_keyword(model): cache}, use_cache=True, **kwargs)
