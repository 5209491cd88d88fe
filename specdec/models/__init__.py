"""Model loading: the embedded real models and named checkpoints (`loading`), tiny random models
for tests (`random_models`), tensor parallelism under torchrun (`distributed`), chat templates
(`prompts`)."""
