"""Small ablation of the MLP memory on top of a finished pipeline run (default: runs/demo).

Each variant gets its own run directory whose upstream artifacts (data, datastore, index, and targets unless the
target temperature changes) are symlinks to the base run's, then trains and evaluates the memory only. Writes
docs-ready Markdown to <base>/ablation.md and prints it.

    .venv/bin/python scripts/ablation.py --config configs/demo.yaml --train.max_steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mlpmem.config import load_config
from mlpmem.runtime import seed_everything, set_threads, setup_logging

VARIANTS = {
    "reference": {},
    "alpha=0 (CE only)": {"train.alpha": 0.0},
    "alpha=1 (KL only)": {"train.alpha": 1.0},
    "2 blocks": {"memory.num_blocks": 2},
    "target T=4": {"knn.temperature": 4.0},
    "target T=64": {"knn.temperature": 64.0},
    "random head init": {"memory.init_head": "random"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--only", nargs="*", help="Variant names to run (default: all).")
    args, rest = ap.parse_known_args()
    overrides = dict(zip([r.lstrip("-") for r in rest[::2]], rest[1::2]))
    setup_logging()
    base = load_config(args.config, overrides)
    set_threads(base.threads)
    from mlpmem.stages import eval as eval_stage, targets, train

    rows = []
    for name, ov in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        out = base.run_dir.parent / f"{base.run_dir.name}-ablation" / slug
        cfg = load_config(args.config, {**overrides, **ov, "out_dir": str(out), "eval.systems": "memory"})
        out.mkdir(parents=True, exist_ok=True)
        links = ["data", "datastore", "index"] + ([] if "knn.temperature" in ov else ["targets"])
        for d in links:
            if not (out / d).exists():
                os.symlink((base.run_dir / d).resolve(), out / d)
        seed_everything(cfg.seed)
        t0 = time.time()
        if "knn.temperature" in ov:
            targets.run(cfg)
        train.run(cfg)
        eval_stage.run(cfg)
        res = json.loads((out / cfg.eval.out_name / "results.json").read_text())
        sys_ = res["splits"]["test"]["systems"]
        rows.append((name, res["settings"]["memory"]["lam"], sys_["base"]["ppl"], sys_["memory"]["ppl"],
                     sys_["memory alone"]["ppl"], time.time() - t0))
    lines = ["| variant | λ (tuned on validation) | base test PPL | + memory test PPL | memory alone | wall s |",
             "|---|---|---|---|---|---|"]
    for n, lam, b, m, a, s in rows:
        lines.append(f"| {n} | {lam:g} | {b:.3f} | {m:.3f} ({100 * (m / b - 1):+.1f}%) | {a:.2f} | {s:.0f} |")
    text = "\n".join(lines)
    (base.run_dir.parent / f"{base.run_dir.name}-ablation" / "ablation.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
