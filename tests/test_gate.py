"""The adaptive gate (components/gate.py): per-token λ from features of the two distributions, fitted on validation.

At its start (w = 0, b = 0) it is the fixed λ exactly; fitted where the memory helps on one cluster of tokens it
learns λ high there and low elsewhere and beats the fixed λ; it falls back to the fixed λ when the held-out half of
the validation documents disagrees; its features never read the gold token; eval reports it on every split; the
joint LM with the gate attached gives the eval scoring's gated log-probs (teacher-forced and in generate()).
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from helpers import make_texts, tiny_config, tiny_lm, write_corpus
from mlpmem.artifacts.readers import load_scores, save_scores, tuned_settings
from mlpmem.components.capture import register_capture, resolve_hook
from mlpmem.components.gate import FEATURES, Gate, features, fit_gate, gated_gold, split_documents
from mlpmem.components.interpolate import memory_logprobs, mix_gold, mix_logprobs, mix_logprobs_per_token
from mlpmem.components.interpolate import perplexity as ppl
from mlpmem.components.joint import MemoryAttached, attach_memory, detach_memory
from mlpmem.components.lm import LoadedLM
from mlpmem.components.report import results_table
from mlpmem.components.scoring import Scored, score_tokens
from mlpmem.components.tuning import settle
from mlpmem.config import load_config


class StandInMemory(nn.Module):
    """hidden (..., d) -> logits (..., V), strong enough to disagree with the LM on some tokens."""

    def __init__(self, d=32, vocab=99):
        super().__init__()
        torch.manual_seed(123)
        self.proj = nn.Linear(d, vocab)
        nn.init.normal_(self.proj.weight, std=0.5)
        self.config = SimpleNamespace(meta={})

    def forward(self, x):
        return self.proj(x)


def some_gate(lam0=0.3, T_mem=1.0, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return Gate(lam0=lam0, lam_max=0.9, T_mem=T_mem, w=tuple(rng.normal(0, scale, len(FEATURES))), b=0.2,
                mu=tuple(rng.normal(0, 1, len(FEATURES))), sd=tuple(rng.uniform(0.5, 2, len(FEATURES))))


# ---------------------------------------------------------------------------------------------------- the gate

def test_gate_at_its_start_is_the_fixed_lambda_exactly():
    rng = np.random.default_rng(0)
    lm, mem = np.log(rng.uniform(0.01, 1, 500)), np.log(rng.uniform(0.001, 1, 500))
    feats = rng.normal(size=(500, len(FEATURES))).astype(np.float32)
    for lam0 in (0.05, 0.25, 0.6, 0.95):
        gate = Gate.start(lam0, 1.0, feats.mean(0), feats.std(0))
        assert set(gate.w) == {0.0} and gate.b == 0.0 and (gate.lam(feats) == lam0).all()
        assert np.array_equal(gated_gold(lm, mem, gate.lam(feats)), mix_gold(lm, mem, lam0))
        # the same in torch (the joint LM's path), against the fixed-λ mixture of the joint LM
        a = torch.log_softmax(torch.randn(4, 7, 99), -1)
        b = torch.log_softmax(torch.randn(4, 7, 99) * 3, -1)
        assert torch.equal(mix_logprobs_per_token(a, b, gate.lam(features(a, b))), mix_logprobs(a, b, lam0))
    # away from the start: lam_max * sigmoid(logit(lam0 / lam_max) + b + w . (f - mu) / sd), within (0, lam_max)
    g = some_gate()
    z = ((feats - np.array(g.mu)) / np.array(g.sd)) @ np.array(g.w) + g.b
    want = g.lam_max / (1 + np.exp(-(np.log(g.lam0 / g.lam_max) - np.log1p(-g.lam0 / g.lam_max) + z)))
    np.testing.assert_allclose(g.lam(feats), want, rtol=1e-12)
    assert Gate.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_features_match_their_definitions():
    lm = torch.log_softmax(torch.randn(5, 99), -1)
    mem = torch.log_softmax(torch.randn(5, 99) * 2, -1)
    mem[0, lm[0].argmax()] = -float("inf")  # a memory ruling the LM's top token out: the gap is clipped
    f = features(lm, mem)
    p, q = lm.exp(), mem.exp()
    top = lm.argmax(-1)
    torch.testing.assert_close(f[:, 0], -(p * lm).sum(-1))
    torch.testing.assert_close(f[:, 1], p.max(-1).values)
    torch.testing.assert_close(f[:, 2], -(q * mem.clamp_min(-1e30)).sum(-1))
    torch.testing.assert_close(f[:, 3], q.max(-1).values)
    assert torch.equal(f[:, 4], (mem.argmax(-1) == top).float())
    gap = mem.gather(-1, top[:, None])[:, 0] - lm.gather(-1, top[:, None])[:, 0]
    torch.testing.assert_close(f[1:, 5], gap[1:])
    assert f[0, 5] == -30.0 and torch.isfinite(f).all()


# ---------------------------------------------------------------------------------------------------- fitting

def clustered(n, seed, flip_docs=None, n_docs=80):
    """Synthetic validation positions: the memory is good (p 0.6) on a cluster the features reveal (mem_maxprob
    high) and bad (p 0.0005) elsewhere; the LM is mediocre (p 0.05) everywhere. ``flip_docs``: documents where the
    relation is inverted."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, len(FEATURES))).astype(np.float32)
    docs = np.sort(rng.integers(0, n_docs, n))
    good = feats[:, 3] > 0.3
    if flip_docs is not None:
        good = np.where(np.isin(docs, flip_docs), ~good, good)
    lm = np.log(np.full(n, 0.05) * rng.uniform(0.7, 1.3, n))
    mem = np.log(np.where(good, 0.6, 0.0005) * rng.uniform(0.7, 1.3, n))
    return lm, mem, feats, docs, feats[:, 3] > 0.3


def best_fixed(lm, mem):
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    return float(grid[np.argmin([-mix_gold(lm, mem, g).mean() for g in grid])])


def test_fit_learns_lambda_high_where_the_memory_helps_and_low_elsewhere():
    lm, mem, feats, docs, cluster = clustered(6000, seed=1)
    lam0 = best_fixed(lm, mem)
    gate, report = fit_gate(lm, mem, feats, docs, lam0, 1.0, seed=0)
    assert gate is not None and report["used"], report
    assert report["fit"]["gate_nll"] < report["fit"]["fixed_nll"] and report["check"]["change"] < -0.1
    # unseen positions of the same kind
    lm2, mem2, feats2, _, cluster2 = clustered(4000, seed=2)
    lam = gate.lam(feats2)
    assert lam[cluster2].mean() > 0.8 > lam0 and lam[~cluster2].mean() < 0.1 < lam0 / 3
    assert ppl(gated_gold(lm2, mem2, lam)) < 0.8 * ppl(mix_gold(lm2, mem2, lam0))
    assert 0 < lam.min() and lam.max() < gate.lam_max  # never all memory: the LM keeps >= 10% everywhere


def test_fit_keeps_the_fixed_lambda_when_the_held_out_half_disagrees():
    docs_all = np.arange(80)
    check_docs = docs_all[~split_documents(docs_all, seed=0)]
    lm, mem, feats, docs, _ = clustered(6000, seed=3, flip_docs=check_docs)
    lam0 = best_fixed(lm, mem)
    gate, report = fit_gate(lm, mem, feats, docs, lam0, 1.0, seed=0)
    assert gate is None and not report["used"] and report["reason"].startswith("fixed λ: the gate does not")
    assert report["fit"]["gate_nll"] < report["fit"]["fixed_nll"]  # it did fit, and was refused on the check half
    assert report["check"]["gate_nll"] >= report["check"]["fixed_nll"] and report["gate"] is not None
    assert fit_gate(lm, mem, feats, np.zeros(len(lm), int), lam0, 1.0)[0] is None  # one document: nothing to check
    assert fit_gate(lm, mem, feats, docs, 0.0, 1.0)[1]["lam_start"] == 0.01  # λ 0 or 1: starts just inside
    assert fit_gate(lm, mem, feats, docs, 1.0, 1.0)[1]["lam_start"] == 0.99


def _scored(lm, mem, feats):
    return Scored(lm=lm, mem=mem[None], mem_T=[1.0], lm_feats=feats[:, :2], mem_feats=feats[None, :, 2:])


def test_eval_reports_memory_gate_on_every_split_and_falls_back_out_of_domain():
    lm, mem, feats, docs, _ = clustered(6000, seed=4)
    # out of domain: the memory never helps, and its features say so (low mem_maxprob)
    rng = np.random.default_rng(5)
    o_feats = rng.normal(size=(3000, len(FEATURES))).astype(np.float32)
    o_feats[:, 3] = rng.uniform(-3, -0.5, 3000)
    o_lm, o_mem = np.log(np.full(3000, 0.05)), np.log(np.full(3000, 0.0005))
    o_docs = np.sort(rng.integers(0, 30, 3000))
    cfg = load_config(None, {"eval.systems": ["base", "memory", "memory+gate"], "eval.memory_temperatures": [1.0]})
    res = settle({"validation": _scored(lm, mem, feats), "ood": _scored(o_lm, o_mem, o_feats)}, cfg,
                 {"validation": docs, "ood": o_docs})
    st = res["settings"]["memory+gate"]
    assert res["gate"]["used"] and st["gate"] == res["gate"]["gate"]
    assert (st["lam"], st["T_mem"]) == (res["settings"]["memory"]["lam"], res["settings"]["memory"]["T_mem"])
    for split in ("validation", "ood"):
        s = res["splits"][split]
        assert "vs_base" in s["systems"]["memory+gate"] and "memory+gate vs memory" in s["comparisons"]
        assert s["systems"]["memory+gate"]["ppl"] < s["systems"]["memory"]["ppl"]
    ood = res["splits"]["ood"]["systems"]
    assert ood["memory"]["ppl"] > 1.1 * ood["base"]["ppl"] and ood["memory+gate"]["ppl"] < 1.01 * ood["base"]["ppl"]
    table = results_table(res)
    assert "| memory+gate | lam=" in table and "gate=fitted" in table and "memory+gate: per-token λ" in table
    # the fixed λ kept: memory+gate is the memory exactly
    fixed = settle({"validation": _scored(lm, mem, feats)}, cfg, {"validation": np.zeros(len(lm), int)})
    v = fixed["splits"]["validation"]["systems"]
    assert fixed["settings"]["memory+gate"]["gate"] is None and v["memory+gate"]["ppl"] == v["memory"]["ppl"]
    assert "gate=off (fixed lam)" in results_table(fixed)
    # not requested: no memory+gate, no gate report
    plain = settle({"validation": _scored(lm, mem, feats)}, load_config(None, {"eval.memory_temperatures": [1.0]}))
    assert "memory+gate" not in plain["settings"] and "gate" not in plain


def test_memory_gate_needs_the_memory_system():
    with pytest.raises(Exception, match="memory\\+gate"):
        load_config(None, {"eval.systems": ["base", "memory+gate"]})


# ---------------------------------------------------------------------------------------------------- scoring

@pytest.fixture(params=["gpt2", "llama", "gemma2"])
def lm(request):
    model = tiny_lm(request.param)
    yield LoadedLM(model, tokenizer=None, identity={}, device=torch.device("cpu"))
    detach_memory(model)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 98, n).astype(np.int32)


def _score(lm, tokens, memory, temps=(1.0, 2.0), context=64, stride=32):
    hook = resolve_hook(lm.model, "auto", -1)
    return score_tokens(lm, tokens, context, stride, batch_size=2, hook=hook, memory=memory, mem_temperatures=temps,
                        gate_features=True)


def test_scored_features_are_those_of_the_full_distributions_and_never_read_the_gold_token(lm):
    memory = StandInMemory()
    tokens = _tokens(60)
    sc = _score(lm, tokens, memory)
    assert sc.lm_feats.shape == (59, 2) and sc.mem_feats.shape == (2, 59, 4) and sc.lm_feats.dtype == np.float32
    # reference: the joint LM's features from a direct forward (one window holds the whole text)
    captured = []
    hp = resolve_hook(lm.model, "auto", -1)
    h = register_capture(lm.model.get_submodule(hp.module), hp.kind, captured.append)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.from_numpy(tokens[:-1].astype(np.int64))[None]).logits[0]
        ref = features(torch.log_softmax(logits.float(), -1), memory_logprobs(memory(captured[-1][0]), 2.0))
    h.remove()
    np.testing.assert_allclose(sc.gate_features(2.0), ref.numpy(), atol=2e-5, rtol=1e-5)
    # another gold token at position k - 1 (token k changed): the features up to there are unchanged
    k = 40
    other = tokens.copy()
    other[k] = (tokens[k] + 1) % 98
    sc2 = _score(lm, other, memory)
    assert sc2.lm[k - 1] != sc.lm[k - 1] and (sc2.mem[:, k - 1] != sc.mem[:, k - 1]).all()
    np.testing.assert_array_equal(sc2.lm_feats[:k], sc.lm_feats[:k])
    np.testing.assert_array_equal(sc2.mem_feats[:, :k], sc.mem_feats[:, :k])
    assert not np.array_equal(sc2.lm_feats[k:], sc.lm_feats[k:])  # the context changed after it


def test_scores_keep_their_features_when_saved_and_joined(tmp_path):
    rng = np.random.default_rng(0)
    parts = [Scored(lm=rng.normal(size=n), mem=rng.normal(size=(2, n)), mem_T=[1.0, 2.0],
                    lm_feats=rng.normal(size=(n, 2)).astype(np.float32),
                    mem_feats=rng.normal(size=(2, n, 4)).astype(np.float32)) for n in (5, 0, 7)]
    for i, p in enumerate(parts):
        save_scores(tmp_path / f"{i}.npz", p, "fp")
    back = Scored.join([load_scores(tmp_path / f"{i}.npz", "fp") for i in range(3)])
    assert back.n == 12 and back.mem_feats.shape == (2, 12, 4)
    np.testing.assert_array_equal(back.gate_features(2.0), np.concatenate(
        [np.concatenate([p.lm_feats, p.mem_feats[1]], 1) for p in parts]))


# ---------------------------------------------------------------------------------------------------- generation

def test_gated_joint_lm_gives_the_gated_scores(lm):
    """Teacher-forced: MemoryAttached with a gate = eval's gated log-probs of the same text; generate() (KV cache,
    newest position only) picks the argmax of those log-probs at every step."""
    memory = StandInMemory()
    tokens = _tokens(50, seed=3)
    sc = _score(lm, tokens, memory)
    gate = some_gate(T_mem=2.0, scale=0.7)
    lam = gate.lam(sc.gate_features(2.0))
    assert lam.std() > 0.02  # a gate that really varies per token
    want = gated_gold(sc.lm, sc.mem[1], lam)
    pair = MemoryAttached(lm.model, memory, lam=0.3, gate=gate)
    assert pair.handle.mem_temperature == 2.0
    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    try:
        with torch.no_grad():
            out = pair(input_ids=ids[:, :-1]).logits[0]
            gen = lm.model.generate(ids[:, :12], attention_mask=torch.ones(1, 12, dtype=torch.long),
                                    max_new_tokens=6, do_sample=False, pad_token_id=0)
            lp_gen = pair(input_ids=gen[:, :-1]).logits[0]  # the joint LM's log-probs, teacher-forced
    finally:
        pair.detach()
    got = out.gather(-1, ids[0, 1:, None])[:, 0].double().numpy()
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    # generate() chose the argmax of the gated log-probs at each step, which are eval's gated scores of that text
    assert torch.equal(lp_gen[11:].argmax(-1), gen[0, 12:])
    sc_gen = _score(lm, gen[0].numpy().astype(np.int32), memory)
    scored = gated_gold(sc_gen.lm, sc_gen.mem[1], gate.lam(sc_gen.gate_features(2.0)))
    np.testing.assert_allclose(lp_gen.gather(-1, gen[0, 1:, None])[:, 0].double().numpy(), scored, atol=5e-5)
    with pytest.raises(ValueError, match="temperature"):
        attach_memory(lm.model, memory, gate=gate, mem_temperature=1.0)


# ---------------------------------------------------------------------------------------------------- end to end

def test_eval_stage_fits_saves_and_reports_the_gate(tmp_path, capsys):
    from mlpmem.cli import main

    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
    cfg = tiny_config(tmp_path, "llama", **{"eval.systems": ["base", "memory", "memory+gate"],
                                            "eval.memory_temperatures": [1.0]})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp_path / "cfg.yaml")]) == 0
    ev = tmp_path / "run" / "eval"
    res = json.loads((ev / "results.json").read_text())
    saved = json.loads((ev / "gate.json").read_text())
    assert saved["fingerprint"] == res["fingerprint"] and saved["used"] == res["gate"]["used"]
    for split in ("validation", "test"):
        r = res["splits"][split]["systems"]["memory+gate"]
        assert 1.0 < r["ppl"] < 1e4 and "vs_base" in r
    gate = tuned_settings(tmp_path / "run", "eval").gate
    assert (gate is not None) == res["gate"]["used"]
    if gate is not None:
        assert gate.to_dict() == res["settings"]["memory+gate"]["gate"] == saved["gate"]
    assert "| memory+gate |" in capsys.readouterr().out
    with np.load(next((ev / "scores").glob("test-*.npz"))) as z:
        assert z["lm_feats"].shape[1] == 2 and z["mem_feats"].shape[0] == 1
