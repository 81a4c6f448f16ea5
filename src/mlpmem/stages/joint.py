"""Stage `joint`: train the LM and its trained memory together on the mixture's next-token loss.

The memory is retriever-pretrained apart from the LM (`train`); here both are fine-tuned end to end on the train
split, on -log((1 - lam) p_LM(y) + lam p_mem(y)) with lam (and the memory's temperature) as `eval` tuned them.
The LM trains its LoRA adapters (--joint.mode lora) or all its weights (full), the memory all of its weights
(unless --joint.memory_trains false); gradients reach the LM through its own head and through the hidden state
the memory reads. It starts from the run's base model (the fine-tuned one with --finetune.mode full/lora) and
memory/, selects the step by validation mixture loss (step 0, the separately trained pair, is the reference) and
writes ``joint/model`` (a plain Hugging Face model directory, LoRA merged) and ``joint/memory``, whose metadata
names the joint model as its base. `mlpmem eval --eval.joint true --eval.out_name eval-joint` scores the pair.
With --joint.mode none (the default) it does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from mlpmem.artifacts import DATA, JOINT, JOINT_MEMORY, FINETUNED_MODEL, MEMORY, base_model, invalidate, \
    is_complete, load_memory, load_split, should_skip, tuned_settings, verify_chain, write_manifest
from mlpmem.components.capture import resolve_hook
from mlpmem.components.finetune import export_model, finetune_lm, make_trainable
from mlpmem.components.joint import MemoryAttached
from mlpmem.components.lm import check_context, load_lm
from mlpmem.components.memory import write_pretrained
from mlpmem.config import Config
from mlpmem.errors import StageError
from mlpmem.files import fingerprint, remove_directory, swapped_directory
from mlpmem.runtime import barrier, dist_info, fault_point
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    jc = cfg.joint
    if jc.mode == "none":
        log.info("joint: --joint.mode none, nothing to do")
        return {}
    dist = dist_info()
    out = cfg.run_dir / JOINT
    mcfg, model_up = base_model(cfg)
    lm = load_lm(dataclasses.replace(mcfg, dtype=jc.dtype))
    check_context(lm, cfg.window.context)
    hook = resolve_hook(lm.model, cfg.extract.hook, cfg.extract.layer)
    memory, mem_meta = load_memory(cfg.run_dir, lm, hook, required=True)
    data_m = verify_chain(cfg.run_dir, DATA, "prepare")
    upstream = {DATA: data_m["fingerprint"], MEMORY: mem_meta["fingerprint"], **model_up}
    # --joint.lam, else what `mlpmem eval` tuned for this memory, else an error (artifacts.tuned_settings)
    tuned = tuned_settings(cfg.run_dir, cfg.eval.out_name, jc.lam, flag="--joint.lam", mem_T=cfg.memory.temperature)
    if tuned.fingerprint is not None:
        upstream[cfg.eval.out_name] = tuned.fingerprint
    lam, mem_T = tuned.lam, tuned.mem_T
    if lam <= 0.0:
        raise StageError("joint: the tuned memory lambda is 0: the memory does not help this LM on validation, so "
                         "there is no mixture to train; set --joint.lam to train one anyway")
    settings = cfg.to_dict()["joint"]
    fp = fingerprint("joint", upstream, lm.identity["fingerprint"], settings, lam, mem_T, cfg.window.context,
                     cfg.window.stride, cfg.seed, dist.world_size)
    done = should_skip(out, "joint", fp, cfg.force, upstream, cfg.run_dir)
    if done:
        return done
    rebuild = cfg.force or is_complete(out)
    if dist.is_main:
        invalidate(out)
        if rebuild:
            for sub in ("last", "best", FINETUNED_MODEL, JOINT_MEMORY):
                remove_directory(out / sub)
            (out / "metrics.jsonl").unlink(missing_ok=True)
    barrier()
    t_hash = lm.identity["tokenizer_hash"]
    train_tokens, _ = load_split(cfg.run_dir, "train", t_hash)
    val_tokens, _ = load_split(cfg.run_dir, "validation", t_hash)
    memory.float().requires_grad_(jc.memory_trains)
    model = MemoryAttached(lm.model, memory, lam=lam, hook=hook, mem_temperature=mem_T)
    model.lm = make_trainable(lm.model, jc, cfg.seed)  # LoRA wraps the LM after the hooks are on its modules
    n_lm = sum(p.numel() for p in model.lm.parameters() if p.requires_grad)
    n_mem = sum(p.numel() for p in memory.parameters() if p.requires_grad)
    log.info("joint: %s LM (%.2fM trainable) + memory (%.2fM trainable), lambda %.2f, T_mem %g; %d train tokens",
             jc.mode, n_lm / 1e6, n_mem / 1e6, lam, mem_T, len(train_tokens))
    t0 = time.time()
    summary = finetune_lm(model, train_tokens, val_tokens, jc, cfg.window.context, cfg.window.stride, out, cfg.seed,
                          micro_batch=cfg.window.batch_size, world_size=dist.world_size, rank=dist.rank,
                          identity=fingerprint(lm.identity["fingerprint"], mem_meta["fingerprint"], lam, mem_T))
    manifest: dict = {}
    try:
        if dist.is_main:
            model.detach()
            export_model(model.lm, lm.tokenizer, out / FINETUNED_MODEL)
            fault_point("joint.export")  # the joint LM written, its memory not yet
            joint_lm = load_lm(dataclasses.replace(cfg.model, name=str((out / FINETUNED_MODEL).absolute()),
                                                   revision=None))
            meta = dict(memory.config.meta)
            meta.update(base_model=joint_lm.identity["name"], base_fingerprint=joint_lm.identity["fingerprint"],
                        joint={"lam": lam, "T_mem": mem_T, "mode": jc.mode, "from_memory": mem_meta["fingerprint"]})
            memory.config.meta = meta
            with swapped_directory(out / JOINT_MEMORY) as tmp:
                write_pretrained(memory.requires_grad_(False).eval(), tmp)
            save_stage_config(cfg, "joint", out)
            ppl = lambda x: math.exp(min(x, 700.0))  # noqa: E731
            manifest = write_manifest(
                out, "joint", fp, upstream, mode=jc.mode, lam=lam, T_mem=mem_T, model_dir=FINETUNED_MODEL,
                memory_dir=JOINT_MEMORY, base_model=lm.identity, joint_model=joint_lm.identity, settings=settings,
                **{**summary, "tokens_per_s": round(summary["tokens_per_s"], 1), "seconds": round(time.time() - t0, 2)},
                best_val_ppl=ppl(summary["best_val_loss"]), start_val_ppl=ppl(summary["base_val_loss"]),
                trainable_lm_params=n_lm, trainable_memory_params=n_mem)
            log.info("joint: validation mixture loss %.4f -> %.4f (ppl %.2f -> %.2f) at step %d of %d",
                     summary["base_val_loss"], summary["best_val_loss"], manifest["start_val_ppl"],
                     manifest["best_val_ppl"], summary["best_step"], summary["steps"])
    finally:
        barrier()
    return manifest
