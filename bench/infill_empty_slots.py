"""Empty-slot rate of the README's infill examples, with the filler as a default (min_tokens=0, the old
behaviour) vs a weighed choice (min_tokens=1, the server's default now), on the shipped default model.

    .venv/bin/python bench/infill_empty_slots.py [--seeds 20] [--model DIR]

Each example runs through `deployments.requests.prepare` (the Router's validation and layout) and the plain
reference loop `model.sampling.generate.generate`, once per seed and setting. A slot is empty when every one
of its positions holds the filler. Prints per example and setting: empty slots / slots, and seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.env import DEFAULT_MODEL_PATH  # noqa: E402
from deployments.requests import RequestLimits, prepare  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.sampling.generate import generate  # noqa: E402
from model.sampling.params import SamplingParams  # noqa: E402
from model.structured.templates import fill  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights import load_model  # noqa: E402
from protos.blockserve.v1 import blockserve_pb2 as pb  # noqa: E402

EXAMPLES = {  # the README's Python snippet and CLI example
    "python snippet": ("# utilities\n", ["def read(path):\n    ", ("body", 24), "\n"]),
    "cli": ("# read a file", ["def read(path):\n    ", ("body", 24), "\n    return ", ("result", 8), "\n"]),
}


def request(prompt: str, parts, seed: int, min_tokens: int) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, seed=seed)
    for part in parts:
        if isinstance(part, str):
            req.template.parts.add(text=part)
        else:
            req.template.parts.add(slot=pb.Slot(name=part[0], max_tokens=part[1], min_tokens=min_tokens))
    return req


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--seeds", type=int, default=20)
    args = p.parse_args()
    cfg = ModelConfig.from_file(args.model)
    tok = Tokenizer.from_dir(args.model, pad_id=cfg.pad_token_id, bos_id=cfg.bos_token_id)
    model = load_model(args.model).eval()
    print(f"model {args.model}, {args.seeds} seeds per example and setting, default sampling settings")
    print(f"{'example':<16}{'min_tokens':>11}{'empty slots':>14}{'seconds':>9}")
    for name, (prompt, parts) in EXAMPLES.items():
        for least in (0, 1):
            empty = total = 0
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                prepared = prepare(
                    request(prompt, parts, seed, least),
                    tok,
                    cfg,
                    SamplingParams(),
                    RequestLimits(),
                    f"b{seed}",
                )
                with torch.no_grad():
                    out = generate(
                        model,
                        prepared.engine.prompt_ids,
                        prepared.engine.params,
                        seed=seed,
                        constraints=prepared.engine.constraints,
                    )
                slots = fill(prepared.layout, out.token_ids, tok).slots
                empty += sum(1 for s in slots.values() if not s.token_ids)
                total += len(slots)
            print(f"{name:<16}{least:>11}{f'{empty}/{total}':>14}{time.perf_counter() - t0:>9.1f}")


if __name__ == "__main__":
    main()
