"""One rank of the tensor-parallel test (`tests/test_tensor_parallel.py`), run under torchrun.

Loads the model directory given as argv[1] sharded across the job's ranks and writes this rank's
outputs (greedy for every drafter, the scheduler on and off, and a seeded sampled run) to
``argv[2]/rank<R>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from specdec import SpeculativeDecoder, load_model

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 12, 9, 10]]
RUNS = [("recycling", None), ("ngram", None), ("auto", None), ("auto", 8), ("recycling+ngram", 4)]
NEW = 24


def main(model_dir: str, out_dir: str) -> None:
    model, tokenizer = load_model(model_dir, dtype="fp32", tensor_parallel=True)
    rank = dist.get_rank()
    results = {"rank": rank, "sharded": SpeculativeDecoder(model).sharded, "greedy": {}, "sampled": []}
    for drafter, budget in RUNS:
        decoder = SpeculativeDecoder(model, tokenizer, drafter=drafter, tree_budget=budget)
        results["greedy"][f"{drafter}@{budget}"] = [
            decoder.generate(torch.tensor([p]), max_new_tokens=NEW, eos_token_id=-1)[0].tolist() for p in PROMPTS]
    decoder = SpeculativeDecoder(model, tokenizer)
    for seed in (1, 2):
        out = decoder.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW, eos_token_id=-1, do_sample=True,
                               temperature=0.9, generator=seed)
        results["sampled"].append(out[0].tolist())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
