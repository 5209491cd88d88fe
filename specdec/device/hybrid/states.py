"""One cache layer's conv and recurrent states, a row per sequence, and every tree node's while a
tree is verified.

A recurrent layer keeps, per row, what it needs to continue: ``conv[i]`` the last K inputs of
its i-th causal convolution (``[R, C, K]``) and ``recurrent[i]`` its state (``[R, *S]``, fp32 in
the SSM and delta-rule layers). A prefill chunk (a forward of one row, transformers' own seam
functions) reads and replaces the row's states as transformers' ``LinearAttentionLayer`` does.
A verify forward (`specdec.device.hybrid.levels.active`) never changes them: the tree seams hand the
layer every node's state (``[B, q, ...]``), and `commit` copies the accepted path's last node's
into the row, so rejected nodes leave no trace and a failed step none at all.
"""

from __future__ import annotations

import torch

from specdec.device.hybrid.levels import active


class RowStates:
    """The states of one recurrent layer for ``rows`` rows (allocated at the first forward that
    shows their shapes), and every node's of the verify forward under way (rows ``tree_rows``)."""

    def __init__(self) -> None:
        self.conv: dict[int, torch.Tensor] = {}  # state_idx -> [R, C, K]
        self.recurrent: dict[int, torch.Tensor] = {}  # state_idx -> [R, *S]
        self.node_conv: dict[int, torch.Tensor] = {}  # state_idx -> [B, q, C, K] of the last verify forward
        self.node_recurrent: dict[int, torch.Tensor] = {}  # state_idx -> [B, q, *S]
        self.tree_rows: range = range(0)  # the cache rows of that forward, node row b = cache row start + b
        self.rows = 0

    @property
    def bytes(self) -> int:
        """Bytes the rows' states hold (per-node states of a verify forward are its activations)."""
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.recurrent.values()))

    # ------------------------------------------------------------------ sizing and rows
    def resized(self, rows: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """New conv and recurrent tables of ``rows`` rows, the first ``min(rows, old rows)`` copied
        and the rest zero; this layer is unchanged until `adopt` (an allocation failure leaves it whole)."""
        tables = []
        for table in (self.conv, self.recurrent):
            fresh = {}
            for idx, old in table.items():
                fresh[idx] = old.new_zeros(rows, *old.shape[1:])
                kept = min(rows, old.shape[0])
                fresh[idx][:kept] = old[:kept]
            tables.append(fresh)
        return tables[0], tables[1]

    def adopt(self, rows: int, tables: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]) -> None:
        """Take the tables `resized` made for ``rows`` rows."""
        self.conv, self.recurrent = tables
        self.rows = rows
        self.release_nodes()

    def release_nodes(self) -> None:
        """Forget the per-node states of the last verify forward."""
        self.node_conv, self.node_recurrent, self.tree_rows = {}, {}, range(0)

    def clear_row(self, row: int) -> None:
        """Row ``row`` holds no history: zero states."""
        for table in (self.conv, self.recurrent):
            for state in table.values():
                state[row].zero_()

    def move_row(self, source: int, target: int) -> None:
        """Row ``target`` := row ``source``'s states."""
        for table in (self.conv, self.recurrent):
            for state in table.values():
                state[target] = state[source]
        self.release_nodes()

    def snapshot_row(self, row: int) -> dict[str, dict[int, torch.Tensor]]:
        """Copies of row ``row``'s states (`load_row` takes them back)."""
        return {"conv": {i: s[row].clone() for i, s in self.conv.items()},
                "recurrent": {i: s[row].clone() for i, s in self.recurrent.items()}}

    def load_row(self, row: int, saved: dict[str, dict[int, torch.Tensor]]) -> None:
        """Row ``row`` := states saved by `snapshot_row`."""
        self.clear_row(row)
        for name, table in (("conv", self.conv), ("recurrent", self.recurrent)):
            for idx, state in saved[name].items():
                if idx not in table:
                    table[idx] = state.new_zeros(self.rows, *state.shape)
                table[idx][row] = state

    def commit(self, row: int, slot: int) -> None:
        """Row ``row`` := its state after slot ``slot`` of the verify forward under way."""
        if row not in self.tree_rows:
            raise ValueError(f"row {row} was not in the last verify forward (rows {self.tree_rows})")
        node = row - self.tree_rows.start
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
        """A verify forward from row ``row``: keep ``[B, q, C, K]`` node states. A prefill chunk of row ``row``:
        ``conv_states [1, C, m]`` are the chunk's inputs; return the window the convolution runs
        over (the row's last inputs, or zeros, then the chunk) and keep its last K columns."""
        if active() is not None:
            self._allocate(self.conv, idx, conv_states[0, 0])
            self.node_conv[idx] = conv_states
            self.tree_rows = range(row, row + conv_states.shape[0])
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
        """A verify forward from row ``row``: keep ``[B, q, *S]`` node states. A prefill chunk of row
        ``row``: its new state ``[1, *S]``."""
        if active() is not None:
            self._allocate(self.recurrent, idx, recurrent_states[0, 0])
            self.node_recurrent[idx] = recurrent_states
            self.tree_rows = range(row, row + recurrent_states.shape[0])
            return recurrent_states
        self._allocate(self.recurrent, idx, recurrent_states[0])
        self.recurrent[idx][row] = recurrent_states[0]
        return self.recurrent[idx][row : row + 1]

    def _allocate(self, table: dict[int, torch.Tensor], idx: int, like: torch.Tensor) -> None:
        if idx not in table:
            table[idx] = like.new_zeros(self.rows, *like.shape)
