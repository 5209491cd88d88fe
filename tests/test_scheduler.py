"""The acceptance-rate scheduler: pure, monotone, bounded, and never changes output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import Scheduler, SpeculativeDecoder
from specdec.scheduler import SIZE_BUCKETS, CostModel
from tests.conftest import hf_greedy, tiny_llama


def cost(size: int, slope: float, base: float = 0.03) -> float:
    return base * (1 + slope * size)


def replay(history, slope=0.03, explore_every=1000):
    """Feed a scheduler a history of (size, accepted) steps at fixed values; return its choices."""
    scheduler = Scheduler(explore_every=explore_every)
    values = np.full(48, 0.9)
    choices = []
    for size, accepted in history:
        choices.append(scheduler.choose_size(values, 300))
        scheduler.record(size, 300, cost(size, slope), 0.001, float(values[:size].sum()), accepted)
    return scheduler, choices


def test_decisions_are_a_pure_function_of_history():
    rng = np.random.default_rng(0)
    history = [(int(s), int(rng.integers(0, s + 1))) for s in rng.choice(SIZE_BUCKETS, 60)]
    _, a = replay(history)
    _, b = replay(history)
    assert a == b


def test_all_accepted_history_grows_the_tree():
    sizes = [b for b in SIZE_BUCKETS if b <= 48]
    scheduler, _ = replay([(s, s) for s in sizes * 3])
    assert scheduler.choose_size(np.full(48, 0.9), 300) >= 32


def test_all_rejected_history_shrinks_to_zero():
    sizes = [b for b in SIZE_BUCKETS if b <= 48]
    scheduler, _ = replay([(s, 0) for s in sizes * 4])
    assert scheduler.calibration < 0.05
    assert scheduler.choose_size(np.full(48, 0.9), 300) == 0


def test_exploration_is_bounded():
    scheduler = Scheduler(explore_every=4)
    for size in SIZE_BUCKETS[:10] * 3:
        scheduler.record(size, 300, cost(size, 0.03), 0.001, 4.0, 0)
    choices = [scheduler.choose_size(np.full(48, 0.9), 300) for _ in range(16)]
    explored = [c for c in choices if c != 0]
    assert explored == [1, 1]  # every 4th decision looks one bucket up, then down (none below 0)


@pytest.mark.parametrize("slope, low, high", [(0.5, 0, 4), (0.001, 24, 48)])
def test_cost_slope_sets_tree_size(slope, low, high):
    scheduler = Scheduler(explore_every=1000)
    for size in SIZE_BUCKETS[:-1]:
        scheduler.record(size, 300, cost(size, slope), 0.001, 1.0, 1)  # calibration ~1
    values = 0.8 ** np.arange(1, 49)
    assert low <= scheduler.choose_size(values, 300) <= high


def test_cost_model_interpolates_and_scales_with_context():
    model = CostModel()
    model.record(0, 0, 0.02)
    model.record(16, 0, 0.04)
    curve = model.curve(0)
    assert curve[8] == pytest.approx(0.03)
    assert curve[32] > curve[16]
    assert model.curve(2048)[8] == pytest.approx(0.06)


def test_bad_scheduler_arguments():
    with pytest.raises(ValueError, match="max_budget"):
        Scheduler(max_budget=1000)
    with pytest.raises(ValueError, match="explore_every"):
        Scheduler(explore_every=0)


class FakeClock:
    """Time that only moves when the fake model computes: ``cost(query tokens)`` per forward."""

    def __init__(self, slope: float) -> None:
        self.now = 0.0
        self.slope = slope

    def __call__(self) -> float:
        return self.now

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.now += cost(ids.shape[1] - 1, self.slope)


@pytest.mark.parametrize("slope, small", [(2.0, True), (0.0005, False)])
def test_synthetic_cost_steers_the_tree_size(slope, small):
    """A fake model whose verify cost rises steeply with n gets small trees; a flat one large trees."""
    model = tiny_llama(seed=2)
    clock = FakeClock(slope)
    handle = model.register_forward_pre_hook(clock.hook, with_kwargs=True)
    try:
        prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
        ref = hf_greedy(model, prompt, 60)
        decoder = SpeculativeDecoder(model, drafter="recycling", clock=clock)
        for _ in range(3):
            out = decoder.generate(prompt, max_new_tokens=60, eos_token_id=-1, return_dict_in_generate=True)
            assert torch.equal(out.sequences, ref)
    finally:
        handle.remove()
    sizes = out.spec_stats.tree_sizes
    typical = float(np.median(sizes))
    if small:
        assert typical <= 2
    else:
        assert typical >= 12


@pytest.mark.parametrize("scheduler", [Scheduler(max_budget=64, explore_every=1), Scheduler(max_budget=0)],
                         ids=["largest-explore-always", "never-draft"])
def test_scheduler_extremes_keep_output(model, scheduler):
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    ref = hf_greedy(model, prompt, 40)
    decoder = SpeculativeDecoder(model, scheduler=scheduler)
    for _ in range(2):
        out = decoder.generate(prompt, max_new_tokens=40, eos_token_id=-1, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref)
    if scheduler.max_budget == 0:
        assert out.spec_stats.drafted_tokens == 0 and out.spec_stats.steps == 40


def test_decoder_state_round_trip(model, tmp_path):
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    decoder = SpeculativeDecoder(model)
    first = decoder.generate(prompt, max_new_tokens=30, eos_token_id=-1, return_dict_in_generate=True)
    decoder.save(tmp_path / "state.pt")
    restored = SpeculativeDecoder(model)
    restored.load(tmp_path / "state.pt")
    np.testing.assert_equal(restored.scheduler.state_dict(), decoder.scheduler.state_dict())
    a = decoder.drafter.propose(*_ctx(first.sequences), 8)
    b = restored.drafter.propose(*_ctx(first.sequences), 8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
    with pytest.raises(ValueError, match="drafter"):
        SpeculativeDecoder(model, drafter="ngram").load(tmp_path / "state.pt")


def _ctx(sequences):
    from drafters import DraftContext

    return (DraftContext(sequences[0].numpy(), sequence_id=99, prompt_len=8),)
