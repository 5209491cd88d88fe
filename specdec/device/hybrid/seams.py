"""The order-dependent functions of transformers' recurrent mixers, made tree-aware.

transformers 5.25 factors what these mixers do in sequence order into module-level functions,
the same in every family that uses them:

- ``causal_conv1d_forward``: the short causal convolution (every hybrid, and LFM2's ``ShortConv``);
- ``mamba2_scan_forward``: Mamba-2's SSD scan (mamba2, bamba, falcon_h1, granitemoehybrid, nemotron_h, zamba2);
- ``mamba_scan_forward``: Mamba-1's selective scan (mamba, falcon_mamba, jamba);
- ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``: Gated DeltaNet (qwen3_5,
  qwen3_next, olmo_hybrid, ...); ``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention``:
  Kimi Delta Attention (kimi_linear, bailing_hybrid).

`install` wraps them in a model's modeling module (once; the module's mixers look them up there at
call time). A wrapper hands every call to the original unchanged unless a specdec verify forward
is running on this thread (`specdec.device.hybrid.levels.active`); then it steps the layer's state along
the tree depth by depth with the model's own single-token function (`specdec.device.hybrid.levels.walk`)
and hands the cache every node's state (`specdec.device.hybrid.states`), from which the accepted path's
is kept. Mixer classes not listed in `MIXERS` are refused (`unknown_mixers`).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref

import torch
from transformers.activations import ACT2FN

from specdec.device.hybrid.levels import TreeLevels, active, walk

# Mixer classes whose order-dependent work goes through the seams below, by kind.
GATED_DELTA = "Gated DeltaNet"
KIMI_DELTA = "Kimi Delta Attention"
MAMBA2 = "Mamba-2 SSD"
MAMBA1 = "Mamba-1 selective scan"
SHORT_CONV = "short convolution"
MIXERS = {
    "Qwen3_5GatedDeltaNet": GATED_DELTA, "Qwen3_5MoeGatedDeltaNet": GATED_DELTA,
    "Qwen3NextGatedDeltaNet": GATED_DELTA, "OlmoHybridGatedDeltaNet": GATED_DELTA,
    "LaraMiniGatedDeltaNet": GATED_DELTA, "Qwen4ExpTextGatedDeltaNet": GATED_DELTA,
    "KimiLinearDeltaAttention": KIMI_DELTA, "BailingHybridDeltaAttention": KIMI_DELTA,
    "Mamba2Mixer": MAMBA2, "BambaMixer": MAMBA2, "FalconH1Mixer": MAMBA2, "GraniteMoeHybridMambaLayer": MAMBA2,
    "NemotronHMamba2Mixer": MAMBA2, "Zamba2MambaMixer": MAMBA2,
    "MambaMixer": MAMBA1, "FalconMambaMixer": MAMBA1, "JambaMambaMixer": MAMBA1,
    "Lfm2ShortConv": SHORT_CONV, "Lfm2MoeShortConv": SHORT_CONV, "Lfm3ShortConv": SHORT_CONV,
}
# What each kind calls, beside the convolution every kind but the short convolution's has too.
SEAMS = {
    GATED_DELTA: ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
    KIMI_DELTA: ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention"),
    MAMBA2: ("mamba2_scan_forward",),
    MAMBA1: ("mamba_scan_forward",),
    SHORT_CONV: (),
}
# Single-token functions the tree steps call, by the seam they replace (read from the same module).
STEPPERS = {
    "causal_conv1d_forward": "causal_conv1d_update",
    "torch_chunk_gated_delta_rule": "torch_recurrent_gated_delta_rule",
    "torch_recurrent_gated_delta_rule": "torch_recurrent_gated_delta_rule",
    "chunk_kimi_delta_attention": "recurrent_kimi_delta_attention",
    "recurrent_kimi_delta_attention": "recurrent_kimi_delta_attention",
    "mamba2_scan_forward": "mamba2_selective_state_update",
    "mamba_scan_forward": "mamba_selective_state_update",
}
_ORIGINAL = "__specdec_original__"  # on a wrapper: the function it wraps
_lock = threading.Lock()
_installed_for: "weakref.WeakSet" = weakref.WeakSet()  # models `installed` found wrapped


def recurrent_mixers(model) -> dict[str, str]:
    """The classes of ``model``'s modules that keep state between tokens, by kind (`MIXERS`), and
    unknown ones (kind None): modules with a ``conv1d`` or an ``A_log`` beside a ``layer_idx``."""
    found = {}
    for module in model.modules():
        name = type(module).__name__
        if name in MIXERS:
            found[name] = MIXERS[name]
        elif hasattr(module, "layer_idx") and (hasattr(module, "conv1d") or hasattr(module, "A_log")):
            found[name] = None
    return found


def unknown_mixers(model) -> list[str]:
    """Names of ``model``'s recurrent mixer classes specdec cannot verify trees through."""
    unknown = [name for name, kind in recurrent_mixers(model).items() if kind is None]
    for module in model.modules():
        kind = MIXERS.get(type(module).__name__)
        if kind is not None:
            namespace = sys.modules[type(module).__module__]
            seams = ("causal_conv1d_forward", *SEAMS[kind])
            needed = seams + tuple(STEPPERS[name] for name in seams)
            if not all(callable(getattr(namespace, name, None)) for name in needed):  # another version's module
                unknown.append(type(module).__name__)
    return sorted(set(unknown))


def install(model) -> None:
    """Wrap the seams in the modeling module of each of ``model``'s known mixers (idempotent)."""
    with _lock:
        for module in model.modules():
            kind = MIXERS.get(type(module).__name__)
            if kind is None:
                continue
            namespace = sys.modules[type(module).__module__]
            for name in ("causal_conv1d_forward", *SEAMS[kind]):
                original = getattr(namespace, name)
                if hasattr(original, _ORIGINAL):
                    continue
                stepper = getattr(namespace, STEPPERS[name])  # the recurrent delta rule is a seam too
                setattr(namespace, name, _wrap(name, original, getattr(stepper, _ORIGINAL, stepper)))


def installed(model) -> bool:
    """Whether every seam ``model``'s known mixers call is wrapped (`install`; once wrapped, a seam
    stays wrapped, so a model found so is remembered)."""
    if model in _installed_for:
        return True
    for module in model.modules():
        kind = MIXERS.get(type(module).__name__)
        if kind is not None:
            namespace = sys.modules[type(module).__module__]
            if not all(hasattr(getattr(namespace, name), _ORIGINAL) for name in ("causal_conv1d_forward",
                                                                                 *SEAMS[kind])):
                return False
    _installed_for.add(model)
    return True


def _wrap(name: str, original, stepper):
    tree_version = {
        "causal_conv1d_forward": _tree_conv, "mamba2_scan_forward": _tree_mamba2, "mamba_scan_forward": _tree_mamba1,
    }.get(name, _tree_delta_rule)
    # transformers may wrap a seam in a module (its kernel hub's ``Func``): its forward has the signature
    signature = inspect.signature(original.forward if isinstance(original, torch.nn.Module) else original)

    def seam(*args, **kwargs):
        levels = active()
        if levels is None:
            chain = _chain_for(name, signature, args, kwargs)
            if chain is None:
                return original(*args, **kwargs)
            levels = chain
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        return tree_version(levels, stepper, arguments.arguments)

    setattr(seam, _ORIGINAL, original)
    return seam


def _chain_for(name: str, signature, args, kwargs) -> TreeLevels | None:
    """Mamba-1's multi-token scan ignores the cached state (a second prefill chunk would start
    from zeros); a chunk of a specdec row that already holds state goes through the tree path as
    a chain instead. None for every other call."""
    if name != "mamba_scan_forward":
        return None
    arguments = signature.bind(*args, **kwargs).arguments
    cache, hidden = arguments.get("cache"), arguments["hidden_states"]
    if not getattr(cache, "holds_rows", False) or hidden.shape[-1] == 1:
        return None
    if not cache.has_previous_state(arguments["module"].layer_idx, 0):
        return None
    return _chain(hidden.shape[-1], hidden.device)


@functools.lru_cache(maxsize=64)
def _chain(queries: int, device: torch.device) -> TreeLevels:
    return TreeLevels.chain(queries, device)


# ---------------------------------------------------------------------- the tree versions
def _tree_conv(levels: TreeLevels, update, a: dict) -> torch.Tensor:
    """``causal_conv1d_forward`` over a tree: ``hidden_states [B, C, q]`` -> ``[B, C, q]``; each
    node's window is its root path, then the row's cached conv state."""
    conv1d, hidden, cache, layer_idx, state_idx = (a["conv1d"], a["hidden_states"], a["cache"], a["layer_idx"],
                                                   a["state_idx"])
    # The product in fp32 whatever the model's dtype (a bf16 depthwise conv1d on a CPU without AVX-512
    # takes ~100x the fp32 one: 77 against 0.75 ms for 6144 channels), rounded to the model's dtype
    # before the activation, as the model's own bf16 convolution rounds; the window is only moved.
    activation = ACT2FN[a["activation"]] if a["activation"] is not None else None
    weight = conv1d.weight.squeeze(1).float()
    bias = conv1d.bias.float() if conv1d.bias is not None else None
    cached = cache.get_conv_state(layer_idx, state_idx=state_idx)  # [B, C, K]
    if cached is None:
        cached = hidden.new_zeros(hidden.shape[0], hidden.shape[1], conv1d.kernel_size[0])

    def step(states, rows, slots):  # states [m, C, K], moved in place by the model's own function
        window = states.float()
        out = update(hidden[rows, :, slots][..., None].float(), window, weight, bias)[..., 0].to(hidden.dtype)
        return window.to(states.dtype), out if activation is None else activation(out)  # [m, C, K], [m, C]

    node_states, outputs = walk(levels, cached, step)  # [B, q, C, K], [B, q, C]
    cache.update_conv_state(node_states, layer_idx, state_idx=state_idx, conv_kernel_size=conv1d.kernel_size[0])
    return outputs.transpose(1, 2)


def _tree_mamba2(levels: TreeLevels, update, a: dict) -> torch.Tensor:
    """``mamba2_scan_forward`` over a tree: ``hidden_states [B, q, H*P]`` -> ``[B, q, H*P]``,
    each node by the recurrent form ``mamba2_scan_forward`` uses for one cached token."""
    module, hidden, B, C, dt, cache = (a[k] for k in ("module", "hidden_states", "B", "C", "dt", "cache"))
    heads, head_dim, groups, size = module.num_heads, module.head_dim, module.n_groups, module.ssm_state_size
    A = (-torch.exp(module.A_log.float()))[:, None, None].expand(-1, head_dim, size)
    D = module.D[:, None].expand(-1, head_dim)
    dt_bias = module.dt_bias[:, None].expand(-1, head_dim)
    cached = cache.get_recurrent_state(module.layer_idx, state_idx=0)  # [B, H, P, N] fp32
    if cached is None:
        cached = A.new_zeros(hidden.shape[0], heads, head_dim, size)

    def step(states, rows, slots):
        m = rows.numel()
        out = update(states, hidden[rows, slots].view(m, heads, head_dim),
                     dt[rows, slots][:, :, None].expand(-1, -1, head_dim), A,
                     B[rows, slots].view(m, groups, size), C[rows, slots].view(m, groups, size), D, z=None,
                     dt_bias=dt_bias, dt_softplus=True)
        return states, out.view(m, heads * head_dim)

    node_states, outputs = walk(levels, cached, step)  # [B, q, H, P, N], [B, q, H*P]
    cache.update_recurrent_state(node_states, module.layer_idx)
    return outputs


def _tree_mamba1(levels: TreeLevels, update, a: dict) -> torch.Tensor:
    """``mamba_scan_forward`` over a tree: ``hidden_states [B, I, q]`` -> ``[B, I, q]``, each node
    by the recurrent form ``mamba_scan_forward`` uses for one cached token."""
    module, hidden, time_step, B, C, gate, cache = (a[k] for k in ("module", "hidden_states", "time_step", "B", "C",
                                                                   "gate", "cache"))
    A = -torch.exp(module.A_log.float())  # [I, N]
    bias = module.dt_proj.bias.float() if module.dt_proj.bias is not None else None
    cached = cache.get_recurrent_state(module.layer_idx, state_idx=0)  # [B, I, N]
    if cached is None:
        cached = A.new_zeros(hidden.shape[0], *A.shape)

    def step(states, rows, slots):
        out = update(states, hidden[rows, :, slots], time_step[rows, :, slots], A, B[rows, slots], C[rows, slots],
                     module.D, z=gate[rows, :, slots], dt_bias=bias, dt_softplus=True)
        return states, out  # [m, I, N], [m, I]

    node_states, outputs = walk(levels, cached, step)  # [B, q, I, N], [B, q, I]
    if active() is not levels:  # a prefill chunk walked as a chain (`_chain_for`): the cache keeps its last state
        cache.update_recurrent_state(node_states[:, -1], module.layer_idx)
    else:
        cache.update_recurrent_state(node_states, module.layer_idx)
    return outputs.transpose(1, 2)


def _tree_delta_rule(levels: TreeLevels, recurrent, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A delta-rule seam (Gated DeltaNet, Kimi Delta Attention) over a tree: ``query, key``
    ``[B, q, H, dk]``, ``value [B, q, Hv, dv]``, ``g``, ``beta`` -> ``(out [B, q, Hv, dv], node
    states [B, q, Hv, dk, dv])``; the mixer hands the node states to the cache."""
    query, key, value, g, beta, cached = (a[k] for k in ("query", "key", "value", "g", "beta", "initial_state"))
    if cached is None:
        cached = value.new_zeros(value.shape[0], value.shape[2], key.shape[-1], value.shape[-1], dtype=torch.float32)
    l2norm = a["use_qk_l2norm_in_kernel"]

    def step(states, rows, slots):
        picked = [t[rows, slots][:, None] for t in (query, key, value, g, beta)]  # [m, 1, ...] each
        out, new = recurrent(*picked[:3], g=picked[3], beta=picked[4], initial_state=states, output_final_state=True,
                             use_qk_l2norm_in_kernel=l2norm)
        return new, out[:, 0]

    node_states, outputs = walk(levels, cached, step)
    return outputs, node_states
