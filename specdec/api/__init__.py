"""The public API with Hugging Face semantics: `SpeculativeDecoder` (`decoder`), `generate`,
`patch`, and the translation of ``generate()`` arguments into decode requests (`arguments`,
`validation`, `generation`, `batch_generate`)."""
