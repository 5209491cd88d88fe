"""Serving applications over a decoder: multi-turn chat sessions (`session`) and the
OpenAI-compatible HTTP server of `specdec serve` (`server`, `openai_api`, `text_stream`)."""
