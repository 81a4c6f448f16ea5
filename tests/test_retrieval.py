"""Stages `index` and `knn-targets`, and kNN-LM evaluation, on tiny models and a corpus with a repeated document."""

import json
import shutil

import numpy as np
import pytest
import torch

import mlpmem.components.knn as knn
from helpers import make_model, make_model_dir, make_texts, make_tokenizer, tiny_config, write_corpus
from pathlib import Path

from mlpmem.artifacts import Datastore, TargetStore, load_split
from mlpmem.stages import eval as eval_stage, extract, index as index_stage, prepare, targets
from mlpmem.components.data import plan_windows
from mlpmem.components.index import exact_search
from mlpmem.components.lm import load_lm
from mlpmem.files import StageError

# corpus order: the tests below were built around where the copies of the repeated document (identical keys that
# tie at the k-th neighbour) fall in that layout, which the default shuffle of each split's documents moves
SMALL = {"data.validation_fraction": 0.1, "data.test_fraction": 0.1, "train.val_positions": 40, "knn.k": 24,
         "knn.store_ids": 24, "knn.query_batch": 200, "knn.temperature": 16.0, "data.order": "corpus"}
REPEATED = "Repeated: " + " ".join(["river"] * 200) + " and the king."


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Model dirs sharing one tokenizer (GPT-2; Llama with another seed), and a corpus with a repeated document.

    The repeated document holds a long run of one word, so windows over it produce identical keys at many rows
    (same tokens, same position in the window): duplicates in the datastore.
    """
    root = tmp_path_factory.mktemp("assets")
    texts = make_texts(24, seed=2)
    texts = texts[:8] + [REPEATED] + texts[8:16] + [REPEATED] + texts[16:]
    make_model_dir(root / "model-gpt2", "gpt2", texts=texts)
    make_model_dir(root / "model-llama", "llama", seed=1, texts=texts)
    write_corpus(root / "corpus.txt", texts)
    return root


@pytest.fixture(scope="module")
def base_run(assets, tmp_path_factory):
    """prepare + extract + index + knn-targets (Flat, GPT-2) once; tests copy it."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = config(assets, out)
    prepare.run(cfg)
    extract.run(cfg)
    index_stage.run(cfg)
    targets.run(cfg)
    return out


def config(assets, out, family="gpt2", **overrides):
    return tiny_config(assets, family, out_dir=str(out), **{**SMALL, **overrides})


def copy_run(base_run, dst, upto=("data", "datastore", "index", "targets")):
    for sub in upto:
        shutil.copytree(base_run / sub, dst / sub)
    return dst


def arrays(stage_dir):
    return {p.relative_to(stage_dir).as_posix(): p.read_bytes() for p in sorted(stage_dir.rglob("*.npy"))}


def as_dist(ids_row, probs_row):
    return {int(i): float(p) for i, p in zip(ids_row, probs_row) if i >= 0}


def assert_same_dist(a, b, atol=2e-3):
    assert set(a) == set(b), (a, b)
    for t in a:
        assert abs(a[t] - b[t]) <= atol, (t, a[t], b[t])


def test_targets_leave_out_only_the_own_id(assets, base_run):
    cfg = config(assets, base_run)
    ds = Datastore(cfg.run_dir)
    tg = TargetStore(cfg.run_dir)
    keys = np.concatenate([np.asarray(k) for k in ds.keys])
    _, inv, counts = np.unique(keys.view(np.uint8).reshape(ds.n, -1), axis=0, return_inverse=True,
                               return_counts=True)
    inv = inv.reshape(-1)
    dup_rows = np.flatnonzero(counts[inv] > 1)
    assert len(dup_rows) > 50, "the repeated document must give identical keys"
    # rows with an identical-key twin whose next token differs (the end of the run of one word): there,
    # dropping the first tied hit instead of the own id changes the distribution
    vals = ds.vals
    odd = [r for r in dup_rows if len(set(vals[inv == inv[r]].tolist())) > 1]
    assert len(odd) >= 2
    rng = np.random.default_rng(0)
    rows = np.unique(np.concatenate([rng.choice(dup_rows, 40, replace=False), odd]))
    k, T = cfg.knn.k, cfg.knn.temperature
    D, I = exact_search(ds.keys, keys[rows], k + 1)
    ids, probs = tg.rows.rows(rows)
    n_differs = n_self_differs = 0
    for j, r in enumerate(rows):
        twins = set(np.flatnonzero(inv == inv[r])) - {r}
        keep = I[j] != r
        Dj, Ij = D[j][keep][:k][None], I[j][keep][:k][None]
        assert twins & set(Ij[0].tolist()), "an identical key at another position must be a neighbour"
        i_ref, p_ref, _ = knn.sparse_knn_distribution(Dj, Ij, ds.vals, T, max_ids=cfg.knn.store_ids)
        assert_same_dist(as_dist(ids[j], probs[j]), as_dist(i_ref[0], p_ref[0]))
        # dropping the twins as well gives another distribution: the stored one counts them
        no_twin = np.array([i not in twins for i in Ij[0]])
        i_bad, p_bad, _ = knn.sparse_knn_distribution(Dj[:, no_twin], Ij[:, no_twin], ds.vals, T)
        a, b = as_dist(ids[j], probs[j]), as_dist(i_bad[0], p_bad[0])
        n_differs += set(a) != set(b) or any(abs(a[t] - b[t]) > 1e-2 for t in a)
        # and so does keeping the own id (no leave-one-out)
        i_self, p_self, _ = knn.sparse_knn_distribution(D[j][None, :k], I[j][None, :k], ds.vals, T)
        c = as_dist(i_self[0], p_self[0])
        n_self_differs += set(a) != set(c) or any(abs(a[t] - c[t]) > 1e-2 for t in a)
    assert n_differs > len(rows) // 2 and n_self_differs > len(rows) // 2


def test_validation_targets_search_without_leave_one_out(assets, base_run):
    cfg = config(assets, base_run)
    ds, tg = Datastore(cfg.run_dir), TargetStore(cfg.run_dir)
    val = ds.validation()
    assert tg.n_validation == val.n > 0
    xq = np.asarray(val.keys[0])
    D, I = exact_search(ds.keys, xq, cfg.knn.k)
    i_ref, p_ref, _ = knn.sparse_knn_distribution(D, I, ds.vals, cfg.knn.temperature, max_ids=cfg.knn.store_ids)
    ids, probs = tg.rows.rows(ds.n + np.arange(val.n))  # validation rows follow the train rows
    for j in range(val.n):
        assert_same_dist(as_dist(ids[j], probs[j]), as_dist(i_ref[j], p_ref[j]))


def test_targets_keep_every_distinct_id_by_default(assets, base_run, tmp_path):
    """Without --knn.store_ids the rows keep the whole distribution: as many ids as distinct neighbour tokens,
    probabilities that sum to 1 without renormalisation, nothing dropped, and bytes per position reported."""
    run = copy_run(base_run, tmp_path / "run", ("data", "datastore", "index"))
    cfg = config(assets, run, **{"knn.store_ids": None})
    m = targets.run(cfg)
    assert m["layout"] == "csr" and m["max_ids"] is None and m["dropped_mass"] == 0.0
    ds, tg = Datastore(run), TargetStore(run)
    rows = np.arange(0, ds.n, 37)
    D, I = exact_search(ds.keys, ds.key_rows(rows), cfg.knn.k + 1)
    ids, probs = tg.rows.rows(rows)
    for j, r in enumerate(rows):
        keep = I[j] != r
        nbr_tokens = set(ds.vals[I[j][keep][:cfg.knn.k]].tolist())
        assert set(ids[j][ids[j] >= 0].tolist()) == nbr_tokens
    assert np.allclose(probs.sum(1), 1.0, atol=2e-3)
    assert m["mean_distinct_ids"] == pytest.approx(tg.rows.starts[ds.n] / ds.n)  # train rows come first
    per_id = 6 * m["mean_distinct_ids"]  # int32 id + float16 probability, plus an int64 offset per row
    assert per_id + 8 < m["bytes_per_position"] < per_id + 8 + 1024 / ds.n


def test_ivf_with_full_nprobe_equals_flat_and_reports_recall(assets, base_run, tmp_path):
    cfg = config(assets, copy_run(base_run, tmp_path / "run", ("data", "datastore")),
                 **{"index.factory": "IVF4,Flat", "index.nprobe": 4})
    m = index_stage.run(cfg)
    assert m["factory"] == "IVF4,Flat" and m["ntotal"] == Datastore(cfg.run_dir).n
    rec = m["recall_at_k"]
    assert rec["k"] == cfg.knn.k and rec["nprobe"] == 4
    assert rec["recall"] == 1.0  # exhaustive: ties between identical keys count as found
    targets.run(cfg)
    assert arrays((Path(cfg.run_dir) / 'targets')) == arrays((Path(base_run) / 'targets'))

    # one list of four: approximate, and the manifest says so
    low = config(assets, cfg.run_dir, **{"index.factory": "IVF4,Flat", "index.nprobe": 1, "force": True})
    rec1 = index_stage.run(low)["recall_at_k"]
    assert rec1["nprobe"] == 1 and 0.0 < rec1["recall"] < 1.0


def test_killed_targets_resume_byte_identical(assets, base_run, tmp_path, monkeypatch):
    over = {"knn.query_batch": 100, "extract.shards": 2}
    ref = config(assets, copy_run(base_run, tmp_path / "ref", ("data",)), **over)
    extract.run(ref)
    index_stage.run(ref)
    targets.run(ref)

    cfg = config(assets, tmp_path / "run", **over)
    shutil.copytree(ref.run_dir / "data", cfg.run_dir / "data")
    shutil.copytree(ref.run_dir / "datastore", cfg.run_dir / "datastore")
    shutil.copytree(ref.run_dir / "index", cfg.run_dir / "index")
    n = Datastore(cfg.run_dir).n
    n_blocks = sum(-(-(s["stop"] - s["start"]) // 100) for s in Datastore(cfg.run_dir).manifest["shards"])
    die_after = n_blocks // 2 + 2  # shard 0 done, shard 1 part done
    real, calls = knn.search, {"n": 0, "die": True}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["die"] and calls["n"] > die_after:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(knn, "search", dying)
    with pytest.raises(RuntimeError, match="killed"):
        targets.run(cfg)
    out = (Path(cfg.run_dir) / 'targets')
    assert not (out / "manifest.json").exists()
    calls.update(n=0, die=False)
    m = targets.run(cfg)
    n_val_blocks = -(-Datastore(cfg.run_dir).validation().n // 100)  # the validation targets come after
    assert calls["n"] == n_blocks - die_after + n_val_blocks  # only the unfinished blocks were searched again
    assert m["n_positions"] == n and len(m["shards"]) == 2
    assert arrays(out) == arrays((Path(ref.run_dir) / 'targets'))


def test_teacher_with_the_same_tokenizer(assets, base_run, tmp_path):
    # teacher: the GPT-2 base run; student: a Llama model (other family, other seed) with the same tokenizer
    student = config(assets, tmp_path / "student", "llama", **{"knn.teacher_dir": str(base_run)})
    prepare.run(student)
    extract.run(student)
    t_ds, s_ds = Datastore(base_run), Datastore(student.run_dir)
    assert t_ds.manifest["model"]["tokenizer_hash"] == s_ds.manifest["model"]["tokenizer_hash"]
    assert t_ds.manifest["model"]["fingerprint"] != s_ds.manifest["model"]["fingerprint"]
    m = targets.run(student)  # no index of its own needed
    assert m["teacher"] == str(base_run)
    # the targets are the teacher's own targets, row for row (same positions, teacher keys)
    assert arrays((Path(student.run_dir) / 'targets')) == arrays((Path(base_run) / 'targets'))
    from mlpmem.stages import train

    tm = train.run(config(assets, student.run_dir, "llama", **{"knn.teacher_dir": str(base_run),
                                                               "train.max_steps": 3}))
    assert tm["complete"] and tm["summary"]["steps"] == 3

    # a student whose validation keys cover other positions than the teacher's cannot use its targets
    other = config(assets, tmp_path / "student2", "llama", **{"knn.teacher_dir": str(base_run),
                                                               "train.val_positions": 30})
    prepare.run(other)
    extract.run(other)
    with pytest.raises(StageError, match="--train.val_positions"):
        targets.run(other)


def test_teacher_with_another_tokenizer_is_refused(assets, base_run, tmp_path):
    other = tmp_path / "other-assets"
    tok = make_tokenizer(make_texts(24, seed=2), vocab_size=300)  # with merges: other token ids
    make_model("gpt2", len(tok)).save_pretrained(other / "model-gpt2")
    tok.save_pretrained(other / "model-gpt2")
    shutil.copy(assets / "corpus.txt", other / "corpus.txt")
    teacher = tiny_config(other, "gpt2", out_dir=str(tmp_path / "teacher"), **SMALL)
    prepare.run(teacher)
    extract.run(teacher)
    index_stage.run(teacher)
    student = config(assets, copy_run(base_run, tmp_path / "student", ("data", "datastore")),
                     **{"knn.teacher_dir": str(teacher.run_dir)})
    with pytest.raises(StageError, match="tokenizer"):
        targets.run(student)
    assert not ((Path(student.run_dir) / 'targets') / "manifest.json").exists()


def test_bad_inputs_give_clear_errors(assets, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run", ("data", "datastore", "index"))
    with pytest.raises(StageError, match="lower --knn.k"):
        targets.run(config(assets, run, **{"knn.k": 10**6}))
    shutil.rmtree(run / "index")
    with pytest.raises(StageError, match="mlpmem index"):
        targets.run(config(assets, run))
    # an index over another datastore (re-extracted since)
    index_stage.run(config(assets, run))
    extract.run(config(assets, run, **{"window.stride": 16, "force": True}))
    with pytest.raises(StageError, match="mlpmem index --force"):
        targets.run(config(assets, run, **{"window.stride": 16}))


def test_rerun_skips_changed_config_is_refused_force_rebuilds(assets, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run")
    cfg = config(assets, run)
    mi = json.loads((run / "index" / "manifest.json").read_text())
    mt = json.loads((run / "targets" / "manifest.json").read_text())
    before = arrays(run / "targets")
    assert index_stage.run(cfg) == mi
    assert targets.run(cfg) == mt
    assert arrays(run / "targets") == before

    with pytest.raises(StageError, match="--force"):
        index_stage.run(config(assets, run, **{"index.factory": "IVF4,Flat"}))
    with pytest.raises(StageError, match="--force"):
        targets.run(config(assets, run, **{"knn.temperature": 2.0}))
    m = targets.run(config(assets, run, **{"knn.temperature": 2.0, "force": True}))
    assert m["temperature"] == 2.0 and m["fingerprint"] != mt["fingerprint"]
    assert arrays(run / "targets") != before
    assert targets.run(config(assets, run, **{"knn.temperature": 2.0})) == m


def test_targets_can_leave_out_the_whole_document(assets, base_run, tmp_path):
    """--knn.exclude document: no train position keeps a neighbour from its own document (the repeated document's
    twins in the other copy stay), the rest is the leave-one-out rule; validation targets are unchanged; the
    default keeps the fingerprint made before the option existed."""
    from mlpmem.artifacts import load_offsets
    from mlpmem.files import fingerprint

    base = json.loads((base_run / "targets" / "manifest.json").read_text())
    cfg0 = config(assets, base_run)
    assert cfg0.knn.exclude == "position" and base["exclude"] == "position" and "dropped_same_doc" not in base
    old_fp = fingerprint("knn-targets", base["upstream"], cfg0.knn.k, cfg0.knn.temperature, None,
                         cfg0.knn.distances, cfg0.knn.store_ids, cfg0.knn.query_batch, cfg0.index.nprobe,
                         *Datastore(base_run).scope)
    assert base["fingerprint"] == old_fp

    run = copy_run(base_run, tmp_path / "run", ("data", "datastore", "index"))
    cfg = config(assets, run, **{"knn.exclude": "document"})
    m = targets.run(cfg)
    assert m["exclude"] == "document" and m["fingerprint"] != base["fingerprint"] and "data" in m["upstream"]
    assert m["dropped_same_doc"] > 1 and 0 < m["dropped_same_doc_mass"] < 1
    assert m["mean_neighbours"] < cfg.knn.k
    ds, tg = Datastore(run), TargetStore(run)
    starts = load_offsets(run, "train")
    doc = np.repeat(np.arange(len(starts) - 1), np.diff(starts))[:ds.n]  # each row's document, counted out
    keys = np.concatenate([np.asarray(k) for k in ds.keys])
    k, T = cfg.knn.k, cfg.knn.temperature
    # the reference searches the stage's index in the stage's blocks (near-identical keys tie, and a tie broken
    # otherwise at the (k + 1)-th hit would change the row), then leaves out the whole document by hand
    from mlpmem.artifacts import open_index
    from mlpmem.components.index import search

    index, _ = open_index(run, cfg.index.nprobe)
    qb = cfg.knn.query_batch
    hits = np.concatenate([search(index, keys[s:s + qb], k + 1)[1] for s in range(0, ds.n, qb)])
    other = doc[hits] != doc[:, None]
    I = np.where(other & (np.cumsum(other, 1) <= k), hits, -1)
    D = knn.recompute_distances(ds.keys, keys.astype(np.float32), I)
    i_ref, p_ref, _ = knn.sparse_knn_distribution(D, I, ds.vals, T, max_ids=cfg.knn.store_ids)
    ids, probs = tg.rows.rows(np.arange(ds.n))
    for r in range(ds.n):
        assert_same_dist(as_dist(ids[r], probs[r]), as_dist(i_ref[r], p_ref[r]))
    # identical keys (the repeated document's run of one word): twins in the own document were hits and are gone;
    # twins in another copy of it (when the split put both copies in train) stay
    _, inv = np.unique(keys.view(np.uint8).reshape(ds.n, -1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    twin = (inv[hits] == inv[:, None]) & (hits != np.arange(ds.n)[:, None])
    assert (twin & ~other).any(1).sum() > 10
    across = [r for r in range(ds.n) if len(set(doc[inv == inv[r]].tolist())) > 1]
    assert not across or (twin & other)[across].any(1).sum() > 0
    # validation targets: searched the same way as before (other documents, nothing to leave out)
    before = arrays(base_run / "targets" / "validation")
    assert arrays(run / "targets" / "validation") == before


# ----------------------------------------------------------------------------- kNN-LM evaluation

def _direct_ppl(lm, tokens, context, stride):
    """Perplexity by plain full forwards of the LM (logits from the model itself), windows as planned."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in plan_windows(len(tokens), context, stride):
            ids = torch.from_numpy(tokens[w.begin:w.end + 1].astype(np.int64))[None]
            lp = lm.model(ids[:, :-1]).logits[0].double().log_softmax(-1)
            sel = np.arange(w.score_from - w.begin, w.end - w.begin)
            gold = ids[0, 1:][sel]
            nll -= lp[sel].gather(-1, gold[:, None]).sum().item()
            n += len(sel)
    return float(np.exp(nll / n))


def test_knn_lm_at_lambda_zero_is_the_base_lm(assets, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run", ("data", "datastore", "index"))
    over = {"eval.systems": ["base", "knn"], "eval.lambdas": [0.0, 0.5, 1.0], "eval.knn_temperatures": [1.0, 8.0]}
    cfg = config(assets, run, **over)
    eval_stage.run(cfg)
    res = json.loads((run / "eval" / "results.json").read_text())
    lm = load_lm(cfg.model)
    for split in ("validation", "test"):
        base = res["sweeps"][split]["base"][0]["ppl"]
        rows = res["sweeps"][split]["knn"]
        # the configured grid, widened past a tuned edge if the best T sat on one
        assert {(r["lam"], r["T"]) for r in rows} == \
            {(lam, T) for lam in (0.0, 0.5, 1.0) for T in res["grids"]["knn_temperatures"]}
        assert {1.0, 8.0} <= set(res["grids"]["knn_temperatures"])
        for r in rows:
            if r["lam"] == 0.0:
                assert r["ppl"] == base
        assert any(r["ppl"] != base for r in rows if r["lam"] > 0)  # kNN-LM does change something
        tokens, _ = load_split(cfg.run_dir, split)
        assert base == pytest.approx(_direct_ppl(lm, tokens, cfg.window.context, cfg.window.stride), rel=1e-5)
        assert res["splits"][split]["systems"]["base"]["ppl"] == base

    fixed = config(assets, run, **over, **{"eval.lam": 0.0, "eval.out_name": "eval-lam0"})
    eval_stage.run(fixed)
    res0 = json.loads((run / "eval-lam0" / "results.json").read_text())
    assert res0["settings"]["knn"]["lam"] == 0.0
    for split in ("validation", "test"):
        systems = res0["splits"][split]["systems"]
        assert systems["knn"]["ppl"] == systems["base"]["ppl"] == res["splits"][split]["systems"]["base"]["ppl"]


def test_knn_eval_refuses_a_datastore_of_another_model_or_hook(assets, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "run", ("data", "datastore", "index"))
    over = {"eval.systems": ["base", "knn"]}
    with pytest.raises(StageError, match="--model.name"):
        eval_stage.run(config(assets, run, "llama", **over))  # same tokenizer, other model
    with pytest.raises(StageError, match="--extract.hook"):
        eval_stage.run(config(assets, run, **over, **{"extract.hook": "transformer.h.0.ln_2"}))
    with pytest.raises(StageError, match="--knn.k"):
        eval_stage.run(config(assets, run, **over, **{"knn.k": 10**6}))
    # a run without an index yet only skips kNN-LM
    shutil.rmtree(run / "index")
    eval_stage.run(config(assets, run, **over))
    res = json.loads((run / "eval" / "results.json").read_text())
    assert "knn" not in res["splits"]["test"]["systems"] and "base" in res["splits"]["test"]["systems"]


def test_target_temperature_is_kNN_LMs_best_on_validation(assets, base_run, tmp_path):
    """--knn.temperature null: the targets use the temperature at which kNN-LM does best on the validation
    positions, the same choice `eval` makes on those positions, and the manifest keeps the sweep."""
    from mlpmem.components.capture import resolve_hook
    from mlpmem.components.knn import knn_scorer
    from mlpmem.components.scoring import score_tokens
    from mlpmem.components.tuning import settle

    run = copy_run(base_run, tmp_path / "run", ("data", "datastore", "index"))
    grid = [0.5, 4.0, 16.0, 64.0]
    cfg = config(assets, run, **{"knn.temperature": None, "eval.knn_temperatures": grid, "train.val_positions": 200})
    m = targets.run(cfg)
    assert m["temperature"] in grid and set(m["temperature_sweep"]["ppl_by_T"]) == {str(t) for t in grid}
    best = min(m["temperature_sweep"]["ppl_by_T"].items(), key=lambda kv: kv[1])[0]
    assert float(best) == m["temperature"]
    # the same sweep done by hand on those validation positions
    lm = load_lm(cfg.model)
    ds = Datastore(run)
    from mlpmem.artifacts import open_index

    index, _ = open_index(run, cfg.index.nprobe)
    tokens, _ = load_split(run, "validation")
    sc = score_tokens(lm, tokens[:201], cfg.window.context, cfg.window.stride, 4,
                      hook=resolve_hook(lm.model, "auto"),
                      knn_scorer=knn_scorer(index, ds.keys, ds.vals, cfg.knn.k, grid, True))
    assert settle({"validation": sc}, cfg)["settings"]["knn"]["T"] == m["temperature"]
    assert m["upstream"]["data"]  # the sweep read validation text: a re-prepared corpus makes it stale
    # the validation targets really use that temperature
    val = ds.validation()
    D, I = exact_search(ds.keys, np.asarray(val.keys[0]), cfg.knn.k)
    i_ref, p_ref, _ = knn.sparse_knn_distribution(D, I, ds.vals, m["temperature"])
    ids, probs = TargetStore(run).rows.rows(ds.n + np.arange(5))
    for j in range(5):
        assert_same_dist(as_dist(ids[j], probs[j]), as_dist(i_ref[j], p_ref[j]))
