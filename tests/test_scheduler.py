"""The acceptance-rate scheduler: pure, monotone, bounded, and never changes output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import Scheduler, SpeculativeDecoder
from specdec.schedule.calibration import Calibration
from specdec.schedule.costs import SIZE_BUCKETS, CostModel
from tests.conftest import hf_greedy, tiny_llama
from trees import TokenTree


def cost(size: int, slope: float, base: float = 0.03) -> float:
    return base * (1 + slope * size)


def chain(size: int, value: float = 0.9, source: int = 0) -> TokenTree:
    return TokenTree.chain(torch.arange(size) + 10, torch.full((size,), float(np.log(value))), source)


def chosen_size(scheduler: Scheduler, values, context_len: int) -> int:
    """The node count the scheduler's rate rule picks for nodes of calibrated ``values``."""
    return scheduler._size([np.sort(np.asarray(values, dtype=np.float64))[::-1]], context_len)


def replay(history, slope=0.03, explore=1.0):
    """Feed a scheduler a history of (size, accepted) chain steps at fixed values; return its choices."""
    scheduler = Scheduler(explore=explore)
    choices = []
    for size, accepted in history:
        choices.append(len(scheduler.select(chain(48), 300)))
        scheduler.record(chain(size), 300, cost(size, slope), 0.001, range(accepted))
    return scheduler, choices


def test_decisions_are_a_pure_function_of_history():
    rng = np.random.default_rng(0)
    history = [(int(s), int(rng.integers(0, s + 1))) for s in rng.choice(SIZE_BUCKETS[:-1], 60)]
    _, a = replay(history)
    _, b = replay(history)
    assert a == b


def test_all_accepted_history_grows_the_tree():
    sizes = [b for b in SIZE_BUCKETS if b <= 48]
    scheduler, _ = replay([(s, s) for s in sizes * 3])
    assert len(scheduler.select(chain(48), 300)) >= 32


def test_all_rejected_history_shrinks_to_zero():
    sizes = [b for b in SIZE_BUCKETS if b <= 48]
    scheduler, _ = replay([(s, 0) for s in sizes * 4])
    assert scheduler.calibration.factors()[0, 1] < 0.1
    assert chosen_size(scheduler, np.full(48, 0.9) * scheduler.calibration.factors()[0, 1], 300) == 0


def noisy(rng, seconds: float, outliers: float = 0.05) -> float:
    """Multiplicative log-normal noise (20 %) and occasional 3-6x outliers (a preempted step)."""
    factor = rng.lognormal(0.0, 0.2)
    if rng.random() < outliers:
        factor *= rng.uniform(3, 6)
    return seconds * factor


def true_cost(size: int, context: int) -> float:
    return 0.03 * (1 + 0.05 * size) + 4e-6 * context


@pytest.mark.parametrize("seed", range(5))
def test_noisy_costs_give_a_monotone_curve_and_the_right_decision(seed):
    rng = np.random.default_rng(seed)
    model = CostModel()
    for _ in range(300):
        size, context = int(rng.choice([0, 1, 2, 4, 6, 8, 12, 16, 24])), int(rng.integers(50, 2000))
        model.record(size, context, noisy(rng, true_cost(size, context)))
    for context in (100, 1000, 3000):
        curve, error = model.curve(context)
        assert np.all(np.diff(curve) >= -1e-12), "the fitted curve must be monotone in n"
        truth = np.array([true_cost(n, context) for n in range(65)])
        assert np.all(np.abs(curve[:25] - truth[:25]) < 0.15 * truth[:25])  # per-size noise is 20 % + outliers
        assert np.all(error[:25] > 0)  # measured sizes: the fit's own spread
        assert error[64] > 1.5 * error[24]  # far past the measured sizes the cost is less certain
        assert np.all(np.diff(error[24:]) >= -1e-12)
    assert model.context_slope() == pytest.approx(4e-6, rel=0.35)
    scheduler = Scheduler(explore=0.0)
    scheduler.cost = model
    values = 0.85 ** np.arange(1, 49)
    gain = 1 + np.concatenate([[0], np.cumsum(values)])
    true_rate = gain / np.array([true_cost(n, 800) for n in range(49)])
    chosen = chosen_size(scheduler, values, 800)
    assert true_rate[chosen] >= 0.97 * true_rate.max()


def test_noise_would_mislead_a_plain_average():
    """The control: the same noisy data averaged per size is not monotone, the fit is."""
    rng = np.random.default_rng(3)
    sizes = [0, 1, 2, 4, 6, 8]
    model, raw = CostModel(), {s: [] for s in sizes}
    for _ in range(4):
        for size in sizes:
            seconds = noisy(rng, true_cost(size, 500), outliers=0.3)
            raw[size].append(seconds)
            model.record(size, 500, seconds)
    means = [np.mean(raw[s]) for s in sizes]
    assert np.any(np.diff(means) < 0)  # noise breaks monotonicity of plain averages
    assert np.all(np.diff(model.curve(500)[0]) >= -1e-12)


def test_uncertainty_drives_exploration():
    """Sizes whose cost is unknown are tried while they could be best, for a bounded number of steps;
    once costs are known the choice is the point-estimate one (no exploration left)."""
    def true(n):  # flat up to 4 nodes, then ten times dearer
        return cost(n, 0.01) * (1 if n <= 4 else 10)

    scheduler = Scheduler(explore=1.0)
    for _ in range(8):
        for size in (0, 1, 2, 4):
            scheduler.record(chain(size), 300, true(size), 0.0, range(size))
    values = np.full(48, 0.5)
    choices = []
    for _ in range(40):
        size = chosen_size(scheduler, values, 300)
        choices.append(size)
        scheduler.record(chain(size), 300, true(size), 0.0, range(size))
    assert choices[0] > 4  # beyond the measured sizes, where the flat curve says it may pay
    assert sum(size > 4 for size in choices) <= 12  # exploration stops once the step is measured
    assert choices[-10:] == [4] * 10
    exploit = Scheduler(explore=0.0)
    exploit.cost = scheduler.cost
    assert chosen_size(scheduler, values, 300) == chosen_size(exploit, values, 300)


def test_bad_scheduler_arguments():
    with pytest.raises(ValueError, match="max_budget"):
        Scheduler(max_budget=1000)
    with pytest.raises(ValueError, match="probe_every"):
        Scheduler(probe_every=0)
    with pytest.raises(ValueError, match="explore"):
        Scheduler(explore=-1)
    with pytest.raises(ValueError, match="decay"):
        Scheduler(decay=1.5)


def two_drafter_tree(value_a: float, value_b: float) -> TokenTree:
    """Two chains of 6 below the root: drafter 0's and drafter 1's."""
    tokens = torch.arange(12) + 10
    parents = torch.tensor([-1, 0, 1, 2, 3, 4, -1, 6, 7, 8, 9, 10])
    scores = torch.tensor([np.log(value_a)] * 6 + [np.log(value_b)] * 6, dtype=torch.float32)
    return TokenTree(tokens, parents, scores, torch.tensor([0] * 6 + [1] * 6, dtype=torch.int8))


def accepted_chain(tree: TokenTree, rng, rate_by_source: dict[int, float]) -> list[int]:
    """Accept along one branch while coins come up (rate per drafter); verification accepts one path."""
    kids = tree.children()
    accepted, slot = [], 0
    while kids[slot]:
        node = kids[slot][0] if len(kids[slot]) == 1 or rng.random() < 0.5 else kids[slot][1]
        if rng.random() >= rate_by_source[int(tree.sources[node])]:
            break
        accepted.append(node)
        slot = node + 1
    return accepted


def test_a_starved_drafter_recovers_within_bounded_steps():
    """Drafter 1 is never accepted for 150 steps, then 80 % of the time: probes keep measuring it at
    a bounded cost while it fails, and it is back in regular use within three probe periods."""
    rng = np.random.default_rng(0)
    scheduler = Scheduler(probe_every=8, probe_nodes=2)
    rates = {0: 0.0, 1: 0.0}
    verified_b = []
    for step in range(300):
        if step == 150:
            rates[1] = 0.8
        tree = scheduler.select(two_drafter_tree(0.3, 0.6), 300)
        b_nodes = int((tree.sources == 1).sum())
        verified_b.append(b_nodes)
        accepted = accepted_chain(tree, rng, rates)
        scheduler.record(tree, 300, cost(len(tree), 0.05), 0.001, accepted)
    failing = verified_b[50:150]
    assert 0 < sum(1 for b in failing if b) <= len(failing) // 8 + 1  # probed, at most once per period
    assert max(failing) <= 2  # a probe verifies its best two nodes, no more
    recovered = verified_b[150:]
    back = next(i for i in range(len(recovered)) if all(b >= 2 for b in recovered[i : i + 10]))
    assert back <= 3 * 8, f"back in regular use only after {back} steps"


def test_calibration_corrects_values_per_drafter_and_depth():
    """Raw values of 0.2 at every depth, true per-node acceptance 0.8 at depth 1 and 0.4 below:
    the calibrated prediction error falls far below the raw one."""
    rng = np.random.default_rng(1)
    calibration = Calibration()
    depths = np.array([1, 2, 3, 1, 2, 3])
    sources = np.array([0, 0, 0, 1, 1, 1])
    values = np.full(6, 0.2)
    truth = np.where(depths == 1, 0.8, 0.4)
    for _ in range(400):
        calibration.record(values, sources, depths, rng.random(6) < truth)
    report = calibration.report({0: "a", 1: "b"})
    for name in "ab":
        assert report[name]["error_raw"] > 0.5
        assert report[name]["error_calibrated"] < 0.1
    np.testing.assert_allclose(calibration.apply(values, sources, depths), truth, atol=0.12)


def test_scheduler_state_round_trip_and_validation():
    rng = np.random.default_rng(0)
    scheduler, _ = replay([(int(s), int(rng.integers(0, s + 1))) for s in rng.choice(SIZE_BUCKETS[:-1], 40)])
    restored = Scheduler()
    restored.load_state_dict(scheduler.state_dict())
    assert chosen_size(restored, np.full(30, 0.7), 300) == chosen_size(scheduler, np.full(30, 0.7), 300)
    state = scheduler.state_dict()
    state["cost"]["samples"][3] = [[40, 10, 0.1]]  # a size outside bucket 4
    with pytest.raises(ValueError, match="outside bucket"):
        Scheduler().load_state_dict(state)


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


@pytest.mark.parametrize("scheduler", [Scheduler(max_budget=64, explore=10.0, probe_every=1), Scheduler(max_budget=0)],
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


def batch_seconds(rows: int, nodes: int) -> float:
    """A forward's cost by query positions: flat while memory-bound (up to 16), then linear."""
    return 0.05 * (1 + max(0, rows * (nodes + 1) - 16) / 24)


def replay_batches(rows_per_step, accepted_per_row, steps=200, explore=1.0):
    """Batched steps at the row counts ``rows_per_step`` cycles through, each row's chain accepting
    ``accepted_per_row`` of its nodes; returns the scheduler and its (rows, nodes) choices."""
    scheduler = Scheduler(explore=explore)
    choices = []
    for step in range(steps):
        rows = rows_per_step[step % len(rows_per_step)]
        trees = scheduler.select_batch([chain(16, source=0) for _ in range(rows)], 300)
        nodes = max(len(t) for t in trees)
        choices.append((rows, nodes))
        scheduler.record_batch(trees, 300, batch_seconds(rows, nodes), 0.001,
                               [range(min(accepted_per_row, len(t))) for t in trees])
    return scheduler, choices


def test_batched_costs_are_shared_across_row_counts():
    """Forwards of 2 rows teach the cost of forwards of 8: a curve by query positions."""
    scheduler, _ = replay_batches([2], 1, steps=60)
    measured = scheduler.batch_cost.counts.sum()
    assert measured == 60
    cost8, _ = scheduler._curve(8, 300)
    cost2, _ = scheduler._curve(2, 300)
    assert not np.isnan(cost8).any()
    assert cost8[1] == pytest.approx(cost2[3], rel=0.35)  # 16 positions either way (context differs)


def test_trees_that_pay_for_few_rows_do_not_for_many():
    """Every row accepts one node a step: worth a tree at 2 rows (positions nearly free), not at 8
    (each node costs 8 positions past the memory-bound region); the scheduler learns both."""
    scheduler, choices = replay_batches([2, 8], 1, steps=400)
    late = choices[-100:]
    two = [nodes for rows, nodes in late if rows == 2]
    eight = [nodes for rows, nodes in late if rows == 8]
    assert np.median(two) >= 1
    assert np.median(eight) <= 1
    rate = {rows: np.mean([(rows * (1 + min(1, n))) / batch_seconds(rows, n) for r, n in late if r == rows])
            for rows in (2, 8)}
    plain = {rows: rows / batch_seconds(rows, 0) for rows in (2, 8)}
    assert rate[2] > 1.3 * plain[2]  # speculation pays where it can
    assert rate[8] > 0.9 * plain[8]  # and costs little where it cannot


def test_first_batched_tree_fits_one_rows_positions():
    scheduler = Scheduler()
    assert max(len(t) for t in scheduler.select_batch([chain(16) for _ in range(8)], 300)) == 0
    assert max(len(t) for t in scheduler.select_batch([chain(16) for _ in range(2)], 300)) == 3


def test_probes_count_steps_not_rows_and_probe_one_row():
    """A drafter left out gets probed once every `probe_every` steps, in one row only (a probe in
    every row, or every few rows, would make every row of a batched forward pay for it)."""
    scheduler = Scheduler(probe_every=4, probe_nodes=2)
    sizes = []
    for _ in range(8):
        trees = scheduler.select_batch([chain(16) for _ in range(8)], 300)  # nothing measured: size 0
        sizes.append([len(t) for t in trees])
    assert sizes[3] == [2] + [0] * 7 and sizes[7] == [2] + [0] * 7
    assert all(s == [0] * 8 for i, s in enumerate(sizes) if i not in (3, 7))
    assert scheduler.probes == 2


# ---------------------------------------------------------------- which drafters run
def _usage(own_accepted: dict, propose_seconds: dict, own_verified: dict | None = None, merge_seconds: float = 0.0):
    from drafters.hybrid import DrafterUsage

    return DrafterUsage(propose_seconds=dict(propose_seconds), merge_seconds=merge_seconds,
                        own_verified=dict(own_verified or {}), own_accepted=dict(own_accepted))


def test_drafter_choice_skips_a_drafter_that_costs_more_than_it_brings_and_readmits_it_when_it_pays():
    from specdec.schedule.drafter_choice import MIN_STEPS, DrafterChoice

    choice = DrafterChoice(decay=0.9, probe_every=4)
    # 10 ms a token; member 0 brings a token a step for 1 ms; member 1 brings nothing for 3 ms of drafting
    # (15% of a step: too dear to draft in shadow every step, so its shadow drafts come every 4th step)
    runs, shadows = [], []
    for _ in range(40):
        running, shadowed = choice.choose([0, 1])
        runs.append(running)
        shadows.append(shadowed)
        drafted = running | shadowed
        usage = _usage({s: 1 if s == 0 else 0 for s in drafted}, {s: 0.001 if s == 0 else 0.003 for s in drafted})
        usage.shadowed = set(shadowed)
        choice.record(usage, step_seconds=0.02, tokens=2, rows=1, node_seconds=0.001)
    assert all(0 in r for r in runs) and not any(0 in s for s in shadows)  # the one that pays always runs
    assert all(1 in r for r in runs[:MIN_STEPS])  # measured before it can be judged
    assert not any(1 in r for r in runs[MIN_STEPS + 1:])  # then skipped (its first step not counted)
    later = [1 in s for s in shadows[MIN_STEPS + 1:]]
    assert later.count(True) == len(later) // 4  # drafting in shadow every 4th step
    assert choice.explain({0: "a", 1: "b"})["b"]["running"] is False and choice.skips > 0
    # the text changes: member 1's shadow drafts would now bring three tokens a step; one or two readmit it
    steps_to_return = None
    for step in range(40):
        running, shadowed = choice.choose([0, 1])
        if steps_to_return is None and 1 in running:
            steps_to_return = step
        runs.append(running)
        drafted = running | shadowed
        usage = _usage({s: 1 if s == 0 else 3 for s in drafted}, {s: 0.001 if s == 0 else 0.003 for s in drafted})
        usage.shadowed = set(shadowed)
        choice.record(usage, step_seconds=0.02, tokens=4, rows=1, node_seconds=0.001)
    assert all(1 in r for r in runs[-20:])
    assert steps_to_return is not None and steps_to_return <= 8
    report = choice.explain({0: "a", 1: "b"})["b"]
    assert report["running"] is True and report["net_ms"] > 0 and report["value_ms"] == pytest.approx(15.0, rel=0.05)


def test_a_skipped_drafter_that_drafts_cheaply_is_shadowed_every_step_and_back_within_steps_once_it_pays():
    from specdec.schedule.drafter_choice import MIN_STEPS, DrafterChoice

    choice = DrafterChoice(decay=0.98, probe_every=16)
    # 10 ms a token; member 1 drafts in 0.1 ms (0.5% of a step) and brings nothing, its 2 own nodes 1 ms each
    for step in range(60):
        running, shadowed = choice.choose([0, 1])
        if step > MIN_STEPS + 2:
            assert (running, shadowed) == (frozenset({0}), frozenset({1}))  # skipped, measured every step
        usage = _usage({0: 1}, {0: 0.0005, 1: 0.0001}, own_verified={1: 2}, merge_seconds=0.0002)
        usage.shadowed = set(shadowed)
        choice.record(usage, step_seconds=0.02, tokens=2, rows=1, node_seconds=0.001)
    merge_before = choice.explain()["1"]["merge_ms"]
    for step in range(12):  # its shadow now would have added two tokens a step (20 ms for 2 ms)
        running, shadowed = choice.choose([0, 1])
        if 1 in running:
            break
        usage = _usage({0: 1, 1: 2}, {0: 0.0005, 1: 0.0001}, own_verified={1: 2})
        usage.shadowed = set(shadowed)
        choice.record(usage, step_seconds=0.02, tokens=2, rows=1, node_seconds=0.001)
        assert choice.explain()["1"]["merge_ms"] == merge_before  # a shadow merged nothing: its merge figure stays
    assert 1 in running and step <= 8  # its average (about fifty steps' worth) turns within 8 steps


def test_drafter_choice_charges_verified_nodes_and_the_merge():
    from specdec.schedule.drafter_choice import MIN_STEPS, DrafterChoice

    choice = DrafterChoice()
    for _ in range(1 + MIN_STEPS):  # the first step of each is not counted
        # two rows; member 1: one accepted token (10 ms a token) for 0.5 ms of drafting, its 6 own nodes (3 a
        # row) at 2 ms a node a row, and the whole 2 ms merge (two members: none without it)
        choice.record(_usage({0: 0, 1: 1}, {0: 0.0005, 1: 0.0005}, own_verified={1: 6},
                             merge_seconds=0.002), step_seconds=0.02, tokens=2, rows=2, node_seconds=0.002)
    report = choice.explain({0: "a", 1: "b"})["b"]
    assert report["value_ms"] == pytest.approx(10.0) and report["verify_ms"] == pytest.approx(6.0)
    assert report["merge_ms"] == pytest.approx(2.0) and report["net_ms"] == pytest.approx(1.5)
    assert choice.choose([0, 1]) == (frozenset({1}), frozenset())  # a brought nothing of its own
    # for its cost: skipped, drafting in shadow (0.5 ms, 2.5% of a step: its shadow drafts wait for a probe)
    with pytest.raises(ValueError, match="decay"):
        DrafterChoice(decay=1.0)
    with pytest.raises(ValueError, match="probe_every"):
        DrafterChoice(probe_every=0)


def test_auto_skips_a_member_that_never_pays_and_stays_lossless(model):
    from drafters import HybridDrafter, NGramDrafter
    from tests.conftest import ScriptedDrafter

    class Costly(ScriptedDrafter):
        """Random tokens (never accepted), and a clock that says each proposal took a second."""

        name = "costly"

        def propose(self, ctx, budget):
            hybrid.clock_offset += 1.0
            return super().propose(ctx, budget)

    costly = Costly(None, depth=3)
    hybrid = HybridDrafter([NGramDrafter(), costly])
    hybrid.clock_offset = 0.0
    hybrid.clock = lambda: hybrid.clock_offset
    decoder = SpeculativeDecoder(model, drafter=hybrid)
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    out = decoder.generate(prompt, max_new_tokens=60, do_sample=False)
    assert torch.equal(out, hf_greedy(model, prompt, 60))
    steps = decoder.last_stats.steps
    assert decoder.scheduler.drafters.skips > 0 and costly.step < steps
    assert decoder.scheduler.explain(names=decoder.source_names)["drafters"]["costly"]["running"] is False


def test_drafter_choice_keeps_a_drafter_whose_worth_comes_in_bursts():
    from specdec.schedule.drafter_choice import DrafterChoice

    choice = DrafterChoice()
    for step in range(30):  # a match every third step brings 4 tokens (40 ms); otherwise 0.5 ms for nothing
        assert 0 in choice.choose([0])[0]
        choice.record(_usage({0: 4 if step % 3 == 0 else 0}, {0: 0.0005}), step_seconds=0.05, tokens=5, rows=1,
                      node_seconds=0.0)
    below_zero_and_kept = 0
    for _ in range(300):  # then no match at all: its average sinks below zero, its spread keeps it a while
        running = 0 in choice.choose([0])[0]
        below_zero_and_kept += running and choice.explain()["0"]["net_ms"] < 0
        if running:
            choice.record(_usage({0: 0}, {0: 0.0005}), step_seconds=0.05, tokens=5, rows=1, node_seconds=0.0)
    assert below_zero_and_kept > 0
    assert choice.explain()["0"]["running"] is False  # sure to lose at last: skipped
