"""`SpeculativeDecoder`: the step engine with ``model.generate``'s semantics on top."""

from __future__ import annotations

from specdec.api.generation import run_generate
from specdec.step.engine import Engine


class SpeculativeDecoder(Engine):
    """Speculative decoding for one HF causal LM, with drafter state kept across calls.

    Args:
        model: a transformers causal LM (on any device). The decoder's engine loop (one thread,
            started while there is work) runs every step on it: single prompts, batches, chat
            sessions and server requests alike, several sequences per forward.
        tokenizer: optional, used by callers that pass text.
        drafter: ``"auto"`` (every available drafter, merged), a registered drafter name
            (``"recycling"``, ``"ngram"``, ``"model"``), several joined by ``+`` for a hybrid
            (``"recycling+ngram"``), or a `Drafter` instance.
        tree_budget: draft nodes verified per step; ``None`` lets the `Scheduler` choose each step
            from measured costs and learned acceptance (0 = plain decoding).
        draft_model: the small causal LM used by the ``model`` drafter (same vocabulary).
        draft_head: the ``head`` drafter's trained head (a path or `drafters.HeadFile`); None: the
            one ``specdec distill`` saved for this model, if any (``auto`` then includes it).
        scheduler: a `Scheduler` to use (and share); a new one by default.
        clock: the host time source for step timings (seconds; tests inject a fake one).
        tree_kernel: run verify attention through the csrc ``tree_attention`` operator: ``None``
            (default) where the extension builds and the probe proves it exact for this model,
            ``True`` to require it, ``False`` for the model's own attention with an additive mask.
        compile: run verify forwards through ``torch.compile`` (`specdec.device.compiled`; CPU
            with the tree kernel; each of up to four graphs compiles once per process, which takes
            tens of seconds on a small CPU): faster steps once warm. Where it cannot apply, or
            compilation fails, the forward runs eager, said once in a warning.
        max_batch: the most sequences decoding together (each holds a row of the KV cache).
        max_queued: the most requests waiting for a row; `submit` refuses one more at once with
            `specdec.Overloaded` (``generate`` with a batch of prompts submits as rows free up).
        prefill_chunk: prompt tokens cached per step while other sequences are decoding, so a long
            prompt joins without stopping them for its whole prefill.
    """

    def generate(self, inputs=None, *args, **kwargs):
        """Generation with ``model.generate``'s semantics: greedy output is token-identical to
        ``do_sample=False``; ``do_sample=True`` samples exactly the target's distribution.

        Takes the arguments of `specdec.generate` except ``model``, ``drafter`` and ``draft_model``;
        the statistics of the last call are also kept in ``last_stats``.
        """
        return run_generate(self, inputs, *args, **kwargs)
