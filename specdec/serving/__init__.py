"""Serving many sequences at once: batched tree verification, continuous batching, and the
OpenAI-compatible HTTP server (`specdec serve`)."""
