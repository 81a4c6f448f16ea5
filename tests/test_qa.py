"""Corpus-knowledge QA: items mined deterministically with answers absent from their prompts; SQuAD-style metrics;
document-level bootstrap; answer log-likelihoods equal to a plain forward; greedy decoding under a mixture equal to
the argmax of that mixture; kNN-LM's whole distribution equal to its gold scores; and the `qa` stage end to end
(resume, skip, the exported lm-eval tasks scoring what the stage scores)."""

import json
import random

import numpy as np
import pytest
import torch
import yaml

from helpers import make_model_dir, write_corpus
from mlpmem.components.qa import (bootstrap_means, candidate_spans, document_items, exact_match, mine_items,
                                  normalize, prediction, process_results, sentences, token_f1)

DOC = ("Alpha Town is a port in Norland founded in 1842. Its first mayor was Bruno Kale, who served 12 years. "
       "The harbour handles 1,200 ships a year and trades with Sudport.")


def test_spans_are_numbers_and_names_not_opening_their_sentence():
    sents = sentences(DOC)
    assert [s for _, s in sents][1].startswith("Its first mayor")
    spans = [(s[a:b], k) for _, s in sents for a, b, k in candidate_spans(s, ["number", "name"], 0)]
    assert ("1842", "number") in spans and ("1,200", "number") in spans and ("12", "number") in spans
    assert ("Bruno Kale", "name") in spans and ("Norland", "name") in spans and ("Sudport", "name") in spans
    assert all(not t.startswith(("Alpha", "Its", "The")) for t, _ in spans)  # sentence-initial words are not names
    only_late = [s[a:b] for _, s in sents for a, b, _ in candidate_spans(s, ["number"], 6)]
    assert "12" in only_late and "1842" in only_late and "1,200" not in only_late  # after fewer than 6 words


def test_items_lead_to_their_answer_and_never_contain_it():
    items = document_items(DOC, "train", 3, ["number", "name"], 2)
    assert items and all(it.split == "train" and it.doc == 3 for it in items)
    lead = sentences(DOC)[0][1]
    for it in items:
        assert it.target.strip() == it.answer and it.answer.lower() not in it.prompt.lower()
        assert not it.prompt.endswith((" ", "\n"))
        text = it.prompt + it.target  # the prompt is the document up to the answer, or the lead + its sentence
        assert DOC.startswith(text) or (text.startswith(lead + " ") and text[len(lead) + 1:] in DOC)
    repeated = "Kale met Kale. Then Bruno Kale left the town of Dorr."
    assert [it.answer for it in document_items(repeated, "test", 0, ["name"], 1)] == ["Dorr"]  # Kale is in the prompt


def test_mining_is_deterministic_and_bounded():
    rng = random.Random(1)
    docs = [f"Town {i} is in Norland. It was founded in {rng.randint(1000, 1999)} by {rng.choice(['Ada', 'Bo'])} "
            f"Smith and has {rng.randint(10, 99)} farms." for i in range(40)]
    a = mine_items(docs, "train", 25, 2, ["number", "name"], 2, seed=0)
    assert a == mine_items(docs, "train", 25, 2, ["number", "name"], 2, seed=0)
    assert len(a) == 25 and max(np.bincount([it.doc for it in a])) <= 2
    assert [it.doc for it in a] == sorted(it.doc for it in a)
    assert a != mine_items(docs, "train", 25, 2, ["number", "name"], 2, seed=1)
    assert {it.kind for it in mine_items(docs, "train", 25, 2, ["number"], 2, seed=0)} == {"number"}
    short = mine_items(docs, "train", 500, 1, ["number", "name"], 2, seed=0, keep=lambda it: it.kind == "name")
    assert len(short) == 40 and {it.kind for it in short} == {"name"}


def test_metrics_take_the_answers_length_after_normalising():
    assert prediction(" the Works of Homer are", "Works") == "works"
    assert prediction(" Bruno Kale, who served", "Bruno Kale") == "bruno kale"
    assert prediction(" 1842.\nNext", "1842") == "1842" and prediction("\n1842", "1842") == ""
    assert exact_match("bruno kale", "Bruno Kale") == 1.0 and exact_match("bruno", "Bruno Kale") == 0.0
    assert token_f1("bruno smith", "Bruno Kale") == pytest.approx(0.5)
    assert token_f1("", "Kale") == 0.0
    assert process_results({"answer": "Bruno Kale"}, [" Bruno Kale served"]) == {"exact_match": 1.0, "f1": 1.0}


def test_bootstrap_means_resample_documents_and_pair_systems():
    docs = np.repeat(np.arange(20), 3)
    a = np.tile([1.0, 0.0, 1.0], 20)
    means, diffs = bootstrap_means({"a": a, "b": a.copy(), "c": a - 0.5}, docs, [("a", "b"), ("a", "c")])
    assert means["a"]["mean"] == pytest.approx(2 / 3)
    assert diffs[("a", "b")]["change"] == 0 and diffs[("a", "b")]["ci95"] == [0.0, 0.0]
    assert diffs[("a", "c")]["change"] == pytest.approx(0.5) and diffs[("a", "c")]["excludes_zero"]
    lo, hi = means["a"]["ci95"]
    assert lo == pytest.approx(2 / 3) and hi == pytest.approx(2 / 3)  # every document has the same mean
    noisy = np.random.default_rng(0).random(60)
    lo, hi = bootstrap_means({"n": noisy}, docs, [])[0]["n"]["ci95"]
    assert lo < noisy.mean() < hi


# ----------------------------------------------------------------------------- scoring and decoding


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory):
    from mlpmem.components.lm import load_lm
    from mlpmem.config import ModelConfig

    d = make_model_dir(tmp_path_factory.mktemp("answers") / "model", "llama")
    return load_lm(ModelConfig(name=str(d), dtype="fp32"))


def random_memory(lm, seed=0):
    from mlpmem.components.memory import MLPMemory, memory_config_for

    torch.manual_seed(seed)
    return MLPMemory(memory_config_for(lm.model.config, num_blocks=1, dropout=0.0)).eval()


def test_answer_scores_equal_a_plain_forward(small_lm):
    from mlpmem.components.answers import answer_scores, encode_pairs
    from mlpmem.components.capture import forward_hidden, resolve_hook

    lm = small_lm
    prompts, targets = ["Doc 1: alpha beta", "Doc 22: gamma", "Doc 3:"], [" gamma delta", " beta", " alpha"]
    pairs = encode_pairs(lm.tokenizer, prompts, targets)
    hook = resolve_hook(lm.model, "auto")
    mem = random_memory(lm)
    sc, owner = answer_scores(lm, pairs, 2, hook=hook, memory=mem, mem_temperatures=[1.0, 2.0])
    assert owner.tolist() == [i for i, (_, a) in enumerate(pairs) for _ in a]
    with torch.no_grad():
        for i, (c, a) in enumerate(pairs):
            ids = torch.tensor([c + a])
            out = lm.model(ids, output_hidden_states=True)
            want = out.logits[0, len(c) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(a)[:, None])[:, 0]
            assert np.allclose(sc.lm[owner == i], want.numpy(), atol=1e-5)
            h = forward_hidden(lm.model, hook, ids)[0, len(c) - 1:-1].float()
            mem2 = (mem(h) / 2).log_softmax(-1).gather(-1, torch.tensor(a)[:, None])[:, 0]
            assert np.allclose(sc.mem[1, owner == i], mem2.numpy(), atol=1e-5)


def test_greedy_decoding_follows_the_mixture(small_lm):
    from mlpmem.components.answers import Mixture, greedy_continuations
    from mlpmem.components.capture import forward_hidden, resolve_hook

    lm = small_lm
    hook = resolve_hook(lm.model, "auto")
    prompts = ["Doc 1: alpha beta", "Doc 22: gamma gamma delta"]
    plain = greedy_continuations(lm, prompts, 3, 2)
    assert greedy_continuations(lm, prompts, 3, 1) == plain  # left padding changes nothing
    V = lm.model.config.vocab_size
    mem = random_memory(lm)
    zero = Mixture(lam_mem=0.0, memory=mem)
    assert greedy_continuations(lm, prompts, 3, 2, mix=zero, hook=hook) == plain
    only_mem = greedy_continuations(lm, prompts, 1, 2, mix=Mixture(lam_mem=1.0, memory=mem), hook=hook)
    for p, got in zip(prompts, only_mem):
        ids = lm.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            first = mem(forward_hidden(lm.model, hook, ids)[0, -1].float()).argmax().item()
        assert got == lm.tokenizer.decode([first])
    knn_only = Mixture(lam_knn=1.0, knn=lambda h: torch.full((h.shape[0], V), -1e9).index_fill_(1, torch.tensor([7]), 0))
    seven = lm.tokenizer.decode([7])
    assert greedy_continuations(lm, prompts, 2, 2, mix=knn_only, hook=hook) == [seven * 2] * 2


def test_knn_whole_distribution_matches_its_gold_scores():
    import faiss

    from mlpmem.components.knn import knn_logprobs, knn_scorer

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    vals = rng.integers(0, 20, 300).astype(np.int32)
    index = faiss.IndexFlatL2(8)
    index.add(keys)
    q = torch.from_numpy(rng.standard_normal((5, 8)).astype(np.float32))
    lp = knn_logprobs(index, keys, vals, 16, 2.0, False, q, 20)
    assert lp.shape == (5, 20) and torch.allclose(lp.exp().sum(1), torch.ones(5), atol=1e-5)
    gold = torch.arange(20).repeat(5, 1)
    for t in range(20):
        want = knn_scorer(index, keys, vals, 16, [2.0], False)(q, gold[:, t])[0]
        assert np.allclose(lp[:, t].numpy(), want, atol=1e-5)


# ----------------------------------------------------------------------------- the stage


def fact_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    first = ["Ada", "Bruno", "Carla", "Dario", "Elsa", "Fabio", "Greta", "Hugo"]
    last = ["Kale", "Moro", "Lind", "Ruiz", "Berg", "Sato"]
    places = ["Norland", "Sudport", "Westmark", "Ostria", "Lemberg"]
    return [f"Town {i} is in {rng.choice(places)}. It was founded in {rng.randint(1000, 1999)} by "
            f"{rng.choice(first)} {rng.choice(last)}, and has {rng.randint(10, 99)} farms. Its river is the Velda."
            for i in range(n)]  # the river is every town's: a fact the datastore and the memory can learn


def pretrained_model_dir(path, texts: list[str], steps: int = 80):
    """A tiny Llama and its tokenizer, trained for a few seconds on ``texts`` (seeded): a base LM that knows the
    corpus's one shared fact (every river is the Velda), so base exact match is above 0 and the QA checks below
    compare systems that get some answers right."""
    from helpers import make_model, make_tokenizer

    tok = make_tokenizer(texts)
    model = make_model("llama", len(tok))
    ids = torch.tensor([t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
        x = torch.stack([ids[a:a + 33] for a in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


# lambda fixed inside (0, 1) for kNN-LM and the memory: the mixtures differ from both of their parts
QA_LAM = 0.5


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    from helpers import tiny_config
    from mlpmem.cli import main

    tmp = tmp_path_factory.mktemp("qa")
    texts = fact_texts(90)
    write_corpus(tmp / "corpus.txt", texts)
    pretrained_model_dir(tmp / "model-llama", texts)
    cfg = tiny_config(tmp, "llama", **{"qa.items": 12, "qa.min_prompt_words": 2, "qa.batch_size": 4,
                                       "qa.max_new_tokens": 6, "train.epochs": 3, "eval.lam": QA_LAM})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp / "cfg.yaml")]) == 0
    assert main(["qa", "--config", str(tmp / "cfg.yaml")]) == 0
    return tmp


def test_qa_stage_reports_every_system_on_both_sides(qa_run):
    res = json.loads((qa_run / "run" / "qa" / "results.json").read_text())
    assert res["systems"] == ["base", "knn", "memory", "memory+knn"]
    ev = json.loads((qa_run / "run" / "eval" / "results.json").read_text())
    assert res["settings"]["memory"] == ev["settings"]["memory"]  # eval's tuned settings, nothing retuned
    items = [json.loads(x) for x in (qa_run / "run" / "qa" / "items.jsonl").read_text().splitlines()]
    assert {it["split"] for it in items} == {"train", "test"}
    assert sum(it["split"] == "train" for it in items) == 12
    assert all(f" {normalize(it['answer'])} " not in f" {normalize(it['prompt'])} " for it in items)  # as words
    for side in ("heldin", "heldout"):
        s = res["sides"][side]
        assert set(s["systems"]) == set(res["systems"])
        for m in ("exact_match", "f1", "loglik"):
            lo, hi = s["systems"]["base"][m]["ci95"]
            assert lo <= s["systems"]["base"][m]["mean"] <= hi
        assert set(s["comparisons"]) == {"knn vs base", "memory vs base", "memory+knn vs base", "memory vs knn",
                                         "memory+knn vs knn"}
    rows = [json.loads(x) for x in (qa_run / "run" / "qa" / "predictions.jsonl").read_text().splitlines()]
    base_em = np.mean([r["base"]["exact_match"] for r, it in zip(rows, items) if it["split"] == "train"])
    assert base_em == pytest.approx(res["sides"]["heldin"]["systems"]["base"]["exact_match"]["mean"])
    # held-in answers: kNN-LM retrieves the very passage, so it gives them more likelihood than the base LM
    assert res["sides"]["heldin"]["comparisons"]["knn vs base"]["loglik"]["change"] > 0


def test_qa_skips_when_done_and_resumes_from_saved_answers(qa_run, monkeypatch, capsys):
    from mlpmem.cli import main
    import mlpmem.components.answers as answers

    out = qa_run / "run" / "qa"
    before = json.loads((out / "manifest.json").read_text())
    assert main(["qa", "--config", str(qa_run / "cfg.yaml")]) == 0
    assert json.loads((out / "manifest.json").read_text())["created"] == before["created"]
    assert "Corpus-knowledge QA" in capsys.readouterr().out
    (out / "manifest.json").unlink()  # as if interrupted after every system answered
    monkeypatch.setattr(answers, "greedy_continuations", lambda *a, **k: pytest.fail("answered again"))
    assert main(["qa", "--config", str(qa_run / "cfg.yaml")]) == 0
    assert json.loads((out / "results.json").read_text())["fingerprint"] == before["fingerprint"]


def test_qa_needs_a_finished_evaluation(qa_run, tmp_path):
    from helpers import tiny_config
    from mlpmem.cli import main

    cfg = tiny_config(qa_run, "llama", out_dir=str(tmp_path / "fresh"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["prepare", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert main(["qa", "--config", str(tmp_path / "cfg.yaml")]) != 0


def test_exported_lm_eval_tasks_score_what_the_stage_scores(qa_run):
    """lm-eval's hf model on the exported tasks = the stage's base LM; lm-eval's mlpmem model (the memory attached
    at the tuned lambda, here 0.5) = the stage's memory system: item by item the same greedy answers and answer
    log-likelihoods, hence the same metrics. The base LM answers some items right, and at lambda 0.5 the memory
    system's answers and likelihoods differ from the base LM's, so neither check holds by accident."""
    pytest.importorskip("lm_eval")
    import mlpmem.harness  # noqa: F401  (registers "mlpmem")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = qa_run / "run" / "qa" / "lm_eval"
    res = json.loads((qa_run / "run" / "qa" / "results.json").read_text())
    assert res["settings"]["memory"]["lam"] == QA_LAM
    rows = {r["id"]: r for r in map(json.loads, (qa_run / "run" / "qa" / "predictions.jsonl").read_text().splitlines())}
    for side in ("heldin", "heldout"):
        assert res["sides"][side]["systems"]["base"]["exact_match"]["mean"] > 0  # some answers right
    assert res["sides"]["heldin"]["systems"]["memory"]["exact_match"]["mean"] > 0
    assert sum(r["memory"]["continuation"] != r["base"]["continuation"] for r in rows.values()) >= len(rows) // 4
    assert max(abs(r["memory"]["loglik"] - r["base"]["loglik"]) for r in rows.values()) > 0.1
    model = f"pretrained={qa_run / 'model-llama'},dtype=float32"
    for lm_eval_model, args, system in (("hf", model, "base"),
                                        ("mlpmem", f"{model},memory={qa_run / 'run' / 'memory' / 'best'}", "memory")):
        out = simple_evaluate(model=lm_eval_model, model_args=args, tasks=["mlpmem_qa"], batch_size=4, device="cpu",
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                              log_samples=True)
        got, samples = out["results"], out["samples"]
        for side in ("heldin", "heldout"):
            want = res["sides"][side]["systems"][system]
            gen, ll = samples[f"mlpmem_qa_{side}"], samples[f"mlpmem_qa_{side}_loglik"]
            assert len(gen) == len(ll) == res["sides"][side]["items"]
            for s in gen:  # lm-eval stops at the first newline; the stage keeps all its tokens
                assert s["filtered_resps"][0] == rows[s["doc"]["id"]][system]["continuation"].split("\n")[0], s["doc"]
            for s in ll:  # the stage rounds to 4 decimals
                assert s["filtered_resps"][0][0] == pytest.approx(rows[s["doc"]["id"]][system]["loglik"], abs=2e-4)
            assert got[f"mlpmem_qa_{side}"]["exact_match,none"] == pytest.approx(want["exact_match"]["mean"])
            assert got[f"mlpmem_qa_{side}"]["f1,none"] == pytest.approx(want["f1"]["mean"])
            # the log-likelihood task reports the mean answer log-likelihood, as `mlpmem qa` does
            assert got[f"mlpmem_qa_{side}_loglik"]["loglik,none"] == pytest.approx(want["loglik"]["mean"], rel=1e-4)


def test_qa_on_a_fine_tuned_run_adds_the_fine_tuned_lm(qa_run, tmp_path):
    """With --finetune.mode, the base LM is the model as given, the fine-tuned LM is this run's, and the mixtures
    are over the fine-tuned LM (compared with it, and it with the base LM)."""
    from helpers import tiny_config
    from mlpmem.cli import main

    over = {"finetune.mode": "full", "finetune.lr": 1e-3, "finetune.batch_size": 4, "finetune.max_steps": 4,
            "finetune.warmup_steps": 1, "finetune.eval_every": 2, "finetune.save_every": 2,
            "finetune.val_windows": 4, "qa.items": 6, "qa.min_prompt_words": 2, "qa.max_new_tokens": 4}
    cfg = tiny_config(qa_run, "llama", out_dir=str(tmp_path / "ft"), **over)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert main(["qa", "--config", str(tmp_path / "cfg.yaml")]) == 0
    res = json.loads((tmp_path / "ft" / "qa" / "results.json").read_text())
    assert res["systems"] == ["base", "fine-tuned", "knn", "memory", "memory+knn"] and res["lm"] == "fine-tuned"
    comps = set(res["sides"]["heldin"]["comparisons"])
    assert {"fine-tuned vs base", "memory vs fine-tuned", "knn vs fine-tuned", "memory vs knn"} <= comps
    ll = {s: res["sides"]["heldin"]["systems"][s]["loglik"]["mean"] for s in ("base", "fine-tuned")}
    assert ll["base"] != ll["fine-tuned"]  # two different models answered
    vanilla = json.loads((qa_run / "run" / "qa" / "results.json").read_text())  # the same model as given
    assert res["model"]["fingerprint"] != vanilla["model"]["fingerprint"]


# ----------------------------------------------------------------------------- the RAG baseline (--qa.rag)


def test_bm25_retrieves_the_passage_holding_a_planted_answer():
    from mlpmem.components.rag import BM25Index, passages

    planted = "Quillon Abbey is in Westmark. It was founded in 1234 by Zora Quill, and has 12 farms. Its bells ring."
    docs = fact_texts(40)
    docs.insert(17, planted)
    texts, owner = passages(docs, 12)
    for d, doc in enumerate(docs):  # passages pack whole sentences, in order; all but the first led by the title
        lead, *rest = [t for t, o in zip(texts, owner) if o == d]
        title = sentences(doc)[0][1]
        assert lead == title and all(t.startswith(title + " ") for t in rest)
        assert " ".join([lead] + [t[len(title) + 1:] for t in rest]) == doc
    assert sum(owner == 17) == 3 and max(len(t.split()) for t in texts) == 5 + 12
    assert passages(["One two three four five. Six seven."], 3)[0] == ["One two three", "One two three four five.",
                                                                         "One two three Six seven."]
    item = next(it for it in document_items(planted, "train", 17, ["number"], 2) if it.answer == "1234")
    index = BM25Index(texts)
    top, none = index.search([item.prompt, "zzz qqq"], 3)
    assert "1234" not in item.prompt and [owner[i] for i in top] == [17, 17, 17]
    assert any("1234" in texts[i] for i in top)  # the held-in answer's passage, found by its title and words
    assert none == []  # a question sharing no term with the corpus gets no passage
    assert len(index.search(["bells"], 500)[0]) == 1  # k above the corpus size is capped, not an error


def test_rag_prompt_fits_the_window_and_keeps_the_prompt_whole(small_lm):
    from mlpmem.components.rag import rag_prompt
    from helpers import make_texts

    tok = small_lm.tokenizer
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    texts, prompt, target = make_texts(3, seed=5), "Doc 9: the river of", " light"
    full, kept = rag_prompt(tok, texts, prompt, target, 10_000)
    assert full == "\n".join(texts) + "\n\n" + prompt and kept == 3
    for room in (n(prompt + target) + 12, n(full + target) - 5):
        got, kept = rag_prompt(tok, texts, prompt, target, room)
        assert n(got + target) <= room and got.endswith("\n\n" + prompt) and 1 <= kept <= 3
        assert got.startswith(texts[0][:10])  # the best passage is the one kept; the cut is at the end
        assert len(got) < len(full)
    assert rag_prompt(tok, texts, prompt, target, n(prompt + target) + 1) == (prompt, 0)  # no room: the prompt
    assert rag_prompt(tok, [], prompt, target, 10_000) == (prompt, 0)


def test_rag_with_the_memory_at_lambda_0_is_rag(small_lm):
    """rag+memory's greedy answers and answer log-likelihoods at lambda 0 are rag's; at a vanishing lambda (which
    goes through the mixing logits processor) the greedy answers are still rag's."""
    from types import SimpleNamespace

    from helpers import make_texts
    from mlpmem.components.answers import answer_scores, encode_pairs, greedy_continuations
    from mlpmem.components.capture import resolve_hook
    from mlpmem.components.rag import rag_prompt
    from mlpmem.components.tuning import system_logprobs
    from mlpmem.stages.qa import _mixture

    lm, hook, mem = small_lm, resolve_hook(small_lm.model, "auto"), random_memory(small_lm)
    texts = make_texts(4, seed=3)
    items = [("Doc 1: alpha beta", " gamma"), ("Doc 22: the city", " river"), ("Doc 3: music", " and")]
    prompts = [rag_prompt(lm.tokenizer, texts[i:i + 2], p, t, 120)[0] for i, (p, t) in enumerate(items)]
    assert all(p != q for p, (q, _) in zip(prompts, items))  # passages were put before every prompt
    V = lm.model.get_output_embeddings().weight.shape[0]
    rag = greedy_continuations(lm, prompts, 4, 2)
    for lam in (0.0, 1e-12):
        mix = _mixture("rag+memory", {"lam": lam, "T_mem": 1.0}, mem, None, V)
        assert greedy_continuations(lm, prompts, 4, 2, mix=mix, hook=hook) == rag
    sc, _ = answer_scores(lm, encode_pairs(lm.tokenizer, prompts, [t for _, t in items]), 2, hook=hook, memory=mem,
                          mem_temperatures=[1.0])
    cfg = SimpleNamespace(eval=SimpleNamespace(knn_temperatures=[1.0], memory_temperatures=[1.0]))
    assert np.array_equal(system_logprobs(sc, "memory", {"lam": 0.0, "T_mem": 1.0}, cfg), sc.lm)
    assert not np.allclose(system_logprobs(sc, "memory", {"lam": 0.5, "T_mem": 1.0}, cfg), sc.lm)


def test_qa_stage_reports_rag_on_both_sides_with_intervals_and_speeds(qa_run, tmp_path):
    import shutil

    from helpers import tiny_config
    from mlpmem.cli import main

    run = tmp_path / "run"
    shutil.copytree(qa_run / "run", run, symlinks=True)
    shutil.rmtree(run / "qa")
    base = json.loads((qa_run / "run" / "qa" / "results.json").read_text())
    cfg = tiny_config(qa_run, "llama", out_dir=str(run), **{
        "qa.items": 12, "qa.min_prompt_words": 2, "qa.batch_size": 4, "qa.max_new_tokens": 6, "train.epochs": 3,
        "eval.lam": QA_LAM, "qa.rag": True, "qa.rag_k": 2, "qa.rag_passage_words": 20})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["qa", "--config", str(tmp_path / "cfg.yaml")]) == 0
    res = json.loads((run / "qa" / "results.json").read_text())
    assert res["systems"] == base["systems"] + ["rag", "rag+memory"]
    assert res["fingerprint"] != base["fingerprint"]  # the rag options enter the fingerprint only when on
    assert res["settings"]["rag+memory"] == res["settings"]["memory"]  # eval's tuned memory setting
    for side in ("heldin", "heldout"):
        s = res["sides"][side]
        for sys_ in ("rag", "rag+memory"):
            for m in ("exact_match", "f1", "loglik"):
                lo, hi = s["systems"][sys_][m]["ci95"]
                assert lo <= s["systems"][sys_][m]["mean"] <= hi
        assert {"rag vs base", "memory vs rag", "rag+memory vs rag"} <= set(s["comparisons"])
        for sys_ in ("base", "memory"):  # the systems without retrieval answer exactly as without --qa.rag
            assert s["systems"][sys_]["exact_match"] == base["sides"][side]["systems"][sys_]["exact_match"]
    sp, r = res["speed"], res["rag"]
    assert set(sp) == set(res["systems"]) and all(v["items_per_s"] > 0 for v in sp.values())
    assert sp["rag"]["seconds"] >= r["retrieve_seconds"] > 0 and r["passages"] > 0 and r["k"] == 2
    assert sp["rag"]["prompt_tokens"] > sp["base"]["prompt_tokens"]  # the passages are in the prompt
    assert sp["rag"]["prompt_tokens"] <= cfg.window.context - cfg.qa.max_new_tokens
    assert 0 < r["answer_in_passages"]["heldin"] <= 1 and 0 < r["mean_passages_kept"] <= 2
    rows = [json.loads(x) for x in (run / "qa" / "predictions.jsonl").read_text().splitlines()]
    assert all("rag" in row and "rag+memory" in row and len(row["rag_passages"]) <= 2 for row in rows)
    table = (run / "qa" / "results.md").read_text()
    assert "| RAG (BM25, top 2) |" in table and "answers/s" in table and "| RAG − base LM |" in table
