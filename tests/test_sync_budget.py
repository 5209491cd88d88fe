"""The step's sync budget: at most one blocking read of model-computed data per decode step.

The target's logits come back as `Tracked`, a tensor subclass that every op derived from them
propagates (argmax, top-k, processors, acceptance, the packed outcome). Each host read of a tracked
tensor (``item``, ``tolist``, ``numpy``, ``cpu``, ``__array__``, ``__bool__``, ``__int__``,
``__float__``, ``__index__``, ``to("cpu")``) made while a decode step runs is recorded with the
code that made it. On a GPU each of these is a blocking device-to-host transfer; on this CPU the
count is the same, because the code paths are the same. Host-born data (a drafter's tree) is
never tracked.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from specdec import SpeculativeDecoder
from specdec.step.step import Step
from tests.conftest import tiny_llama, untrained_head

ROOT = Path(__file__).resolve().parent.parent
READS = {"item", "tolist", "numpy", "cpu", "__array__", "__bool__", "__int__", "__float__", "__index__"}


class Tracked(torch.Tensor):
    """A tensor whose host reads are recorded (while ``Tracked.active``)."""

    active = False
    reads: list[tuple[str, str]] = []
    batch_sizes: list[int] = []  # rows of each decode step

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu") for a in list(args[1:]) +
            [kwargs.get("device")] if a is not None)
        if cls.active and (name in READS or to_host):
            cls.reads.append((name, _caller()))
        return super().__torch_function__(func, types, args, kwargs)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this file (who asked for the read)."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "?"


@pytest.fixture
def tracked_model(monkeypatch):
    model = tiny_llama(seed=6)

    handle = model.register_forward_hook(lambda module, args, output: _tracked_logits(output))
    step = Step.__call__

    def counted_step(self, sequences):  # reads count only inside decode steps
        Tracked.active = True
        try:
            return step(self, sequences)
        finally:
            Tracked.active = False
            Tracked.batch_sizes.append(len(sequences))

    monkeypatch.setattr(Step, "__call__", counted_step)
    Tracked.reads, Tracked.batch_sizes = [], []
    yield model
    handle.remove()


PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 9, 5, 6, 7]])
MODES = {
    "greedy": {"do_sample": False},
    "greedy+processors": {"do_sample": False, "repetition_penalty": 1.2, "no_repeat_ngram_size": 0},
    "sampled": {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "generator": 3},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("drafter", ["recycling", "ngram", "model", "auto"])
def test_at_most_one_read_per_step(tracked_model, drafter, mode):
    draft_model = tiny_llama(seed=9) if drafter == "model" else None  # its own outputs are not tracked
    for budget in (None, 12):
        decoder = SpeculativeDecoder(tracked_model, drafter=drafter, draft_model=draft_model, tree_budget=budget)
        Tracked.reads = []
        out = decoder.generate(PROMPT, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True,
                               **MODES[mode])
        steps = out.spec_stats.steps
        assert steps >= 5 and out.spec_stats.drafted_tokens > 0  # trees were really verified
        sites = sorted({site for _, site in Tracked.reads})
        assert len(Tracked.reads) <= steps, f"{len(Tracked.reads)} reads in {steps} steps at {sites}"
        assert all(site.startswith("accept.py") for site in sites), sites  # the packed outcome only


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("drafter", ["recycling", "ngram", "model", "auto"])
def test_one_read_per_batched_step_for_the_whole_batch(tracked_model, drafter, mode):
    """A batch of three prompts: still at most one read per batched step, whatever the batch size."""
    batch_sizes = Tracked.batch_sizes
    draft_model = tiny_llama(seed=9) if drafter == "model" else None
    prompts = torch.cat([PROMPT, PROMPT.flip(1), PROMPT.roll(3, 1)])  # [3, L]
    decoder = SpeculativeDecoder(tracked_model, drafter=drafter, draft_model=draft_model)
    Tracked.reads = []
    out = decoder.generate(prompts, max_new_tokens=30, eos_token_id=-1, return_dict_in_generate=True, **MODES[mode])
    assert len(batch_sizes) >= 5 and max(batch_sizes) == 3  # the rows really were verified together
    assert sum(stats.drafted_tokens for stats in out.spec_stats) > 0
    sites = sorted({site for _, site in Tracked.reads})
    assert len(Tracked.reads) <= len(batch_sizes), f"{len(Tracked.reads)} reads in {len(batch_sizes)} steps at {sites}"
    assert all(site.startswith("accept.py") for site in sites), sites


def test_the_counter_sees_reads(tracked_model):
    """The instrument itself: a read of derived data inside a step is counted (a control)."""
    decoder = SpeculativeDecoder(tracked_model, drafter="recycling", tree_budget=4)
    original = decoder.loop.step._topk

    def topk_with_a_read(logits):
        float(logits.max())  # an extra blocking read
        return original(logits)

    decoder.loop.step._topk = topk_with_a_read
    out = decoder.generate(PROMPT, max_new_tokens=10, eos_token_id=-1, return_dict_in_generate=True)
    assert len(Tracked.reads) == 2 * out.spec_stats.steps


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("drafter", ["auto", "head"])  # alone and sampled, the head draws its tree
def test_a_head_adds_at_most_its_tree_read(tracked_model, mode, drafter):
    """The head drafter grows its tree on the device from the target's features (tracked too: they
    are what the LM head reads) and brings it to the host in one copy: at most two reads a step."""
    handle = tracked_model.lm_head.register_forward_pre_hook(lambda module, args: (args[0].as_subclass(Tracked),))
    try:
        decoder = SpeculativeDecoder(tracked_model, drafter=drafter, draft_head=untrained_head(tracked_model),
                                     tree_budget=12)
        Tracked.reads = []
        out = decoder.generate(PROMPT, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True,
                               **MODES[mode])
    finally:
        handle.remove()
    steps = out.spec_stats.steps
    assert steps >= 5 and out.spec_stats.per_drafter["head"]["proposed"] > 0
    sites = sorted({site for _, site in Tracked.reads})
    assert len(Tracked.reads) <= 2 * steps, f"{len(Tracked.reads)} reads in {steps} steps at {sites}"
    proposal = "drawing.py" if drafter == "head" and mode == "sampled" else "head.py"  # a drawn tree: the plan reads
    assert {site.partition(":")[0] for site in sites} == {"accept.py", proposal}, sites


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("budget", [None, 12])
def test_a_draft_model_adds_at_most_its_tree_read(tracked_model, mode, budget):
    """The model drafter grows its tree on the device (greedy: a beam; sampling: drawn children)
    from its own model's logits, tracked here too, and reads the tree once: at most two reads a
    step, one of them in drafters/model.py."""
    draft_model = tiny_llama(seed=9)
    handle = draft_model.register_forward_hook(lambda module, args, output: _tracked_logits(output))
    try:
        decoder = SpeculativeDecoder(tracked_model, drafter="model", draft_model=draft_model, tree_budget=budget)
        Tracked.reads = []
        out = decoder.generate(PROMPT, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True,
                               **MODES[mode])
    finally:
        handle.remove()
    steps = out.spec_stats.steps
    assert steps >= 5 and out.spec_stats.drafted_tokens > 0
    sites = sorted({site for _, site in Tracked.reads})
    proposal = "drawing.py" if mode == "sampled" else "model.py"  # a drawn tree is read by its plan
    proposal_reads = [site for _, site in Tracked.reads if site.startswith(proposal)]
    assert len(Tracked.reads) <= 2 * steps, f"{len(Tracked.reads)} reads in {steps} steps at {sites}"
    assert 0 < len(proposal_reads) <= steps, sites
    assert {site.partition(":")[0] for site in sites} == {"accept.py", proposal}, sites


def _tracked_logits(output):
    output.logits = output.logits.as_subclass(Tracked)
    return output
