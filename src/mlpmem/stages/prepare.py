"""Stage `prepare`: read, split and tokenize the corpus into ``data/<split>/{tokens,offsets}.npy``.

Documents of a split form one stream with a separator between them (see :mod:`mlpmem.components.data`). Under
torchrun rank 0 writes and the other ranks wait for it.
"""

from __future__ import annotations

import logging
import time

from mlpmem.artifacts import DATA, SPLITS, invalidate, should_skip, write_manifest
from mlpmem.components.data import assign_splits, corpus_fingerprint, read_corpus, separator_ids, tokenize_split
from mlpmem.components.lm import load_tokenizer, tokenizer_hash
from mlpmem.config import Config
from mlpmem.errors import CorpusError
from mlpmem.files import atomic_save_npy, fingerprint
from mlpmem.runtime import fault_point, on_main
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    return on_main(_prepare, cfg)


def vocab_bound(tok) -> int:
    """1 + the largest id the tokenizer can produce (readers check the streams against it); added tokens can sit
    past len(tok) in some tokenizers' id space."""
    return max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)


def _prepare(cfg: Config) -> dict:
    out = cfg.run_dir / DATA
    tok = load_tokenizer(cfg.model)
    t_hash = tokenizer_hash(tok)
    t0 = time.time()
    report: dict = {}
    splits = assign_splits(read_corpus(cfg.data, report), cfg.data)
    c_fp = corpus_fingerprint(splits)
    # skip_bad_records only changes which documents are read, which c_fp covers; leaving it out keeps the
    # fingerprints of runs prepared before the option existed
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k != "skip_bad_records"}
    fp = fingerprint("prepare", data, t_hash, c_fp)
    done = should_skip(out, "prepare", fp, cfg.force, upstream={})
    if done:
        return done
    invalidate(out)
    sep = separator_ids(tok, cfg.data.separator)
    counts = {}
    for s in SPLITS:
        limit = cfg.data.max_train_tokens if s == "train" else cfg.data.max_eval_tokens
        tokens, offsets = tokenize_split(tok, splits[s], sep, limit)
        if tokens.size < 2:
            raise CorpusError(f"--data.source {cfg.data.source}: split {s!r} has fewer than 2 tokens")
        atomic_save_npy(out / s / "tokens.npy", tokens)
        atomic_save_npy(out / s / "offsets.npy", offsets)
        counts[s] = {"tokens": int(tokens.size), "documents": int(len(offsets) - 1)}
        log.info("prepare: %s: %d documents, %d tokens", s, len(offsets) - 1, tokens.size)
        fault_point("prepare.split")
    save_stage_config(cfg, "prepare", out)
    return write_manifest(out, "prepare", fp, upstream={}, tokenizer_hash=t_hash, tokenizer_name=cfg.model.name,
                          corpus_fingerprint=c_fp, separator=sep, counts=counts, source=cfg.data.source,
                          skipped_records=report["skipped_records"], vocab_size=vocab_bound(tok),
                          seconds=round(time.time() - t0, 2))
