"""mlpmem.components.scoring: sliding-window scoring against direct forwards, and the mixing / tuning math."""

import math

import numpy as np
import pytest
import torch

from helpers import make_model
from mlpmem.config import load_config
from mlpmem.components.data import batch_windows, plan_windows
from mlpmem.components.interpolate import mix3, perplexity as ppl
from mlpmem.components.interpolate import mix_gold as mix2
from mlpmem.components.scoring import Scored, score_tokens
from mlpmem.components.tuning import bootstrap_changes, doc_ids_of, settle, sweep
from mlpmem.components.lm import LoadedLM

VOCAB = 61


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    model = make_model(request.param, VOCAB, seed=1, n_positions=128)
    return LoadedLM(model, tokenizer=None, identity={}, device=torch.device("cpu"))


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int32)


def _window_begin(t: int, context: int, stride: int) -> int:
    """Start of the window that scores position t, from the plan's definition (not from plan_windows): the first
    window scores [0, context); window k >= 1 starts at k * stride and scores [(k-1) * stride + context, ...)."""
    return 0 if t < context else ((t - context) // stride + 1) * stride


def _reference_logprobs(model, tokens: np.ndarray, context: int, stride: int) -> np.ndarray:
    """log p(tokens[t+1] | tokens[begin(t) .. t]) with one unpadded forward per position."""
    out = []
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            b = _window_begin(t, context, stride)
            assert t - b < context and (t < context or t - b >= context - stride)
            ids = torch.from_numpy(tokens[b:t + 1].astype(np.int64))[None]
            out.append(model(input_ids=ids).logits[0, -1].double().log_softmax(-1)[tokens[t + 1]].item())
    return np.array(out)


@pytest.mark.parametrize("n_tokens,context,stride", [
    (150, 32, 12), (150, 32, 32), (97, 24, 1),
    (20, 64, 32),   # shorter than one window
    (64, 64, 16),   # exactly one context
    (65, 64, 16), (66, 64, 16),
    (2, 8, 4), (3, 8, 4),
])
def test_score_tokens_equals_direct_forward(lm, n_tokens, context, stride):
    tokens = _tokens(n_tokens, seed=n_tokens + context)
    ref = _reference_logprobs(lm.model, tokens, context, stride)
    one = score_tokens(lm, tokens, context, stride, batch_size=1)
    three = score_tokens(lm, tokens, context, stride, batch_size=3)
    assert one.n == three.n == n_tokens - 1
    np.testing.assert_allclose(one.lm, ref, rtol=0, atol=2e-5)
    # right padding in a batch (GPT-2 included) changes nothing for the real tokens
    np.testing.assert_allclose(three.lm, one.lm, rtol=0, atol=2e-6)
    assert ppl(one.lm) == pytest.approx(math.exp(-ref.mean()), rel=1e-5)


def test_padded_batches_actually_occur():
    # guard for the test above: its first case puts windows of different lengths in one batch of 3
    windows = plan_windows(150, 32, 12)
    lens = [set(m.sum(1).tolist()) for _, m, _ in batch_windows(_tokens(150), windows, 3)]
    assert any(len(s) > 1 for s in lens)


def test_disjoint_windows_equal_the_models_own_loss(lm):
    # stride == context: windows are disjoint chunks; the HF loss with labels (shift inside the model) is the truth
    context, n_chunks = 32, 4
    tokens = _tokens(context * n_chunks + 1, seed=5)
    nll = 0.0
    with torch.no_grad():
        for k in range(n_chunks):
            ids = torch.from_numpy(tokens[k * context:(k + 1) * context + 1].astype(np.int64))[None]
            nll += lm.model(input_ids=ids, labels=ids).loss.item() * context
    expected = math.exp(nll / (context * n_chunks))
    got = score_tokens(lm, tokens, context, context, batch_size=2)
    assert got.n == context * n_chunks
    assert ppl(got.lm) == pytest.approx(expected, rel=1e-5)


def test_memory_and_knn_see_the_key_of_each_scored_position(lm):
    from mlpmem.components.capture import resolve_hook

    model = lm.model
    hook = resolve_hook(model, "auto", -1)
    norm = dict(model.named_modules())[hook.module]
    tokens = _tokens(90, seed=7)
    # reference keys: output of the last layer's pre-FFN norm in an unpadded forward of each position's window
    ref_keys, grab = [], []
    h = norm.register_forward_hook(lambda m, a, o: grab.append(o[0, -1].clone()))
    with torch.no_grad():
        for t in range(len(tokens) - 1):
            b = _window_begin(t, 32, 12)
            model(input_ids=torch.from_numpy(tokens[b:t + 1].astype(np.int64))[None])
    h.remove()
    ref_keys = torch.stack(grab)
    torch.manual_seed(0)
    memory = torch.nn.Linear(ref_keys.shape[1], VOCAB)
    seen_keys, seen_gold = [], []

    def knn_scorer(keys, gold):
        seen_keys.append(keys.clone())
        seen_gold.append(gold.clone())
        return np.stack([np.full(len(gold), -1.0), -np.arange(len(gold), dtype=np.float64)])

    sc = score_tokens(lm, tokens, 32, 12, batch_size=3, hook=hook, memory=memory, mem_temperatures=[2.0, 1.0],
                      knn_scorer=knn_scorer)
    assert torch.equal(torch.cat(seen_gold), torch.from_numpy(tokens[1:].astype(np.int64)))
    torch.testing.assert_close(torch.cat(seen_keys), ref_keys, atol=1e-5, rtol=0)
    assert sc.mem.shape == (2, len(tokens) - 1)
    for row, T in enumerate((2.0, 1.0)):  # one row per memory temperature, from one head pass
        with torch.no_grad():
            ref_mem = (memory(ref_keys) / T).double().log_softmax(-1)
        ref_mem = ref_mem.gather(-1, torch.from_numpy(tokens[1:].astype(np.int64))[:, None])[:, 0].numpy()
        np.testing.assert_allclose(sc.mem[row], ref_mem, atol=1e-5, rtol=0)
    assert sc.knn.shape == (2, len(tokens) - 1) and (sc.knn[0] == -1.0).all()


def test_window_longer_than_the_model_is_refused(lm):
    with pytest.raises(ValueError, match="--window.context"):
        score_tokens(lm, _tokens(300), 200, 100, batch_size=1)  # the model has 128 positions
    # a short stream never builds a window that long, so it is fine
    assert score_tokens(lm, _tokens(50), 200, 100, batch_size=1).n == 49


def test_models_whose_logits_are_not_the_plain_head_are_refused():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
    lm = LoadedLM(GraniteForCausalLM(cfg).eval(), None, {}, torch.device("cpu"))
    with pytest.raises(ValueError, match="output head"):
        score_tokens(lm, _tokens(40), 16, 8, batch_size=2)


def test_empty_and_single_token_streams(lm):
    for n in (0, 1):
        sc = score_tokens(lm, _tokens(n), 16, 8, batch_size=2)
        assert sc.n == 0 and math.isnan(ppl(sc.lm))


# ----------------------------------------------------------------------------- mixing math

def _rand_logprobs(rng, n, v=7):
    z = rng.normal(size=(n, v)) * 2
    lp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return lp[:, 0]


def test_ppl_is_token_weighted():
    lp = np.log(np.array([0.5, 0.25, 0.125, 1.0]))
    assert ppl(lp) == pytest.approx((0.5 * 0.25 * 0.125 * 1.0) ** (-1 / 4))


@pytest.mark.parametrize("lam", [0.0, 1e-6, 0.25, 0.5, 0.9, 1.0])
def test_mix2_matches_probability_formula(lam):
    rng = np.random.default_rng(1)
    a, b = _rand_logprobs(rng, 50), _rand_logprobs(rng, 50)
    got = mix2(a, b, lam)
    assert np.allclose(np.exp(got), (1 - lam) * np.exp(a) + lam * np.exp(b), rtol=1e-12, atol=0)
    if lam == 0.0:
        assert got is a or np.array_equal(got, a)
    if lam == 1.0:
        assert np.array_equal(got, b)


def test_mix2_keeps_minus_inf_finite_when_the_lm_has_mass():
    lm_lp = np.log(np.array([0.2, 0.5]))
    knn_lp = np.array([-np.inf, np.log(0.3)])  # the kNN distribution gives the gold token zero mass
    got = mix2(lm_lp, knn_lp, 0.25)
    np.testing.assert_allclose(np.exp(got), [0.75 * 0.2, 0.75 * 0.5 + 0.25 * 0.3])
    assert np.isneginf(mix2(lm_lp, knn_lp, 1.0)[0])


@pytest.mark.parametrize("lam_mem,lam_knn", [(0.2, 0.3), (0.0, 0.4), (0.5, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_mix3_matches_probability_formula(lam_mem, lam_knn):
    rng = np.random.default_rng(2)
    a, b, c = (_rand_logprobs(rng, 40) for _ in range(3))
    got = mix3(a, b, c, lam_mem, lam_knn)
    want = (1 - lam_mem - lam_knn) * np.exp(a) + lam_mem * np.exp(b) + lam_knn * np.exp(c)
    np.testing.assert_allclose(np.exp(got), want, rtol=1e-12)
    if lam_knn == 0.0:
        np.testing.assert_allclose(got, mix2(a, b, lam_mem), rtol=1e-12)


def _scored_with_known_optimum(rng, n, lam_best):
    """Scored positions where p_mem(gold) and p_lm(gold) are built so the best lambda is known roughly."""
    lm_lp = np.log(rng.uniform(0.05, 0.3, size=n))
    mem_lp = np.log(np.clip(np.exp(lm_lp) * (1 + 4 * lam_best * rng.uniform(0.5, 1.5, size=n)), 0, 1))
    knn = np.stack([np.log(rng.uniform(0.01, 0.9, size=n)), lm_lp + np.log(1.5)])
    return Scored(lm=lm_lp, mem=mem_lp[None], knn=knn)


def test_settle_tunes_on_validation_and_reports_test_at_that_setting():
    val = Scored(lm=np.log(np.full(200, 0.2)), mem=np.log(np.full((1, 200), 0.6)), knn=np.log(np.full((2, 200), 0.1)))
    # on test the memory is useless: tuning on test would pick lam = 0 for it
    test = Scored(lm=np.log(np.full(100, 0.3)), mem=np.log(np.full((1, 100), 0.01)),
                  knn=np.stack([np.log(np.full(100, 0.1)), np.log(np.full(100, 0.9))]))
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.25, 0.5, 0.75], "eval.knn_temperatures": [1.0, 8.0],
                             "eval.memory_temperatures": [1.0]})
    res = settle({"validation": val, "test": test}, cfg)
    assert res["tuned_on"] == "validation"
    # validation: p_mem > p_lm everywhere, so the largest swept lambda wins; kNN worse than the LM: lambda 0
    # (refinement walks λ up to the grid's end, 0.75; beyond it the grid stops and the edge is reported)
    assert res["settings"]["memory"] == {"lam": 0.75, "T_mem": 1.0}
    assert res["edges"]["memory"] == ["lam"]
    assert res["settings"]["knn"]["lam"] == 0.0
    t = res["splits"]["test"]["systems"]
    assert t["memory"]["ppl"] == pytest.approx(ppl(mix2(test.lm, test.mem[0], 0.75)))
    assert t["memory"]["ppl"] > t["base"]["ppl"]  # reported at the validation setting, not re-tuned on test
    assert t["base"]["ppl"] == pytest.approx(1 / 0.3)
    assert t["memory alone"] == {"lam": 1.0, "T_mem": 1.0, "ppl": pytest.approx(100.0)}
    mk = res["settings"]["memory+knn"]
    assert t["memory+knn"]["ppl"] == pytest.approx(
        ppl(mix3(test.lm, test.mem[0], test.knn[[1.0, 8.0].index(mk["T"])], mk["lam_mem"], mk["lam_knn"])))
    assert res["splits"]["test"]["tokens"] == 100 and res["splits"]["validation"]["tokens"] == 200
    # the refined choice is at least as good as every row of the grid
    assert min(r["ppl"] for r in res["sweeps"]["validation"]["memory"]) >= \
        res["splits"]["validation"]["systems"]["memory"]["ppl"] - 1e-12


def test_settle_picks_knn_temperature_on_validation():
    n = 300
    lm_lp = np.log(np.full(n, 0.2))
    knn = np.stack([np.log(np.full(n, 0.05)), np.log(np.full(n, 0.7)), np.log(np.full(n, 0.3))])
    val = Scored(lm=lm_lp, knn=knn)
    test = Scored(lm=lm_lp[:50], knn=knn[::-1, :50].copy())  # the best T on test is a different one
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.5, 1.0], "eval.knn_temperatures": [1.0, 4.0, 16.0]})
    res = settle({"validation": val, "test": test}, cfg)
    assert res["settings"]["knn"] == {"lam": 1.0, "T": 4.0}
    assert res["edges"] == {}  # T inside its grid, λ at its natural bound 1
    assert res["splits"]["test"]["systems"]["knn"]["ppl"] == pytest.approx(1 / 0.7)
    assert "memory" not in res["settings"] and "memory alone" not in res["settings"]


def test_fixed_lambda_outside_the_sweep_is_used():
    rng = np.random.default_rng(4)
    sc = {s: _scored_with_known_optimum(rng, 80, 0.5) for s in ("validation", "test")}
    cfg = load_config(None, {"eval.lam": 0.33, "eval.lambdas": [0.0, 0.5], "eval.knn_temperatures": [1.0, 8.0],
                             "eval.memory_temperatures": [1.0]})
    res = settle(sc, cfg)
    assert res["settings"]["memory"] == {"lam": 0.33, "T_mem": 1.0}
    assert res["settings"]["knn"]["lam"] == 0.33
    for split, s in sc.items():
        got = res["splits"][split]["systems"]
        assert got["memory"]["ppl"] == pytest.approx(ppl(mix2(s.lm, s.mem[0], 0.33)))
        # the memory alone is reported even though 1.0 is not among the lambdas
        assert got["memory alone"]["ppl"] == pytest.approx(ppl(s.mem[0]))


def test_sweep_covers_the_grid():
    rng = np.random.default_rng(5)
    sc = _scored_with_known_optimum(rng, 30, 0.3)
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.25, 0.5, 1.0], "eval.knn_temperatures": [1.0, 2.0],
                             "eval.memory_temperatures": [1.0]})
    sw = sweep(sc, cfg)
    assert len(sw["knn"]) == 8 and len(sw["memory"]) == 4
    # memory+knn: both weights > 0 and summing to <= 1
    assert {(r["lam_mem"], r["lam_knn"]) for r in sw["memory+knn"]} == {(0.25, 0.25), (0.25, 0.5), (0.5, 0.25),
                                                                       (0.5, 0.5)}
    assert sw["memory"][0]["ppl"] == pytest.approx(sw["base"][0]["ppl"])  # lambda 0 is the base LM exactly
    with pytest.raises(ValueError, match="knn_temperatures"):
        sweep(sc, load_config(None, {"eval.knn_temperatures": [1.0], "eval.memory_temperatures": [1.0]}))
    with pytest.raises(ValueError, match="memory_temperatures"):
        sweep(sc, load_config(None, {"eval.knn_temperatures": [1.0, 2.0]}))  # 5 memory temperatures by default


def test_lambda_is_refined_between_grid_points():
    """p_mem(gold) = 2 p_lm(gold) / (1 + ...) built so the optimum sits at λ = 0.3, between grid points 0.25, 0.5."""
    rng = np.random.default_rng(0)
    n = 4000
    p_lm = rng.uniform(0.05, 0.5, n)
    good = rng.uniform(size=n) < 0.3  # the memory is sure and right on 30% of tokens, useless on the others
    p_mem = np.where(good, 1.0, 1e-9)
    sc = Scored(lm=np.log(p_lm), mem=np.log(p_mem)[None])
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.25, 0.5, 1.0], "eval.memory_temperatures": [1.0]})
    res = settle({"validation": sc}, cfg)
    lam = res["settings"]["memory"]["lam"]
    # the exact optimum of mean log((1 - λ) p + λ [good]) has λ* ≈ fraction of good tokens
    grid = np.round(np.arange(0, 1.0001, 0.001), 3)
    exact = grid[np.argmin([ppl(mix2(sc.lm, sc.mem[0], x)) for x in grid])]
    assert lam not in (0.25, 0.5) and abs(lam - exact) <= 0.01, (lam, exact)


def test_temperature_on_the_edge_of_its_grid_is_reported():
    n = 200
    lm_lp = np.log(np.full(n, 0.2))
    knn = np.stack([np.log(np.full(n, 0.9)), np.log(np.full(n, 0.5))])  # the sharpest T (first) is best
    cfg = load_config(None, {"eval.lambdas": [0.0, 0.5, 1.0], "eval.knn_temperatures": [0.5, 1.0]})
    res = settle({"validation": Scored(lm=lm_lp, knn=knn)}, cfg)
    assert res["settings"]["knn"]["T"] == 0.5 and res["edges"] == {"knn": ["T"]}


def test_doc_ids_follow_the_gold_token():
    offsets = np.array([0, 3, 5, 9])  # docs [0,3), [3,5), [5,9) of a 9-token stream: 8 scored positions
    assert doc_ids_of(offsets, 8).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]


def test_bootstrap_intervals():
    rng = np.random.default_rng(1)
    docs = np.repeat(np.arange(50), 20)
    base = np.log(rng.uniform(0.05, 0.3, docs.size))
    same = base.copy()
    better = base + np.log(1.2)  # 20% more probability on every gold token: PPL -16.7% exactly
    noisy = base + rng.normal(0, 0.3, docs.size)  # no systematic change
    ci = bootstrap_changes({"base": base, "same": same, "better": better, "noisy": noisy}, docs,
                           [("same", "base"), ("better", "base"), ("noisy", "base"), ("better", "same")])
    assert ci[("same", "base")]["ci95"] == [0.0, 0.0] and not ci[("same", "base")]["excludes_zero"]
    b = ci[("better", "base")]
    assert b["change"] == pytest.approx(1 / 1.2 - 1) and b["excludes_zero"]
    assert b["ci95"][0] <= b["change"] <= b["ci95"][1]
    nz = ci[("noisy", "base")]
    assert nz["ci95"][0] < nz["change"] < nz["ci95"][1] and nz["ci95"][1] - nz["ci95"][0] > 0.005
    assert b["documents"] == 50


@pytest.mark.parametrize("rows,sub", [(256, 32), (7, 3), (5, 5), (1, 1)])
def test_gold_logprobs_in_chunks_equals_full_log_softmax(rows, sub):
    from mlpmem.components.scoring import gold_logprobs, memory_logprobs_at
    from mlpmem.components.memory import MLPMemory, MLPMemoryConfig

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 301, bias=False)
    h, gold = torch.randn(23, 16), torch.randint(0, 301, (23,))
    ref = torch.log_softmax(head(h).float() / 0.7, -1).gather(-1, gold[:, None])[:, 0]
    got = gold_logprobs(head, h, gold, lambda z: z / 0.7, rows=rows, sub=sub)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    mem = MLPMemory(MLPMemoryConfig(family="llama", input_size=16, hidden_size=16, intermediate_size=32,
                                    num_blocks=2, vocab_size=301)).eval()
    ref = torch.log_softmax(mem(h).float() / 2.0, -1).gather(-1, gold[:, None])[:, 0]
    torch.testing.assert_close(memory_logprobs_at(mem, h, gold, [2.0])[0], ref, rtol=0, atol=1e-5)
