"""What lives and runs on the model's device: tree tensors (`tree`), KV compaction (`kv`), the
tree-attention kernel (`attention`) and the csrc operators behind them (`ops`), row reductions
(`reductions`), and trees through recurrent layers of hybrid and state-space models (`hybrid`: their
seams, states per row). Imports nothing from the step above it."""
