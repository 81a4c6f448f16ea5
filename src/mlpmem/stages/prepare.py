"""Stage `prepare`: read, split and tokenize the corpus into ``data/<split>/{tokens,offsets}.npy``.

Documents of a split form one stream with a separator between them (see :mod:`mlpmem.components.data`), in the
order of --data.order (by default shuffled by --data.seed, so that the token budgets keep a random sample of whole
documents rather than the first topics of a corpus grouped by topic). Under torchrun rank 0 writes and the other
ranks wait for it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from mlpmem.artifacts import DATA, SPLITS, invalidate, read_manifest, should_skip, write_manifest
from mlpmem.components.data import assign_splits, corpus_fingerprint, read_corpus, separator_ids, tokenize_split, \
    vocab_bound
from mlpmem.components.lm import load_tokenizer, tokenizer_hash
from mlpmem.config import Config, DataConfig
from mlpmem.errors import CorpusError, StageError
from mlpmem.files import atomic_save_npy, fingerprint
from mlpmem.runtime import fault_point, on_main
from mlpmem.stages import save_stage_config

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    return on_main(_prepare, cfg)


def _fingerprint(dcfg: DataConfig, t_hash: str, splits: dict) -> tuple[str, str]:
    """(prepare's fingerprint, the corpus fingerprint) of these settings and splits."""
    c_fp = corpus_fingerprint(splits)
    # skip_bad_records only changes which documents are read, which c_fp covers; leaving it out keeps the
    # fingerprints of runs prepared before the option existed. Likewise order 'corpus' (the order before --data.order):
    # such runs stay valid with --data.order corpus, and under the default 'shuffled' they are other settings
    data = {k: v for k, v in dataclasses.asdict(dcfg).items()
            if k != "skip_bad_records" and (k, v) != ("order", "corpus")}
    return fingerprint("prepare", data, t_hash, c_fp), c_fp


def _refuse_corpus_order(out, dcfg: DataConfig, t_hash: str, docs: dict, fp: str) -> None:
    """A run prepared in corpus order, as every run was before --data.order (whose default is shuffled), is refused
    naming the option that keeps it, rather than the generic "other settings"."""
    m = read_manifest(out)
    if not (m and m.get("complete")) or m.get("fingerprint") == fp:
        return
    corpus = dataclasses.replace(dcfg, order="corpus")
    if m.get("fingerprint") == _fingerprint(corpus, t_hash, assign_splits(docs, corpus))[0]:
        raise StageError(f"{out} was prepared with the documents in corpus order (before --data.order existed, or "
                         "with --data.order corpus); the default order is now shuffled. Pass --data.order corpus to "
                         "keep this run (its later stages stay valid), or rerun `mlpmem prepare --force` and the "
                         "stages after it to shuffle each split before the token budgets cut it")


def _prepare(cfg: Config) -> dict:
    out = cfg.run_dir / DATA
    tok = load_tokenizer(cfg.model)
    t_hash = tokenizer_hash(tok)
    t0 = time.time()
    report: dict = {}
    docs = read_corpus(cfg.data, report)
    splits = assign_splits(docs, cfg.data)
    fp, c_fp = _fingerprint(cfg.data, t_hash, splits)
    if cfg.data.order == "shuffled" and not cfg.force:
        _refuse_corpus_order(out, cfg.data, t_hash, docs, fp)
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
