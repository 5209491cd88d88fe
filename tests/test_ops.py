"""csrc operators: the CPU build against the pure-torch reference, opcheck, the HF attention
hook, greedy equality with the extension on and off, fallbacks, and the CUDA sources compiling."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import specdec
from specdec.device import ops
from specdec.device.cache import RowCache
from specdec.device.tree import HostBuffer, RowTree, upload_rows
from specdec.step.verify import prefill_row, verify_rows
from tests.conftest import ScriptedDrafter, hf_greedy, tiny_llama
from tests.test_families import tiny_qwen2
from tests.test_trees import random_tree
from trees import pack_rows, unpack_rows

ROOT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def extension():
    assert ops.load(), f"the CPU extension must build here: {ops.status()}"


def test_pack_rows_round_trip():
    rng = np.random.default_rng(0)
    for cols in (1, 5, 63, 64, 65, 130):
        mask = torch.from_numpy(rng.random((7, cols)) < 0.5)
        packed = pack_rows(mask)
        assert packed.dtype == torch.int64 and packed.shape == (7, -(-cols // 64))
        assert torch.equal(unpack_rows(packed, cols), mask)
    row = torch.zeros(1, 64, dtype=torch.bool)
    row[0, 63] = True  # the sign bit
    assert pack_rows(row).item() == -(2**63)


def random_inputs(rng, batch, q_heads, kv_heads, n, prefix_len, dim, dtype, topological=True):
    if topological:
        mask = random_tree(rng, n - 1).ancestor_mask() if n > 1 else torch.ones(1, 1, dtype=torch.bool)
    else:  # any pattern the bits can express (every row sees itself, so softmax is defined)
        mask = torch.from_numpy(rng.random((n, n)) < 0.4) | torch.eye(n, dtype=torch.bool)
    seq = prefix_len + n
    q = torch.randn(batch, q_heads, n, dim).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim).to(dtype)
    v = torch.randn(batch, kv_heads, seq, dim).to(dtype)
    return q, k, v, pack_rows(mask)


@pytest.mark.parametrize("prefix_len", [0, 1, 17, 300, 1500])
@pytest.mark.parametrize("group", [1, 3])
def test_tree_attention_matches_reference(prefix_len, group):
    rng = np.random.default_rng(prefix_len * 7 + group)
    torch.manual_seed(prefix_len + group)
    for n, dim, batch in ((1, 64, 1), (9, 13, 2), (33, 72, 1), (70, 40, 1)):
        for topological in (True, False):
            q, k, v, anc = random_inputs(rng, batch, 2 * group, 2, n, prefix_len, dim, torch.float32, topological)
            scale = dim ** -0.5
            ours = torch.ops.specdec.tree_attention(q, k, v, anc, prefix_len, scale)
            assert ours.shape == (batch, n, 2 * group, dim)
            torch.testing.assert_close(ours, ops.tree_attention_reference(q, k, v, anc, prefix_len, scale),
                                       atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix_len", [0, 17, 300])
def test_tree_attention_bf16_is_close(prefix_len):
    rng = np.random.default_rng(1)
    q, k, v, anc = random_inputs(rng, 1, 9, 3, 24, prefix_len, 64, torch.bfloat16)
    ours = torch.ops.specdec.tree_attention(q, k, v, anc, prefix_len, 0.125)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ops.tree_attention_reference(q, k, v, anc, prefix_len, 0.125).float(),
                               atol=2e-2, rtol=2e-2)


def test_tree_attention_rejects_bad_shapes():
    q, k, v, anc = random_inputs(np.random.default_rng(0), 1, 4, 2, 5, 10, 16, torch.float32)
    with pytest.raises(RuntimeError, match="prefix_len"):
        torch.ops.specdec.tree_attention(q, k, v, anc, 11, 0.25)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        torch.ops.specdec.tree_attention(q[:, :3], k, v, anc, 10, 0.25)
    with pytest.raises(RuntimeError, match="ancestors"):
        torch.ops.specdec.tree_attention(q, k, v, anc.int(), 10, 0.25)


def ragged_rows(rng, lengths, q_heads, kv_heads, n, dim, dtype, spare=5):
    """Rows of their own prefix lengths in one ``[B, H, S, D]`` cache: each row's slots right after
    its prefix, then keys that row must never see (huge, so one seen shows at once)."""
    seq = max(lengths) + n + spare
    q = torch.randn(len(lengths), q_heads, n, dim).to(dtype)
    k = torch.randn(len(lengths), kv_heads, seq, dim)
    v = torch.randn(len(lengths), kv_heads, seq, dim)
    for b, length in enumerate(lengths):
        k[b, :, length + n :] = 50.0
        v[b, :, length + n :] = 1e4
    masks = [random_tree(rng, n - 1).ancestor_mask() if n > 1 else torch.ones(1, 1, dtype=torch.bool)
             for _ in lengths]
    return q, k.to(dtype), v.to(dtype), torch.stack([pack_rows(mask) for mask in masks])


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_rows_matches_the_reference_row_by_row(group, dtype):
    rng = np.random.default_rng(group)
    torch.manual_seed(group)
    for lengths, n, dim in (([0], 1, 16), ([5, 0, 17], 9, 64), ([300, 12, 299, 1], 33, 64), ([70, 700], 70, 40)):
        q, k, v, anc = ragged_rows(rng, lengths, 2 * group, 2, n, dim, dtype)
        scale = dim ** -0.5
        ours = torch.ops.specdec.tree_attention_rows(q, k, v, anc, torch.tensor(lengths), scale)
        assert ours.shape == (len(lengths), n, 2 * group, dim) and ours.dtype == dtype
        for b, length in enumerate(lengths):
            expected = ops.tree_attention_reference(q[b : b + 1], k[b : b + 1, :, : length + n],
                                                    v[b : b + 1, :, : length + n], anc[b], length, scale)
            tolerance = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
            torch.testing.assert_close(ours[b : b + 1].float(), expected.float(), **tolerance)
        through_wrapper = ops.tree_attention_rows(q, k, v, anc, lengths, scale)
        assert torch.equal(through_wrapper, ours)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 12])
def test_tree_attention_rows_reduced_precision_on_both_kernels(dtype, n):
    """bf16 / fp16 rows go through the direct kernel up to 24 query rows per kv head (here G = 3:
    n <= 8) and the float32 GEMMs past it: both against the reference, with rows of 0 to 700 keys
    (several of the direct kernel's 128-key work units, and rows of 124 keys whose second unit
    holds only tree slots, some of which a query sees none of), head widths 40, 64, 100 and 128
    (with and without a 16-lane tail, the widest register blocks), a query laid out as the
    attention projections leave it (not contiguous), and every key past a row's own slots
    poisoned."""
    rng = np.random.default_rng(n)
    torch.manual_seed(n)
    for lengths, dim in (([0, 700, 129, 124, 5], 64), ([300, 1, 124], 40), ([130, 7], 128), ([20, 260], 100)):
        q, k, v, anc = ragged_rows(rng, lengths, 9, 3, n, dim, dtype)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, n, D] strides of [B, n, Hq, D]
        ours = torch.ops.specdec.tree_attention_rows(q, k, v, anc, torch.tensor(lengths), dim ** -0.5)
        assert ours.shape == (len(lengths), n, 9, dim) and ours.dtype == dtype
        for b, length in enumerate(lengths):
            expected = ops.tree_attention_reference(q[b : b + 1], k[b : b + 1, :, : length + n],
                                                    v[b : b + 1, :, : length + n], anc[b], length, dim ** -0.5)
            torch.testing.assert_close(ours[b : b + 1].float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n", [2, 12])
def test_tree_attention_rows_propagates_nan_like_the_reference(n):
    """A NaN key poisons exactly the outputs whose queries see it, on either kernel (bf16)."""
    rng = np.random.default_rng(n)
    lengths = [40, 300]
    q, k, v, anc = ragged_rows(rng, lengths, 9, 3, n, 64, torch.bfloat16)
    k[1, 0, 200, 5] = float("nan")  # in row 1's prefix, kv head 0: query heads 0-2 of row 1 see it
    ours = torch.ops.specdec.tree_attention_rows(q, k, v, anc, torch.tensor(lengths), 0.125)
    assert ours[1, :, :3].isnan().all() and not ours[1, :, 3:].isnan().any() and not ours[0].isnan().any()
    expected = ops.tree_attention_reference(q[1:], k[1:, :, : 300 + n], v[1:, :, : 300 + n], anc[1], 300, 0.125)
    torch.testing.assert_close(ours[1:].float(), expected.float(), atol=2e-2, rtol=2e-2, equal_nan=True)


def test_tree_attention_rows_in_float64_takes_the_gemms():
    """Only bf16 / fp16 go to the direct kernel: a float64 call of a plain step's shape is exact."""
    rng = np.random.default_rng(11)
    lengths = [40, 3]
    q, k, v, anc = ragged_rows(rng, lengths, 9, 3, 1, 64, torch.float64)
    ours = torch.ops.specdec.tree_attention_rows(q, k, v, anc, torch.tensor(lengths), 0.125)
    assert ours.dtype == torch.float64
    for b, length in enumerate(lengths):
        expected = ops.tree_attention_reference(q[b : b + 1], k[b : b + 1, :, : length + 1],
                                                v[b : b + 1, :, : length + 1], anc[b], length, 0.125)
        torch.testing.assert_close(ours[b : b + 1], expected.to(torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_rows_reads_only_its_rows_of_whole_cache_buffers(dtype):
    """A compiled forward passes the cache's whole buffers: more rows than queries and keys past
    every row's slots, all poisoned here; the result is that of the exact-size call."""
    rng = np.random.default_rng(5)
    lengths, n, dim = [12, 40, 3], 7, 32
    q, k, v, anc = ragged_rows(rng, lengths, 4, 2, n, dim, dtype)
    exact = torch.ops.specdec.tree_attention_rows(q, k[:, :, : max(lengths) + n], v[:, :, : max(lengths) + n], anc,
                                                  torch.tensor(lengths), dim ** -0.5)
    poison = torch.full((2, *k.shape[1:]), 1e4, dtype=dtype)
    whole_k, whole_v = torch.cat([k, poison]), torch.cat([v, poison])  # [B + 2, Hkv, S, D]
    ours = torch.ops.specdec.tree_attention_rows(q, whole_k, whole_v, anc, torch.tensor(lengths), dim ** -0.5)
    assert torch.equal(ours, exact)
    with pytest.raises(RuntimeError, match="at least 3 rows"):
        torch.ops.specdec.tree_attention_rows(q, k[:2], v[:2], anc, torch.tensor(lengths), dim ** -0.5)


def test_kv_write_into_a_cache_with_more_rows_leaves_the_others():
    torch.manual_seed(1)
    keys, values = torch.randn(5, 2, 30, 8), torch.randn(5, 2, 30, 8)
    key_states, value_states = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    expected_k, expected_v = keys.clone(), values.clone()
    for r, offset in enumerate([3, 0, 26]):
        expected_k[r, :, offset : offset + 4] = key_states[r]
        expected_v[r, :, offset : offset + 4] = value_states[r]
    torch.ops.specdec.kv_write(keys, values, key_states, value_states, torch.tensor([3, 0, 26]))
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)


def test_tree_attention_rows_rejects_bad_lengths():
    q, k, v, anc = ragged_rows(np.random.default_rng(0), [3, 4], 4, 2, 5, 16, torch.float32, spare=0)
    with pytest.raises(RuntimeError, match="row 1's length 5 plus 5 slots"):
        torch.ops.specdec.tree_attention_rows(q, k, v, anc, torch.tensor([3, 5]), 0.25)
    with pytest.raises(RuntimeError, match="lengths must be"):
        torch.ops.specdec.tree_attention_rows(q, k, v, anc, torch.tensor([3]), 0.25)
    with pytest.raises(RuntimeError, match="ancestors must be"):
        torch.ops.specdec.tree_attention_rows(q, k, v, anc[0], torch.tensor([3, 4]), 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_puts_each_rows_slots_at_its_own_offset(dtype):
    torch.manual_seed(0)
    rows, heads, capacity, dim, queries = 4, 3, 40, 16, 6
    keys, values = torch.randn(rows, heads, capacity, dim).to(dtype), torch.randn(rows, heads, capacity, dim).to(dtype)
    # as a projection leaves them: [R, q, H, D] memory seen as [R, H, q, D] (not contiguous)
    key_states = torch.randn(rows, queries, heads, dim).to(dtype).transpose(1, 2)
    value_states = torch.randn(rows, queries, heads, dim).to(dtype).transpose(1, 2)
    offsets = [0, 17, 34, 5]
    expected_k, expected_v = keys.clone(), values.clone()
    for r, offset in enumerate(offsets):  # independent: a slice assignment per row
        expected_k[r, :, offset : offset + queries] = key_states[r]
        expected_v[r, :, offset : offset + queries] = value_states[r]
    torch.ops.specdec.kv_write(keys, values, key_states, value_states, torch.tensor(offsets))
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    with pytest.raises(RuntimeError, match="row 2's slots 35 .. 40 pass"):
        torch.ops.specdec.kv_write(keys, values, key_states, value_states, torch.tensor([0, 1, 35, 0]))
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.specdec.kv_write(keys[:3], values[:3], key_states, value_states, torch.tensor([0, 1, 2]))
    assert torch.equal(keys, expected_k)  # a refused write changed nothing


def test_kv_compact_matches_reference_on_narrowed_caches():
    torch.manual_seed(0)
    prefix_len, keep = 6, torch.tensor([0, 2, 3, 7])
    layers = [torch.randn(1, 2, 20, 8)[:, :, :15] for _ in range(3)]  # narrowed views, as after a compaction
    values = [torch.randn(1, 2, 15, 8) for _ in range(3)]
    expected_k, expected_v = [t.clone() for t in layers], [t.clone() for t in values]
    ops.kv_compact_reference(expected_k, expected_v, prefix_len, keep)
    torch.ops.specdec.kv_compact(layers, values, prefix_len, keep)
    for ours, ref in zip(layers + values, expected_k + expected_v):
        assert torch.equal(ours[:, :, : prefix_len + 4], ref[:, :, : prefix_len + 4])
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.specdec.kv_compact(layers, values, prefix_len, torch.tensor([2, 1]))


def test_opcheck():
    q, k, v, anc = random_inputs(np.random.default_rng(2), 1, 6, 2, 7, 5, 16, torch.float32)
    torch.library.opcheck(torch.ops.specdec.tree_attention.default, (q, k, v, anc, 5, 0.25))
    q, k, v, anc = ragged_rows(np.random.default_rng(3), [4, 0, 9], 6, 2, 7, 16, torch.float32)
    torch.library.opcheck(torch.ops.specdec.tree_attention_rows.default, (q, k, v, anc, torch.tensor([4, 0, 9]), 0.25))
    keys = [torch.randn(1, 2, 12, 4) for _ in range(2)]
    values = [torch.randn(1, 2, 12, 4) for _ in range(2)]
    torch.library.opcheck(torch.ops.specdec.kv_write.default, (torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4),
                          torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.tensor([1, 6])))
    torch.library.opcheck(torch.ops.specdec.kv_compact.default, (keys, values, 4, torch.tensor([0, 3, 5])))


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_tree_forward_logits_equal_with_and_without_the_kernel(make_model):
    model = make_model()
    kernel = specdec.SpeculativeDecoder(model, tree_kernel=True).kernel
    rng = np.random.default_rng(4)
    prompt = torch.randint(3, 96, (1, 40))
    for prefix_len in (0, 1, 39):
        tree = random_tree(rng, 12, vocab=96)
        logits = []
        batch = upload_rows([RowTree(tree, int(prompt[0, prefix_len]), length=prefix_len)], [prefix_len],
                            HostBuffer(torch.device("cpu")))
        for use_kernel in (kernel, None):
            cache = RowCache.for_model(model)
            cache.fit(1, 64)
            with torch.no_grad():
                if prefix_len:
                    prefill_row(model, cache, 0, prompt[0, :prefix_len], 1)
                logits.append(verify_rows(model, cache, batch, use_kernel)[0])
        torch.testing.assert_close(logits[0], logits[1], atol=2e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # switched back after each verify forward


@pytest.mark.parametrize("tree_kernel", [True, False], ids=["extension", "sdpa-mask"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_greedy_equality_with_extension_on_and_off(make_model, tree_kernel):
    model = make_model()
    prompt = torch.tensor([[5, 17, 33, 8, 41, 17, 33, 9]])
    reference = hf_greedy(model, prompt, 40)
    drafters = ["recycling", "ngram", "recycling+ngram", ScriptedDrafter(reference[0], depth=5),
                ScriptedDrafter(reference[0], depth=5, corrupt=lambda step, d: (step + d) % 3 == 0)]
    for drafter in drafters:
        decoder = specdec.SpeculativeDecoder(model, drafter=drafter, tree_budget=10, tree_kernel=tree_kernel)
        assert (decoder.kernel is not None) == tree_kernel
        out = decoder.generate(prompt, max_new_tokens=40, eos_token_id=-1)
        assert out.tolist() == reference.tolist(), drafter
    assert decoder.last_stats.mean_accepted_tokens > 1.5


def test_disable_env_forces_the_torch_path():
    script = (
        "import torch, specdec; from specdec.device import ops; from tests.conftest import tiny_llama, hf_greedy\n"
        "assert not ops.load() and 'SPECDEC_DISABLE_EXT' in ops.status()\n"
        "m = tiny_llama(); p = torch.tensor([[5, 6, 7, 5, 6]])\n"
        "d = specdec.SpeculativeDecoder(m, tree_budget=8)\n"
        "assert d.kernel is None\n"
        "assert torch.equal(d.generate(p, max_new_tokens=20, eos_token_id=-1), hf_greedy(m, p, 20))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SPECDEC_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT_DIR, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_lossless_suites_pass_with_the_extension_forced_off():
    """The greedy-equality and verification suites again, in a process with SPECDEC_DISABLE_EXT=1
    (this process runs them with the extension on)."""
    env = dict(os.environ, SPECDEC_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_lossless.py",
                             "tests/test_verify.py"],
                            cwd=ROOT_DIR, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "csrc"
    broken.mkdir()
    (broken / "specdec_ops.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(ops, "CSRC", broken)
    monkeypatch.setenv(ops.BUILD_DIR_ENV, str(tmp_path / "build"))
    monkeypatch.setattr(ops, "_state", {"tried": False, "loaded": False, "error": None})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not ops.load()
    assert not ops.load()  # tried once, no second build or warning
    q, k, v, anc = random_inputs(np.random.default_rng(5), 1, 2, 1, 4, 3, 8, torch.float32)
    torch.testing.assert_close(ops.tree_attention(q, k, v, anc, 3, 0.3),
                               ops.tree_attention_reference(q, k, v, anc, 3, 0.3))


def test_kernel_required_on_an_unsupported_model_is_a_clear_error():
    model = tiny_llama()
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="tree_kernel=True"):
        specdec.SpeculativeDecoder(model, tree_kernel=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_sources_compile(tmp_path):
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = ["nvcc", "-c", str(ROOT_DIR / "csrc" / "specdec_ops_cuda.cu"), "-o", str(tmp_path / "ops.o"),
               "-std=c++17", "--expt-relaxed-constexpr", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               "-DTORCH_EXTENSION_NAME=specdec_ops", "-Xcompiler", "-fPIC"]
    command += [f"-I{path}" for path in include_paths()]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ops.o").stat().st_size > 0


def test_a_killed_build_never_blocks_later_builds(tmp_path):
    """torch's build baton is a plain file: a build killed mid-way leaves it behind. The next load
    (under specdec's own OS-released lock) removes it instead of waiting forever."""
    sources = [ops.CSRC / name for name in ops.CPU_SOURCES]
    built = ops.build_directory(sources)
    copy = tmp_path / built.name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "build.lock"))
    (copy / "lock").write_text("")  # the baton of a build that was killed
    script = "from specdec.device import ops; assert ops.load(), ops.status(); print('ok')"
    env = dict(os.environ, **{ops.BUILD_DIR_ENV: str(tmp_path)})
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT_DIR, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert not (copy / "lock").exists()
