"""mlpmem.components.data: the window plan, corpus readers, split assignment and the `prepare` stage's files."""

import json

import numpy as np
import pytest

from helpers import make_texts, make_tokenizer
from mlpmem.config import DataConfig, load_config
from mlpmem.errors import CorpusError
from mlpmem.components.data import Window, assign_splits, batch_windows, corpus_fingerprint, plan_windows, \
    read_corpus, shard_windows, tokenize_split

# ----------------------------------------------------------------------------- window plan

PLAN_CASES = [(n, c, s) for n in (2, 3, 4, 7, 16, 17, 18, 50, 101)
              for c, s in ((1, 1), (2, 1), (2, 2), (3, 2), (4, 1), (8, 3), (8, 8), (16, 5), (16, 16), (17, 16))]


@pytest.mark.parametrize("n_tokens,context,stride", PLAN_CASES)
def test_plan_scores_every_position_once(n_tokens, context, stride):
    windows = plan_windows(n_tokens, context, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    # positions 0 .. n_tokens - 2 (the last token is only a label), each exactly once, in order
    assert scored == list(range(n_tokens - 1))
    assert windows[0].begin == 0 and windows[0].score_from == 0
    for k, w in enumerate(windows):
        assert 0 <= w.begin <= w.score_from < w.end <= n_tokens - 1
        assert w.end - w.begin <= context
        if k > 0:  # after the first window, every scored position has >= context - stride tokens before it
            assert w.score_from - w.begin >= context - stride
            assert w.begin == windows[k - 1].begin + stride


@pytest.mark.parametrize("n_tokens,context", [(2, 8), (3, 8), (5, 8), (8, 8), (9, 8)])
def test_plan_short_stream_is_one_window(n_tokens, context):
    # n_tokens - 1 <= context positions fit in one window: one forward scores them all with full left context
    assert plan_windows(n_tokens, context, 4) == [Window(0, n_tokens - 1, 0)]


def test_plan_longer_than_context_needs_more_windows():
    # context == n_tokens: n_tokens - 1 positions still fit one window; one more token does not
    assert len(plan_windows(10, 10, 5)) == 1
    assert len(plan_windows(12, 10, 5)) == 2


def test_plan_degenerate_and_invalid():
    assert plan_windows(0, 8, 4) == [] and plan_windows(1, 8, 4) == []
    for c, s in ((8, 0), (8, 9), (0, 0)):
        with pytest.raises(ValueError):
            plan_windows(100, c, s)


@pytest.mark.parametrize("n_tokens,context,stride", [(1000, 64, 32), (1000, 64, 64), (333, 50, 7), (20, 8, 4)])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 7, 200])
def test_shard_windows_contiguous_cover(n_tokens, context, stride, n_shards):
    windows = plan_windows(n_tokens, context, stride)
    shards = shard_windows(windows, n_shards)
    assert len(shards) == n_shards
    assert [w for s in shards for w in s] == windows  # all windows, in order, none twice
    total = sum(w.end - w.score_from for w in windows)
    biggest = max(w.end - w.score_from for w in windows)
    for s in shards:  # balanced to within one window's worth of positions
        assert sum(w.end - w.score_from for w in s) <= total / n_shards + biggest


def test_shard_windows_rejects_zero_shards():
    with pytest.raises(ValueError):
        shard_windows(plan_windows(100, 10, 5), 0)


def test_batch_windows_right_pads_with_mask():
    tokens = np.arange(40, dtype=np.int32) + 100
    windows = plan_windows(len(tokens), 16, 6)
    seen = []
    for ids, mask, group in batch_windows(tokens, windows, 3):
        assert ids.shape == mask.shape and ids.shape[0] == len(group)
        for j, w in enumerate(group):
            n = w.end - w.begin
            assert ids[j, :n].tolist() == tokens[w.begin:w.end].tolist()
            assert mask[j, :n].all() and not mask[j, n:].any()
        seen += group
    assert seen == windows


# ----------------------------------------------------------------------------- reading corpora

def test_txt_one_document_per_line(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first doc\r\nsecond\u2028still second\n\nthird\n", encoding="utf-8")
    docs = read_corpus(DataConfig(source=str(f)))["all"]
    # U+2028 inside a line is not a document break; CRLF is; empty lines are dropped later by assign_splits
    assert [d for d in docs if d] == ["first doc", "second\u2028still second", "third"]


def test_jsonl_and_json_array(tmp_path):
    f = tmp_path / "c.jsonl"
    recs = [{"text": "alpha beta", "id": 1}, {"text": "with a raw \u2028 separator"}, {"text": "gamma"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n\n", encoding="utf-8")
    assert read_corpus(DataConfig(source=str(f)))["all"] == [r["text"] for r in recs]
    g = tmp_path / "d.json"
    g.write_text(json.dumps([{"body": "one"}, {"body": "two"}]), encoding="utf-8")
    assert read_corpus(DataConfig(source=str(g), text_field="body"))["all"] == ["one", "two"]
    with pytest.raises(CorpusError, match="text_field"):
        read_corpus(DataConfig(source=str(f), text_field="body"))


def test_directory_one_document_per_file(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("line one\nline two of a\n", encoding="utf-8")
    (d / "sub" / "b.txt").write_text("\ufeffdoc b", encoding="utf-8")  # BOM is stripped
    (d / "ignored.bin").write_bytes(b"\xff\xfe")
    assert read_corpus(DataConfig(source=str(d)))["all"] == ["line one\nline two of a\n", "doc b"]
    assert read_corpus(DataConfig(source=str(d), doc_per="line"))["all"] == ["line one", "line two of a", "",
                                                                           "doc b"]


def test_hf_saved_splits_are_kept(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = make_texts(12, seed=3)
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": texts[:8]}),
        "validation": datasets.Dataset.from_dict({"text": texts[8:10]}),
        "test": datasets.Dataset.from_dict({"text": texts[10:]}),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    dcfg = DataConfig(source=f"hf:{tmp_path / 'ds'}", order="corpus")
    splits = assign_splits(read_corpus(dcfg), dcfg)
    assert splits == {"train": texts[:8], "validation": texts[8:10], "test": texts[10:]}
    # the seed is irrelevant when splits are given (in corpus order; --data.order shuffled orders them by it)
    other = DataConfig(source=dcfg.source, seed=7, order="corpus")
    assert assign_splits(read_corpus(other), other) == splits
    shuffled = DataConfig(source=dcfg.source)
    assert {s: sorted(v) for s, v in assign_splits(read_corpus(shuffled), shuffled).items()} == \
        {s: sorted(v) for s, v in splits.items()}


def test_hf_missing_split_is_carved_out_of_train_without_overlap(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = make_texts(40, seed=4)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:36]}),
                          "test": datasets.Dataset.from_dict({"text": texts[36:]})}).save_to_disk(str(tmp_path / "ds"))
    dcfg = DataConfig(source=f"hf:{tmp_path / 'ds'}", validation_fraction=0.25)
    splits = assign_splits(read_corpus(dcfg), dcfg)
    assert sorted(splits["test"]) == sorted(texts[36:])  # the given test split is kept (in --data.order)
    assert len(splits["validation"]) == 9
    assert not set(splits["train"]) & set(splits["validation"])
    assert sorted(splits["train"] + splits["validation"]) == sorted(texts[:36])


def test_hf_unloadable_is_a_corpus_error(tmp_path):
    (tmp_path / "notads").mkdir()
    with pytest.raises(CorpusError, match="could not load"):
        read_corpus(DataConfig(source=f"hf:{tmp_path / 'notads'}"))


def test_bad_sources(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(DataConfig(source=str(tmp_path / "missing.txt")))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_corpus(DataConfig(source=str(latin)))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="no .txt"):
        read_corpus(DataConfig(source=str(tmp_path / "emptydir")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2"):
        read_corpus(DataConfig(source=str(bad)))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_corpus(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    dcfg = DataConfig(source=str(f))
    with pytest.raises(CorpusError, match="no non-empty documents"):
        assign_splits(read_corpus(dcfg), dcfg)


# ----------------------------------------------------------------------------- split assignment

def test_splits_deterministic_disjoint_and_seeded():
    docs = {"all": make_texts(100, seed=1)}
    a = assign_splits(docs, DataConfig(seed=5, validation_fraction=0.1, test_fraction=0.2, order="corpus"))
    b = assign_splits(docs, DataConfig(seed=5, validation_fraction=0.1, test_fraction=0.2, order="corpus"))
    c = assign_splits(docs, DataConfig(seed=6, validation_fraction=0.1, test_fraction=0.2, order="corpus"))
    assert a == b and corpus_fingerprint(a) == corpus_fingerprint(b)
    assert a != c and corpus_fingerprint(a) != corpus_fingerprint(c)
    for s in (a, c):
        assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (70, 10, 20)
        tr, va, te = map(set, (s["train"], s["validation"], s["test"]))
        assert not (tr & va or tr & te or va & te)
        assert tr | va | te == set(docs["all"])
        assert s["train"] == [d for d in docs["all"] if d in tr]  # corpus order kept inside a split


def test_splits_too_few_documents():
    with pytest.raises(CorpusError, match="too few"):
        assign_splits({"all": ["a", "b"]}, DataConfig())
    s = assign_splits({"all": ["a", "b", "c"]}, DataConfig())  # one document each
    assert sorted(len(v) for v in s.values()) == [1, 1, 1]


# ----------------------------------------------------------------------------- tokenization

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(make_texts())


def test_tokenize_split_layout(tok):
    docs = make_texts(5, seed=9)
    sep = [tok.convert_tokens_to_ids("<|endoftext|>")]
    tokens, offsets = tokenize_split(tok, docs, sep, None)
    assert tokens.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets[-1] == len(tokens) and len(offsets) == len(docs) + 1
    for i, d in enumerate(docs):
        end = offsets[i + 1] - (len(sep) if i + 1 < len(docs) else 0)
        assert tokens[offsets[i]:end].tolist() == tok(d, add_special_tokens=False).input_ids
        if i:
            assert tokens[offsets[i] - 1] == sep[0]


def test_tokenize_split_budget(tok):
    docs = make_texts(10, seed=2)
    lens = [len(tok(d, add_special_tokens=False).input_ids) for d in docs]
    budget = lens[0] + 1 + lens[1] + 1 + lens[2] - 1  # the third document does not fit whole
    tokens, offsets = tokenize_split(tok, docs, [0], budget)
    assert len(offsets) == 3 and len(tokens) == lens[0] + 1 + lens[1]
    # a first document longer than the budget is cut (otherwise the cap would not cap anything)
    tokens, offsets = tokenize_split(tok, docs, [0], 5)
    assert len(tokens) == 5 and offsets.tolist() == [0, 5]


# ----------------------------------------------------------------------------- the prepare stage

def test_prepare_writes_streams_and_manifest(tmp_path):
    from helpers import make_model_dir, write_corpus
    from mlpmem.cli import main
    from mlpmem.artifacts import SPLITS, load_split
    from mlpmem.stages.prepare import run
    from mlpmem.components.lm import load_tokenizer, tokenizer_hash
    from mlpmem.files import StageError

    texts = make_texts(30, seed=11)
    corpus = write_corpus(tmp_path / "c.txt", texts)
    model_dir = make_model_dir(tmp_path / "m", "llama", texts=texts)
    flags = {"out_dir": str(tmp_path / "run"), "model.name": str(model_dir), "data.source": str(corpus),
             "data.validation_fraction": "0.2", "data.test_fraction": "0.2"}
    assert main(["prepare"] + [x for k, v in flags.items() for x in (f"--{k}", v)]) == 0
    cfg = load_config(None, flags)
    m = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    tok = load_tokenizer(cfg.model)
    assert m["complete"] is True and m["stage"] == "prepare"
    assert m["tokenizer_hash"] == tokenizer_hash(tok)
    splits = assign_splits(read_corpus(cfg.data), cfg.data)
    assert m["corpus_fingerprint"] == corpus_fingerprint(splits)
    sep = m["separator"]
    assert sep == [tok.convert_tokens_to_ids("<|endoftext|>")]
    for s in SPLITS:
        tokens = np.load(tmp_path / "run" / "data" / s / "tokens.npy")
        offsets = np.load(tmp_path / "run" / "data" / s / "offsets.npy")
        assert tokens.dtype == np.int32 and offsets.dtype == np.int64
        assert m["counts"][s] == {"tokens": len(tokens), "documents": len(splits[s])}
        expect = []
        for i, d in enumerate(splits[s]):
            expect += (sep if i else []) + tok(d, add_special_tokens=False).input_ids
        assert tokens.tolist() == expect
        loaded, _ = load_split(cfg.run_dir, s, tokenizer_hash(tok))
        assert np.array_equal(loaded, tokens)
    # a rerun with the same settings is skipped; other settings are refused without --force
    files = sorted((tmp_path / "run" / "data").rglob("*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert run(cfg) == m
    assert sorted((tmp_path / "run" / "data").rglob("*")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    cfg2 = load_config(None, {"out_dir": cfg.out_dir, "model.name": cfg.model.name, "data.source": cfg.data.source,
                              "data.validation_fraction": 0.2, "data.test_fraction": 0.2, "data.seed": 1})
    with pytest.raises(StageError, match="--force"):
        run(cfg2)


def test_tokenizer_hash_sees_the_vocab_not_the_padding_state():
    from mlpmem.components.lm import tokenizer_hash

    texts = make_texts()
    a, b = make_tokenizer(texts), make_tokenizer(texts, vocab_size=320)  # b has BPE merges, a has none
    h = tokenizer_hash(a)
    assert h == tokenizer_hash(make_tokenizer(texts)) and h != tokenizer_hash(b)
    a.pad_token = a.eos_token
    a(["short", "a much longer text than that"], padding="max_length", truncation=True, max_length=4)
    assert tokenizer_hash(a) == h  # calling with padding/truncation must not look like another tokenizer


# ----------------------------------------------------------------------------- text values that are not strings

BAD_VALUES = [None, 12345, 1.5, True, ["a", "b"], {"a": 1}]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_jsonl_non_string_text_is_refused_naming_the_line(tmp_path, value):
    """str() would make documents like "None" or "['a', 'b']" and exit 0; the record is refused by path:line."""
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha", "", value, "gamma"]) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{f.name}:3: 'text' is .*not a string.*--data.skip_bad_records"):
        read_corpus(DataConfig(source=str(f)))
    g = tmp_path / "d.json"  # a JSON array: the item's index
    g.write_text(json.dumps([{"text": "one"}, {"text": value}]), encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{g.name} item 1: 'text' is"):
        read_corpus(DataConfig(source=str(g)))


def test_skip_bad_records_skips_and_counts(tmp_path, caplog):
    f = tmp_path / "c.jsonl"
    recs = ["alpha", None, "", 7, ["x"], "gamma"]
    f.write_text("\n".join(json.dumps({"text": t}) for t in recs) + "\n", encoding="utf-8")
    report = {}
    with caplog.at_level("WARNING"):
        docs = read_corpus(DataConfig(source=str(f), skip_bad_records=True), report)["all"]
    assert docs == ["alpha", "", "gamma"]  # empty strings are kept here and dropped by assign_splits, as before
    assert report == {"skipped_records": 3}
    assert "skipped 3 record" in caplog.text and f"{f.name}:2" in caplog.text
    assert load_config(None, {"data.skip_bad_records": "true"}).data.skip_bad_records is True


def test_hf_non_string_text_is_refused_naming_split_and_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = make_texts(6, seed=5)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:4] + [None]}),
                          "test": datasets.Dataset.from_dict({"text": texts[4:]})}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(CorpusError, match=r"split 'train' row 4: 'text' is null"):
        read_corpus(DataConfig(source=f"hf:{tmp_path / 'ds'}"))
    report = {}
    out = read_corpus(DataConfig(source=f"hf:{tmp_path / 'ds'}", skip_bad_records=True), report)
    assert out["train"] == texts[:4] and report == {"skipped_records": 1}
    # a column that is not text at all (--data.text_field names the wrong one): refused at its first row
    datasets.Dataset.from_dict({"text": texts, "n": list(range(6))}).save_to_disk(str(tmp_path / "nums"))
    with pytest.raises(CorpusError, match=r"split 'all' row 0: 'n' is a number 0"):
        read_corpus(DataConfig(source=f"hf:{tmp_path / 'nums'}", text_field="n"))


def test_prepare_cli_refuses_bad_records_and_counts_skipped(tmp_path, capsys):
    from helpers import make_model_dir
    from mlpmem.cli import main

    texts = make_texts(30, seed=12)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts[:10] + [None] + texts[10:]) + "\n",
                      encoding="utf-8")
    flags = ["--out_dir", str(tmp_path / "run"), "--model.name", str(make_model_dir(tmp_path / "m", texts=texts)),
             "--data.source", str(corpus), "--data.validation_fraction", "0.2", "--data.test_fraction", "0.2"]
    assert main(["prepare"] + flags) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mlpmem ")]
    assert len(err) == 1 and f"{corpus}:11" in err[0] and "null" in err[0], err
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()
    assert main(["prepare"] + flags + ["--data.skip_bad_records", "true"]) == 0
    m = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert m["skipped_records"] == 1 and sum(c["documents"] for c in m["counts"].values()) == len(texts)


# ----------------------------------------------------------------------------- --data.order

def test_order_shuffled_is_a_seeded_permutation_of_corpus_order():
    from mlpmem.components.data import SPLITS, shuffle_documents

    docs = {"all": make_texts(100, seed=1)}
    kw = dict(validation_fraction=0.1, test_fraction=0.2)
    corpus = assign_splits(docs, DataConfig(seed=5, order="corpus", **kw))
    a = assign_splits(docs, DataConfig(seed=5, **kw))
    assert DataConfig().order == "shuffled"  # the default
    assert a == assign_splits(docs, DataConfig(seed=5, **kw))  # deterministic
    for s in SPLITS:  # the same documents in each split, each split in an order of its own
        assert sorted(a[s]) == sorted(corpus[s]) and a[s] == shuffle_documents(corpus[s], 5, s)
    assert a["train"] != corpus["train"] and a["test"] != corpus["test"]
    perm = np.random.default_rng([5, 1]).permutation(len(corpus["train"]))  # numpy's generator: the same anywhere
    assert a["train"] == [corpus["train"][i] for i in perm]
    b = assign_splits(docs, DataConfig(seed=6, **kw))
    assert b["train"] == shuffle_documents(assign_splits(docs, DataConfig(seed=6, order="corpus", **kw))["train"],
                                           6, "train") and b["train"] != a["train"]


def test_prepare_cuts_budgets_after_shuffling_and_keeps_corpus_order_as_before(tmp_path):
    from helpers import make_model_dir, write_corpus
    from mlpmem.components.data import shuffle_documents
    from mlpmem.components.lm import load_tokenizer, tokenizer_hash
    from mlpmem.files import StageError, fingerprint
    from mlpmem.stages.prepare import run

    texts = make_texts(60, seed=11)
    corpus = write_corpus(tmp_path / "c.txt", texts)
    model_dir = make_model_dir(tmp_path / "m", "llama", texts=texts)

    def cfg(out, **kw):
        return load_config(None, {"out_dir": str(tmp_path / out), "model.name": str(model_dir),
                                  "data.source": str(corpus), "data.validation_fraction": 0.2,
                                  "data.test_fraction": 0.2, "data.max_train_tokens": 400, **kw})

    def stream(out, split):
        return (np.load(tmp_path / out / "data" / split / "tokens.npy"),
                np.load(tmp_path / out / "data" / split / "offsets.npy"))

    # the split assignment as prepare has always made it: a seeded permutation, each split in corpus order
    order = np.random.default_rng(42).permutation(60)
    train = [texts[i] for i in sorted(order[24:])]
    tok = load_tokenizer(cfg("a").model)
    sep = [tok.convert_tokens_to_ids("<|endoftext|>")]

    # corpus: the stream and the fingerprint of a run prepared before --data.order existed
    old = cfg("old", **{"data.order": "corpus"})
    m = run(old)
    assert np.array_equal(stream("old", "train")[0], tokenize_split(tok, train, sep, 400)[0])
    splits = assign_splits(read_corpus(old.data), old.data)
    assert splits["train"] == train
    before = {k: v for k, v in old.to_dict()["data"].items() if k not in ("skip_bad_records", "order")}
    assert m["fingerprint"] == fingerprint("prepare", before, tokenizer_hash(tok), corpus_fingerprint(splits))
    # under the new default such a run is stale: refused naming the option that keeps it, never reused
    with pytest.raises(StageError, match="corpus order.*--data.order corpus.*--force"):
        run(cfg("old"))
    assert run(old) == m  # and still up to date with --data.order corpus

    # shuffled: the budget keeps the first whole documents of the split's seeded permutation
    run(cfg("new"))
    tokens, offsets = stream("new", "train")
    expect = shuffle_documents(train, 42, "train")
    assert [tokens.tolist(), offsets.tolist()] == [x.tolist() for x in tokenize_split(tok, expect, sep, 400)]
    kept = len(offsets) - 1
    assert 1 < kept < len(train) and expect[:kept] != train[:kept] and len(tokens) <= 400
