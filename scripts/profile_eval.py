"""Before / after of the eval hot path: gold log-probs in small chunks vs one big log-softmax.

Times evaluate.score_tokens (the eval stage's and the bench's scoring) on the default model for the base LM and
base + a 4-block memory, with gold_logprobs' chunking as shipped (head on 256 rows, float32 log-softmax on 32)
and as before (head and float32 log-softmax on 2048 rows at a time, as the LM head was; the memory's used to run
on a whole batch, up to 4096 rows, so "before" flatters it), interleaved, fastest of --repeats passes. Usage: python scripts/profile_eval.py [--tokens 2048] [--repeats 3]
"""

import argparse
import time

import torch

from mlpmem import bench
from mlpmem.components import scoring as evaluate
from mlpmem.components.capture import resolve_hook
from mlpmem.config import load_config
from mlpmem.components.lm import load_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    a = ap.parse_args()
    cfg = load_config(None, {"model.dtype": a.dtype, "bench.tokens": a.tokens, "bench.real_keys": 100,
                             "bench.memory_blocks": [4]})
    lm = load_lm(cfg.model)
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    _, toks = bench.bench_tokens(cfg, lm.tokenizer)
    memory = next(iter(bench.make_memories(cfg, lm).values()))
    w = cfg.window
    variants = {"after": (256, 32), "before": (2048, 2048)}
    systems = {"base": {}, "base+memory-4b": {"hook": hook, "memory": memory}}
    best: dict = {}
    for r in range(a.repeats + 1):  # round 0 warms up
        for v, (rows, sub) in variants.items():
            evaluate.GOLD_ROWS, evaluate.GOLD_SUB = rows, sub
            for s, kw in systems.items():
                t0 = time.perf_counter()
                sc = evaluate.score_tokens(lm, toks, w.context, w.stride, w.batch_size, desc=f"{s} {v}", **kw)
                dt = time.perf_counter() - t0
                if r:
                    best[(s, v)] = min(best.get((s, v), float("inf")), dt / sc.n)
    print(f"{torch.get_num_threads()} threads, {a.dtype}, {sc.n} tokens, window {w.context}/{w.stride} x "
          f"{w.batch_size}; fastest of {a.repeats}")
    print("| system | before tok/s | after tok/s | after / before |\n|---|---|---|---|")
    for s in systems:
        b, af = 1 / best[(s, "before")], 1 / best[(s, "after")]
        print(f"| {s} | {b:,.0f} | {af:,.0f} | x{af / b:.2f} |")
    for v in variants:
        print(f"base+memory-4b / base ({v}): {best[('base', v)] / best[('base+memory-4b', v)]:.2f}")


if __name__ == "__main__":
    main()
