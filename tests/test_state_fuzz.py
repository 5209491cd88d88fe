"""Fuzzing state files and trees: every malformed input is a clear ValueError, never a crash and
never a silent (partial) load."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from drafters import HybridDrafter, NGramDrafter, TokenRecycling
from drafters.state import StateError
from specdec import ChatSession, Scheduler, SpeculativeDecoder
from trees import TokenTree

V = 40
SEEDS = range(40)


def trained_recycling() -> TokenRecycling:
    drafter = TokenRecycling(V, k=4)
    rng = np.random.default_rng(0)
    drafter.succ[:] = rng.integers(-1, V, size=drafter.succ.shape)
    drafter.stats.reached[:2, :2] = 3.0
    drafter.stats.accepted[:2, :2] = 1.0
    drafter.stats.steps = 5
    return drafter


def trained_ngram() -> NGramDrafter:
    drafter = NGramDrafter(vocab_size=V)
    for i in range(3):
        drafter._remember([(7 * i + j) % V for j in range(6)])
    return drafter


def leaves(state, path=()):
    """Paths to every value of a nested state dictionary / list."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from leaves(value, path + (key,))
    elif isinstance(state, (list, tuple)) and state and not isinstance(state[0], (int, float)):
        for i, value in enumerate(state):
            yield from leaves(value, path + (i,))
    else:
        yield path


def put(state, path, value):
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def bad_values(value, rng):
    """Replacements that no field of a state may accept in place of ``value``."""
    out = ["nonsense", None, {"x": 1}]
    if isinstance(value, torch.Tensor):
        out += [value.float().fill_(float("nan")) if value.is_floating_point() else value.float() + 0.5,
                torch.zeros(value.shape + (2,), dtype=value.dtype), value.to(torch.complex64), value.bool()]
        if value.dim() > 1:
            out.append(value.reshape(-1)[:0])
        if value.numel():
            broken = value.clone()  # no count, rate or token id of a state is negative (-1 = unknown at most)
            broken.view(-1)[int(rng.integers(0, broken.numel()))] = -10**6
            out.append(broken)
            inf = value.double().clone()
            inf.view(-1)[0] = float("inf")
            out.append(inf)
    elif isinstance(value, bool):
        out += [3, "yes"]
    elif isinstance(value, (int, float)):
        out += [float("nan"), -10**9, [value], torch.tensor([value, value])]
    return out




CASES = {
    "recycling": (trained_recycling, lambda: TokenRecycling(V, k=4)),
    "ngram": (trained_ngram, lambda: NGramDrafter(vocab_size=V)),
    "hybrid": (lambda: HybridDrafter([trained_recycling(), trained_ngram()]),
               lambda: HybridDrafter([TokenRecycling(V, k=4), NGramDrafter(vocab_size=V)])),
}


def snapshot(drafter) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(drafter.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", list(CASES))
def test_malformed_drafter_states_are_refused_and_change_nothing(kind):
    make_trained, make_fresh = CASES[kind]
    valid = make_trained().state_dict()
    target = make_fresh()
    target.load_state_dict(copy.deepcopy(valid))  # the valid state loads
    reference = snapshot(target)
    rng = np.random.default_rng(1)
    tried = 0
    for path in leaves(valid):
        original = valid
        for key in path:
            original = original[key]
        for bad in bad_values(original, rng):
            if isinstance(bad, torch.Tensor) and isinstance(original, torch.Tensor) and \
                    bad.shape == original.shape and bad.dtype == original.dtype and torch.equal(bad, original):
                continue
            state = copy.deepcopy(valid)
            put(state, path, bad)
            with pytest.raises(ValueError):
                target.load_state_dict(state)
            assert snapshot(target) == reference, f"{path} = {bad!r} changed the drafter"
            tried += 1
        state = copy.deepcopy(valid)
        if isinstance(path[-1], str):
            container = state
            for key in path[:-1]:
                container = container[key]
            del container[path[-1]]
            with pytest.raises(ValueError):
                target.load_state_dict(state)
            tried += 1
    assert tried > 20


def test_out_of_range_successor_ids_at_random(tmp_path):
    rng = np.random.default_rng(2)
    for seed in SEEDS:
        state = trained_recycling().state_dict()
        flat = state["succ"].view(-1)
        flat[int(rng.integers(0, flat.numel()))] = int(rng.choice([-2, V, V + 1, 2**31 - 1, -(2**31)]))
        with pytest.raises(StateError, match="allowed"):
            TokenRecycling(V, k=4).load_state_dict(state)


def test_truncated_and_foreign_files_are_refused(tmp_path, model):
    decoder = SpeculativeDecoder(model, drafter="recycling+ngram")
    decoder.generate(torch.tensor([[5, 6, 7, 5, 6]]), max_new_tokens=8, eos_token_id=-1)
    files = {"decoder": tmp_path / "decoder.pt", "drafter": tmp_path / "drafter.pt"}
    decoder.save(files["decoder"])
    decoder.drafter.save(files["drafter"])
    loaders = {"decoder": decoder.load, "drafter": decoder.drafter.load,
               "session": lambda path: ChatSession.load(path, decoder)}
    rng = np.random.default_rng(3)
    for name, path in files.items():
        data = path.read_bytes()
        for cut in sorted(set(rng.integers(0, len(data), 12).tolist()) | {0, 1, len(data) - 1}):
            broken = tmp_path / f"{name}-{cut}.pt"
            broken.write_bytes(data[:cut])
            for load in loaders.values():
                with pytest.raises(ValueError):
                    load(broken)
        noise = tmp_path / f"{name}-noise.pt"
        noise.write_bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
        for load in loaders.values():
            with pytest.raises(ValueError):
                load(noise)
    for name, path in files.items():  # a valid file of another kind
        for other, load in loaders.items():
            if other != name:
                with pytest.raises(StateError, match="is a specdec-|not a specdec"):
                    load(path)
    for payload in ([1, 2, 3], {"kind": "specdec-decoder"}, {"kind": "something-else"}, torch.zeros(3)):
        torch.save(payload, tmp_path / "odd.pt")
        for load in loaders.values():
            with pytest.raises(ValueError):
                load(tmp_path / "odd.pt")


def trained_scheduler() -> Scheduler:
    scheduler = Scheduler()
    tree = TokenTree.chain(torch.arange(6) + 3, torch.full((6,), -0.5))
    for step in range(20):
        size = step % 7
        scheduler.record(tree.prune(size), 100 + 20 * step, 0.01 + 0.001 * size, 0.001, range(min(step % 3, size)))
    return scheduler


def nested_items(state: dict, path=()):
    """(key path, value) of every non-dictionary value, nested dictionaries included."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from nested_items(value, path + (key,))
        else:
            yield path + (key,), value


def replaced(state: dict, path: tuple, value) -> dict:
    if len(path) == 1:
        return dict(state, **{path[0]: value})
    return dict(state, **{path[0]: replaced(state[path[0]], path[1:], value)})


def test_malformed_scheduler_state_is_refused():
    valid = trained_scheduler().state_dict()
    rng = np.random.default_rng(4)
    checked = 0
    for path, value in nested_items(valid):
        original = torch.tensor(value) if path[-1] != "samples" and isinstance(value, list) else value
        candidates = bad_values(original, rng)
        if path[-1] == "samples":  # a list of per-bucket row lists
            candidates += [value[:-1], [torch.tensor(rows) + 0.5 if rows else rows for rows in value],
                           [[[-1.0, 0.0, 0.1]]] + value[1:], [[[0.0, 0.0, float("nan")]]] + value[1:]]
        for bad in candidates:
            scheduler = Scheduler()
            before = scheduler.state_dict()
            with pytest.raises(ValueError):
                scheduler.load_state_dict(replaced(valid, path, bad))
            np.testing.assert_equal(scheduler.state_dict(), before)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("seed", SEEDS)
def test_random_malformed_trees_are_value_errors(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    tokens = rng.integers(0, 50, n)
    parents = np.array([int(rng.integers(-1, i)) if i else -1 for i in range(n)])
    TokenTree(tokens, parents)  # the unbroken tree is valid
    breakage = rng.integers(0, 7)
    kwargs = {"tokens": torch.tensor(tokens), "parents": torch.tensor(parents)}
    if breakage == 0:
        kwargs["parents"] = torch.tensor(parents).roll(1) + n  # forward or out-of-range parents
    elif breakage == 1:
        kwargs["tokens"] = torch.tensor(tokens)[:-1] if n > 1 else torch.zeros(2, dtype=torch.long)
    elif breakage == 2:
        kwargs["tokens"] = torch.tensor(tokens, dtype=torch.float32) + 0.5
    elif breakage == 3:
        kwargs["scores"] = torch.full((n,), float("nan"))
    elif breakage == 4:
        kwargs["tokens"] = -torch.tensor(tokens) - 1
    elif breakage == 5:
        kwargs["ranks"] = -torch.ones(n, dtype=torch.long)
    else:
        kwargs["parents"] = torch.tensor(parents)[None]
    with pytest.raises(ValueError):
        TokenTree(**kwargs)
