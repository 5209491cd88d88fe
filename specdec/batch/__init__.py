"""Batched verification: many sequences' trees verified in one forward (`engine`, `verify`,
`tree`, `cache`), shared by concurrent callers through one `batcher.Batcher` per decoder."""
