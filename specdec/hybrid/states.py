"""One cache layer's conv and recurrent states, a row per sequence, and every tree node's while a
tree is verified.

A recurrent layer keeps, per row, what it needs to continue: ``conv[i]`` the last K inputs of
its i-th causal convolution (``[R, C, K]``) and ``recurrent[i]`` its state (``[R, *S]``, fp32 in
the SSM and delta-rule layers). A prefill chunk (a forward of one row, transformers' own seam
functions) reads and replaces the row's states as transformers' ``LinearAttentionLayer`` does.
A verify forward (`specdec.hybrid.levels.active`) never changes them: the tree seams hand the
layer every node's state (``[B, q, ...]``), and `commit` copies the accepted path's last node's
into the row, so rejected nodes leave no trace and a failed step none at all.
"""

from __future__ import annotations

import torch

from specdec.hybrid.levels import active


class RowStates:
    """The states of one recurrent layer for ``rows`` rows (allocated at the first forward that
    shows their shapes)."""

    def __init__(self) -> None:
        self.conv: dict[int, torch.Tensor] = {}  # state_idx -> [R, C, K]
        self.recurrent: dict[int, torch.Tensor] = {}  # state_idx -> [R, *S]
        self.node_conv: dict[int, torch.Tensor] = {}  # state_idx -> [B, q, C, K] of the last verify forward
        self.node_recurrent: dict[int, torch.Tensor] = {}  # state_idx -> [B, q, *S]
        self.rows = 0

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.recurrent.values()))

    # ------------------------------------------------------------------ sizing and rows
    def resize(self, rows: int) -> None:
        """Exactly ``rows`` rows, keeping the first ``min(rows, old rows)``; new rows are zero."""
        for table in (self.conv, self.recurrent):
            for idx, old in table.items():
                fresh = old.new_zeros(rows, *old.shape[1:])
                kept = min(rows, old.shape[0])
                fresh[:kept] = old[:kept]
                table[idx] = fresh
        self.rows = rows

    def clear_row(self, row: int) -> None:
        """Row ``row`` holds no history: zero states."""
        for table in (self.conv, self.recurrent):
            for state in table.values():
                state[row].zero_()

    def move_row(self, source: int, target: int) -> None:
        for table in (self.conv, self.recurrent):
            for state in table.values():
                state[target] = state[source]

    def snapshot_row(self, row: int) -> dict[str, dict[int, torch.Tensor]]:
        """Copies of row ``row``'s states (`load_row` takes them back)."""
        return {"conv": {i: s[row].clone() for i, s in self.conv.items()},
                "recurrent": {i: s[row].clone() for i, s in self.recurrent.items()}}

    def load_row(self, row: int, saved: dict[str, dict[int, torch.Tensor]]) -> None:
        for name, table in (("conv", self.conv), ("recurrent", self.recurrent)):
            for idx, state in saved[name].items():
                if idx not in table:
                    table[idx] = state.new_zeros(self.rows, *state.shape)
                table[idx][row] = state

    def commit(self, row: int, node: int, slot: int) -> None:
        """Row ``row`` := the state after slot ``slot`` of row ``node`` of the last verify forward."""
        for table, nodes in ((self.conv, self.node_conv), (self.recurrent, self.node_recurrent)):
            for idx, states in nodes.items():
                table[idx][row] = states[node, slot]

    # ------------------------------------------------------------------ what the seams call
    def get(self, table: dict[int, torch.Tensor], idx: int, start: int, rows: int, has_previous: bool):
        """A verify forward: ``[B, ...]`` views of its rows; a prefill chunk: ``[1, ...]`` of its row,
        or None when the row holds no history yet (transformers then takes its prefill path)."""
        state = table.get(idx)
        if state is None or (active() is None and not has_previous):
            return None
        return state[start : start + rows]

    def update_conv(self, conv_states: torch.Tensor, idx: int, row: int, has_previous: bool,
                    kernel_size: int | None) -> torch.Tensor:
        """A verify forward: keep ``[B, q, C, K]`` node states. A prefill chunk of row ``row``:
        ``conv_states [1, C, m]`` are the chunk's inputs; return the window the convolution runs
        over (the row's last inputs, or zeros, then the chunk) and keep its last K columns."""
        if active() is not None:
            self._allocate(self.conv, idx, conv_states[0, 0])
            self.node_conv[idx] = conv_states
            return conv_states
        size = kernel_size or (self.conv[idx].shape[-1] if idx in self.conv else conv_states.shape[-1])
        self._allocate(self.conv, idx, conv_states.new_zeros(conv_states.shape[1], size))
        previous = self.conv[idx][row : row + 1]  # [1, C, K]
        if has_previous:
            window = torch.cat([previous, conv_states], dim=-1)
        else:
            window = torch.nn.functional.pad(conv_states, (max(size - conv_states.shape[-1], 0), 0))
        previous.copy_(window[..., -size:])
        return window

    def update_recurrent(self, recurrent_states: torch.Tensor, idx: int, row: int) -> torch.Tensor:
        """A verify forward: keep ``[B, q, *S]`` node states. A prefill chunk: the row's new state
        ``[1, *S]``."""
        if active() is not None:
            self._allocate(self.recurrent, idx, recurrent_states[0, 0])
            self.node_recurrent[idx] = recurrent_states
            return recurrent_states
        self._allocate(self.recurrent, idx, recurrent_states[0])
        self.recurrent[idx][row] = recurrent_states[0]
        return self.recurrent[idx][row : row + 1]

    def _allocate(self, table: dict[int, torch.Tensor], idx: int, like: torch.Tensor) -> None:
        if idx not in table:
            table[idx] = like.new_zeros(self.rows, *like.shape)
