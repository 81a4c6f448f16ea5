"""Corpus -> tokenized splits on disk, and the sliding-window plan shared by extraction and evaluation.

Layout of ``<run>/data/<split>/``: ``tokens.npy`` (int32 flat stream), ``offsets.npy`` (int64, start of each
document in the stream, plus the stream length at the end), ``manifest.json``.

Documents of a split are laid out as one continuous stream with a separator between them (by default the
tokenizer's document token, ``<|endoftext|>`` or EOS), as WikiText is evaluated: windows span document boundaries,
so every position after the first ``context - stride`` tokens of the stream sees at least that much context,
including the first tokens of short documents. Position ``t`` of a stream predicts token ``t + 1``; the datastore
row ``t`` is that position, so row ids and stream positions are the same thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpmem.config import DataConfig
from mlpmem.errors import CorpusError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")  # the same as mlpmem.artifacts.SPLITS
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                  "val": "validation", "test": "test"}


# ----------------------------------------------------------------------------- window plan

@dataclass(frozen=True)
class Window:
    """Input tokens ``[begin, end)``; the positions ``[score_from, end)`` are scored (position t predicts t+1)."""

    begin: int
    end: int
    score_from: int


def plan_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Sliding windows over a stream of ``n_tokens`` that score each of its ``n_tokens - 1`` positions exactly once.

    Windows start every ``stride`` tokens and hold up to ``context`` tokens; a window scores only the positions the
    previous one did not, so each scored position (after the first window) sees >= ``context - stride`` tokens of
    context. The last input position is ``n_tokens - 2`` (its label is the last token).
    """
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got context={context}, stride={stride}")
    n_pos = n_tokens - 1
    windows: list[Window] = []
    prev_end = 0
    begin = 0
    while prev_end < n_pos:
        end = min(begin + context, n_pos)
        windows.append(Window(begin, end, prev_end))
        prev_end = end
        begin += stride
    return windows


def shard_windows(windows: list[Window], n_shards: int) -> list[list[Window]]:
    """Split a plan into contiguous groups of windows of similar scored size (one per process/shard).

    Every shard gets at least one window when there are at least ``n_shards`` windows.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    cum = np.cumsum([w.end - w.score_from for w in windows])
    total = int(cum[-1]) if len(cum) else 0
    out, start = [], 0
    for i in range(1, n_shards + 1):
        if i == n_shards:
            b = len(windows)
        else:  # first window boundary at or past this shard's share, keeping one window for each later shard
            b = int(np.searchsorted(cum, total * i / n_shards, side="left")) + 1
            b = min(max(b, start + 1), len(windows) - (n_shards - i))
            b = max(b, start)
        out.append(windows[start:b])
        start = b
    return out


def batch_windows(tokens: np.ndarray, windows: list[Window], batch_size: int):
    """Yield (input_ids int64 (B,T), attention_mask (B,T), windows) batches, right-padded to the longest window."""
    import torch

    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        T = max(w.end - w.begin for w in group)
        ids = np.zeros((len(group), T), dtype=np.int64)
        mask = np.zeros((len(group), T), dtype=np.int64)
        for j, w in enumerate(group):
            ids[j, : w.end - w.begin] = tokens[w.begin:w.end]
            mask[j, : w.end - w.begin] = 1
        yield torch.from_numpy(ids), torch.from_numpy(mask), group


# ----------------------------------------------------------------------------- reading corpora

def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"--data.source: {path} is not UTF-8 (bad byte at offset {e.start}); convert it with "
                          f"e.g. `iconv -f latin1 -t utf-8 {path.name} > out.txt`") from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first document


def _lines(text: str) -> list[str]:
    """Split on newlines only: str.splitlines() also splits on U+2028, form feeds, etc. inside a document
    (and JSON allows a raw U+2028 inside a string)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


class _TextCheck:
    """The text value of one record: a string is kept as is; anything else (null, a number, a list, an object) is
    refused naming the record, since str() would turn it into a document like "None" or "['a', 'b']". With
    --data.skip_bad_records it is skipped and counted instead. Empty strings are kept (dropped later, as empty
    lines of a .txt are)."""

    _KINDS = ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"), ((list, tuple), "a list"),
              (dict, "an object"))

    def __init__(self, field: str, skip: bool):
        self.field, self.skip, self.skipped, self.first = field, skip, 0, None

    def __call__(self, value, where: str) -> str | None:
        if isinstance(value, str):
            return value
        if not self.skip:
            kind = next((k for t, k in self._KINDS if isinstance(value, t)), f"a {type(value).__name__}")
            shown = json.dumps(value, default=str, ensure_ascii=False)  # as the JSONL line spells it
            shown = "" if value is None else f" {shown[:40]}{'...' if len(shown) > 40 else ''}"
            raise CorpusError(f"--data.source {where}: {self.field!r} is {kind}{shown}, not a string; fix or remove "
                              "that record, point --data.text_field at the text, or pass --data.skip_bad_records "
                              "true to skip such records")
        self.skipped += 1
        self.first = self.first or where
        return None


def _read_jsonl(path: Path, check: _TextCheck) -> list[str]:
    field = check.field
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of records or strings
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"--data.source: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
        docs = []
        for n, rec in enumerate(recs):
            if isinstance(rec, str):
                docs.append(rec)
            elif isinstance(rec, dict) and field in rec:
                docs.append(check(rec[field], f"{path} item {n}"))
            else:
                raise CorpusError(f"--data.source: {path} item {n} is neither a string nor a record with field "
                                  f"{field!r}; set --data.text_field")
        return [d for d in docs if d is not None]
    docs = []
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"--data.source: {path} line {n} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or field not in rec:
            raise CorpusError(f"--data.source: {path} line {n} has no field {field!r}; set --data.text_field")
        docs.append(check(rec[field], f"{path}:{n}"))
    return [d for d in docs if d is not None]


def _read_hf(spec: str, check: _TextCheck) -> dict[str, list[str]]:
    import datasets

    field = check.field
    name, _, conf = spec[3:].partition(":")
    try:
        if Path(name).exists():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, conf or None)
    except Exception as e:  # datasets raises many types; all mean "cannot get this dataset"
        raise CorpusError(f"--data.source {spec}: could not load the dataset ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local save_to_disk directory "
                          "or a hub dataset name (needs network).") from None
    if isinstance(ds, datasets.Dataset):
        ds = {"all": ds}
    out: dict[str, list[str]] = {}
    for split, d in ds.items():
        if field not in d.column_names:
            raise CorpusError(f"--data.source {spec}: split {split!r} has no column {field!r} "
                              f"(columns: {d.column_names}); set --data.text_field")
        key = _SPLIT_ALIASES.get(split, "all" if split == "all" else None)
        if key is None:
            log.warning("ignoring dataset split %r", split)
            continue
        texts = (check(t, f"{spec}: split {split!r} row {i}") for i, t in enumerate(d[field]))
        out[key] = [t for t in texts if t is not None]
    return out


def read_corpus(dcfg: DataConfig, report: dict | None = None) -> dict[str, list[str]]:
    """Documents per split: {"all": [...]} when the source has no splits, else train/validation/test lists.

    ``report``, when given, receives ``skipped_records``: records skipped by --data.skip_bad_records."""
    check = _TextCheck(dcfg.text_field, dcfg.skip_bad_records)
    docs = _read_corpus(dcfg, check)
    if check.skipped:
        log.warning("skipped %d record(s) whose %r is not a string (--data.skip_bad_records), the first at %s",
                    check.skipped, check.field, check.first)
    if report is not None:
        report["skipped_records"] = check.skipped
    return docs


def _read_corpus(dcfg: DataConfig, check: _TextCheck) -> dict[str, list[str]]:
    src = dcfg.source
    if src == "default":
        from mlpmem.assets import default_corpus

        return {"all": [d["text"] for d in default_corpus()]}
    if src.startswith("hf:"):
        return _read_hf(src, check)
    p = Path(src).expanduser()
    if not p.exists():
        raise CorpusError(f"--data.source {src}: no such file or directory (use 'default', a path, or hf:NAME)")
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".json") and f.is_file()) \
        if p.is_dir() else [p]
    if not files:
        raise CorpusError(f"--data.source {src}: the directory holds no .txt or .jsonl files")
    per = dcfg.doc_per if dcfg.doc_per != "auto" else ("file" if p.is_dir() else "line")
    docs: list[str] = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            docs += _read_jsonl(f, check)
        elif per == "file":
            docs.append(_read_text(f))
        else:
            docs += _lines(_read_text(f))
    return {"all": docs}


# the random stream of each split's --data.order shuffle (and of the out-of-domain corpus's), besides the one that
# assigns documents to splits, so that the order within a split does not depend on the other splits
_ORDER_STREAMS = {"train": 1, "validation": 2, "test": 3, "ood": 4}


def shuffle_documents(docs: list[str], seed: int, stream: str) -> list[str]:
    """``docs`` in the order of a permutation drawn from (``seed``, ``stream``): a budget that keeps the first
    documents then keeps a random sample, whatever order (e.g. by topic) the source has."""
    order = np.random.default_rng([seed, _ORDER_STREAMS[stream]]).permutation(len(docs))
    return [docs[i] for i in order]


def assign_splits(docs: dict[str, list[str]], dcfg: DataConfig) -> dict[str, list[str]]:
    """Keep given splits, otherwise shuffle documents with the seed and cut validation/test fractions; then order
    each split's documents as --data.order says: shuffled by the seed, or in corpus order."""
    splits = _assign_splits(docs, dcfg)
    if dcfg.order == "corpus":
        return splits
    return {s: shuffle_documents(v, dcfg.seed, s) for s, v in splits.items()}


def _assign_splits(docs: dict[str, list[str]], dcfg: DataConfig) -> dict[str, list[str]]:
    """The splits in corpus order (what assign_splits returned before --data.order)."""
    clean = {k: [d for d in v if d.strip()] for k, v in docs.items()}
    if not any(clean.values()):
        raise CorpusError(f"--data.source {dcfg.source}: the corpus has no non-empty documents")
    if "all" not in clean:
        missing = [s for s in SPLITS if not clean.get(s)]
        if "train" in missing:
            raise CorpusError(f"--data.source {dcfg.source}: the dataset has no non-empty train split")
        if missing:  # e.g. a dataset with train only: carve the missing splits out of train (and only those)
            log.warning("source has no %s split: carving it out of train with seed %d", missing, dcfg.seed)
            only_missing = dataclasses.replace(
                dcfg, validation_fraction=dcfg.validation_fraction if "validation" in missing else 0.0,
                test_fraction=dcfg.test_fraction if "test" in missing else 0.0)
            carved = _assign_splits({"all": clean["train"]}, only_missing)
            return {s: clean[s] if s != "train" and clean.get(s) else carved[s] for s in SPLITS}
        return {s: clean[s] for s in SPLITS}
    all_docs = clean["all"]
    n = len(all_docs)
    order = np.random.default_rng(dcfg.seed).permutation(n)
    n_val = int(round(n * dcfg.validation_fraction)) if dcfg.validation_fraction > 0 else 0
    n_test = int(round(n * dcfg.test_fraction)) if dcfg.test_fraction > 0 else 0
    n_val = max(n_val, 1 if dcfg.validation_fraction > 0 else 0)
    n_test = max(n_test, 1 if dcfg.test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise CorpusError(f"--data.source {dcfg.source}: only {n} documents, too few for train/validation/test; "
                          "add documents or lower --data.validation_fraction / --data.test_fraction")
    val_idx, test_idx, train_idx = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    return {"train": [all_docs[i] for i in sorted(train_idx)],
            "validation": [all_docs[i] for i in sorted(val_idx)],
            "test": [all_docs[i] for i in sorted(test_idx)]}


def separator_ids(tok, separator: str) -> list[int]:
    """Token ids placed between documents: 'auto' = <|endoftext|> if the vocab has it, else EOS, else nothing."""
    if separator == "none":
        return []
    if separator == "auto":
        vocab = tok.get_vocab()
        if "<|endoftext|>" in vocab:
            return [vocab["<|endoftext|>"]]
        return [tok.eos_token_id] if tok.eos_token_id is not None else []
    return list(tok(separator, add_special_tokens=False).input_ids)


def tokenize_split(tok, docs: list[str], sep: list[int], max_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, offsets int64 (n_docs + 1)): documents joined by ``sep``, whole documents up to max_tokens
    (a first document longer than max_tokens is cut to it)."""
    pieces, offsets, total = [], [], 0
    batch = 256
    for i in range(0, len(docs), batch):
        for ids in tok(docs[i:i + batch], add_special_tokens=False).input_ids:
            if max_tokens is not None and not pieces and len(ids) > max_tokens:
                ids = ids[:max_tokens]  # a first document longer than the budget: cut it, else the cap does nothing
            ids = (sep if pieces else []) + ids
            if max_tokens is not None and total + len(ids) > max_tokens and pieces:
                break
            offsets.append(total + (len(sep) if pieces else 0))
            pieces.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
        else:
            continue
        break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if tokens.size and tokens.max() > np.iinfo(np.int32).max:
        raise CorpusError("token ids exceed int32")
    return tokens.astype(np.int32), np.asarray(offsets + [total], dtype=np.int64)


def vocab_bound(tok) -> int:
    """1 + the largest id the tokenizer can produce (readers check the streams against it); added tokens can sit
    past len(tok) in some tokenizers' id space."""
    return max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)


def corpus_fingerprint(splits: dict[str, list[str]], names: tuple[str, ...] = SPLITS) -> str:
    """Hash of the documents of the splits ``names``, in their order."""
    h = hashlib.sha256()
    for s in names:
        h.update(s.encode())
        for d in splits[s]:
            h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]
