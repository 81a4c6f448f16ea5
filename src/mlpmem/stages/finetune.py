"""Stage `finetune`: fine-tune the base LM on the train split (full or LoRA) before the datastore is built.

With --finetune.mode none (the default) it does nothing, and later stages use --model as given. Otherwise it writes
``finetune/model`` (a plain Hugging Face model directory, LoRA merged in, with the tokenizer), the best step by
validation loss; :func:`mlpmem.artifacts.base_model` then hands that directory to every later stage, which records
this stage's fingerprint upstream. ``finetune/last`` is the resumable checkpoint, ``metrics.jsonl`` the log.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from mlpmem.artifacts import DATA, FINETUNE, FINETUNED_MODEL, invalidate, is_complete, load_split, should_skip, \
    verify_chain, write_manifest
from mlpmem.components.finetune import export_model, finetune_lm, make_trainable
from mlpmem.components.lm import check_context, load_lm, weights_digest
from mlpmem.config import Config
from mlpmem.files import fingerprint, remove_directory
from mlpmem.runtime import barrier, dist_info
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    if cfg.finetune.mode == "none":
        log.info("finetune: --finetune.mode none, nothing to do")
        return {}
    dist = dist_info()
    fc = cfg.finetune
    out = cfg.run_dir / FINETUNE
    lm = load_lm(dataclasses.replace(cfg.model, dtype=fc.dtype))
    check_context(lm, cfg.window.context)
    data_m = verify_chain(cfg.run_dir, DATA, "prepare")
    upstream = {DATA: data_m["fingerprint"]}
    settings = cfg.to_dict()["finetune"]
    fp = fingerprint("finetune", upstream, lm.identity["fingerprint"], settings, cfg.window.context,
                     cfg.window.stride, cfg.seed, dist.world_size)
    done = should_skip(out, "finetune", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        return done
    rebuild = cfg.force or is_complete(out)  # a finished fine-tuning from other settings or inputs: start over
    if dist.is_main:
        invalidate(out)
        if rebuild:
            for sub in ("last", "best", FINETUNED_MODEL):
                remove_directory(out / sub)
            (out / "metrics.jsonl").unlink(missing_ok=True)
    barrier()  # no rank looks for last/ before rank 0 has removed it
    t_hash = lm.identity["tokenizer_hash"]
    train_tokens, _ = load_split(cfg.run_dir, "train", t_hash)
    val_tokens, _ = load_split(cfg.run_dir, "validation", t_hash)
    model = make_trainable(lm.model, fc, cfg.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log.info("finetune: %s, %.2fM of %.1fM parameters train; %d train / %d validation tokens", fc.mode,
             n_train / 1e6, n_total / 1e6, len(train_tokens), len(val_tokens))
    t0 = time.time()
    summary = finetune_lm(model, train_tokens, val_tokens, fc, cfg.window.context, cfg.window.stride, out, cfg.seed,
                          micro_batch=cfg.window.batch_size, world_size=dist.world_size, rank=dist.rank,
                          identity=lm.identity["fingerprint"])
    manifest: dict = {}
    try:
        if dist.is_main:
            plain = export_model(model, lm.tokenizer, out / FINETUNED_MODEL)
            weights = weights_digest(str((out / FINETUNED_MODEL).resolve()), {}, plain)
            save_stage_config(cfg, "finetune", out)
            ppl = lambda x: math.exp(min(x, 700.0))  # noqa: E731
            manifest = write_manifest(
                out, "finetune", fp, upstream, mode=fc.mode, base_model=lm.identity, model_dir=FINETUNED_MODEL,
                weights=weights, dtype=fc.dtype, settings=settings,
                window={"context": cfg.window.context, "stride": cfg.window.stride},
                **{**summary, "tokens_per_s": round(summary["tokens_per_s"], 1),
                   "seconds": round(time.time() - t0, 2)},  # with the export
                best_val_ppl=ppl(summary["best_val_loss"]), base_val_ppl=ppl(summary["base_val_loss"]),
                trainable_params=n_train, total_params=n_total)
            log.info("finetune: validation loss %.4f -> %.4f (ppl %.2f -> %.2f) at step %d of %d, %d tokens",
                     summary["base_val_loss"], summary["best_val_loss"], manifest["base_val_ppl"],
                     manifest["best_val_ppl"], summary["best_step"], summary["steps"], summary["tokens"])
    finally:
        barrier()  # the other ranks go on (to extract) only once the model and the manifest are written
    return manifest
