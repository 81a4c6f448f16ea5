"""lm-evaluation-harness: the `mlpmem` model is lm-eval's HFLM with the memory attached. On tasks defined on local
files it runs log-likelihood, rolling log-likelihood and generation; at lam = 0 it is lm-eval's own hf model
exactly; by default it takes the lambda `mlpmem eval` tuned; it refuses a memory made for another model."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from helpers import make_model_dir, make_texts, tiny_config, write_corpus  # noqa: E402
from mlpmem.cli import main  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
NAMES = ["mlpmem_local_ppl", "mlpmem_local_gen", "mlpmem_local_mc"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    texts = make_texts(20)
    write_corpus(tmp / "corpus.txt", texts * 4)
    cfg = tiny_config(tmp, "llama", **{"eval.systems": ["base", "memory"]})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["pipeline", "--config", str(tmp / "cfg.yaml")]) == 0
    tasks = tmp / "tasks"
    shutil.copytree(TASKS, tasks)
    for y in tasks.glob("*.yaml"):  # data files resolve against the working directory: make them absolute
        y.write_text(y.read_text().replace("test: docs.jsonl", f"test: {tasks / 'docs.jsonl'}"))
    with open(tasks / "docs.jsonl", "w") as f:
        for t in texts[:6]:
            w = t.split()
            f.write(json.dumps({"text": t, "prompt": " ".join(w[:6]), "answer": " " + w[6],
                                "choices": [" " + w[6], " " + w[-1]]}) + "\n")
    return tmp, tasks


def _evaluate(model: str, model_args: str, tasks: Path) -> dict:
    import mlpmem.harness  # noqa: F401  (registers "mlpmem")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=NAMES, batch_size=2,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=False)
    return {t: {k: v for k, v in r.items() if "," in k} for t, r in out["results"].items()}


def test_mlpmem_model_runs_every_request_type_and_is_hf_at_lambda_zero(run):
    tmp, tasks = run
    model_dir, memory = tmp / "model-llama", tmp / "run" / "memory" / "best"
    hf = _evaluate("hf", f"pretrained={model_dir},device=cpu,dtype=float32", tasks)
    zero = _evaluate("mlpmem", f"pretrained={model_dir},memory={memory},lam=0,device=cpu,dtype=float32", tasks)
    assert zero == hf  # the memory at weight 0 changes nothing, bit for bit
    tuned = _evaluate("mlpmem", f"pretrained={model_dir},memory={memory},device=cpu,dtype=float32", tasks)
    ppl = "word_perplexity,none"
    assert tuned["mlpmem_local_ppl"][ppl] < hf["mlpmem_local_ppl"][ppl]  # text the memory was trained on
    assert set(tuned) == set(NAMES) and "exact_match,none" in tuned["mlpmem_local_gen"]
    assert "acc,none" in tuned["mlpmem_local_mc"]


def test_lambda_defaults_to_the_tuned_one_and_other_models_are_refused(run):
    from mlpmem.harness import MemoryLM

    tmp, _ = run
    res = json.loads((tmp / "run" / "eval" / "results.json").read_text())
    m = MemoryLM(pretrained=str(tmp / "model-llama"), memory=str(tmp / "run" / "memory" / "best"), device="cpu")
    assert m.lam == pytest.approx(res["settings"]["memory"]["lam"])
    assert m.mem_temperature == pytest.approx(res["settings"]["memory"]["T_mem"])
    other = make_model_dir(tmp / "other", "llama", seed=1)
    with pytest.raises(ValueError, match="trained for base model"):
        MemoryLM(pretrained=str(other), memory=str(tmp / "run" / "memory" / "best"), device="cpu")
    exported = tmp / "exported"
    assert main(["export", "--config", str(tmp / "cfg.yaml"), "--export.dir", str(exported)]) == 0
    # an exported memory carries its tuned settings in its config, outside the run directory too
    m = MemoryLM(pretrained=str(tmp / "model-llama"), memory=str(exported), device="cpu")
    assert (m.lam, m.mem_temperature) == (pytest.approx(res["settings"]["memory"]["lam"]),
                                          pytest.approx(res["settings"]["memory"]["T_mem"]))
    from mlpmem.components.memory import MLPMemory

    plain = tmp / "plain-memory"  # saved outside a run directory, without tuned settings
    MLPMemory.from_pretrained(tmp / "run" / "memory" / "best").save_pretrained(plain)
    with pytest.raises(ValueError, match="lam= is required"):
        MemoryLM(pretrained=str(tmp / "model-llama"), memory=str(plain), device="cpu")
    assert MemoryLM(pretrained=str(tmp / "model-llama"), memory=str(plain), lam=0.3, device="cpu").lam == 0.3


def test_memory_lm_takes_a_model_object_and_records_the_memory_in_the_results(run):
    """MemoryLM(pretrained=<the model mlpmem.load returns>) evaluates the attached memory and scores what
    MemoryLM(pretrained=<path>) scores; the results' config records λ, the temperature, the memory's fingerprint and
    base-model fingerprint, and counts its parameters with the LM's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import mlpmem
    from mlpmem.components.memory import MLPMemory, memory_fingerprint
    from mlpmem.harness import MemoryLM

    tmp, tasks = run
    model_dir, best = tmp / "model-llama", tmp / "run" / "memory" / "best"
    tuned = json.loads((tmp / "run" / "eval" / "results.json").read_text())["settings"]["memory"]

    def evaluate(lm) -> dict:
        return simple_evaluate(model=lm, tasks=["mlpmem_local_ppl"], log_samples=False,
                               task_manager=TaskManager(include_path=str(tasks), include_defaults=False))

    model, tok = mlpmem.load(str(model_dir), memory=str(best), dtype="fp32")
    out = evaluate(MemoryLM(pretrained=model, tokenizer=tok, batch_size=2))  # adopts the attached memory
    by_path = evaluate(MemoryLM(pretrained=str(model_dir), memory=str(best), device="cpu", dtype="float32",
                                batch_size=2))
    ppl = "word_perplexity,none"
    assert out["results"]["mlpmem_local_ppl"][ppl] == pytest.approx(by_path["results"]["mlpmem_local_ppl"][ppl],
                                                                    rel=1e-6)
    memory = MLPMemory.from_pretrained(best)
    n_lm = sum(p.numel() for p in model.parameters())
    for cfg in (out["config"], by_path["config"]):
        assert cfg["memory_lam"] == pytest.approx(tuned["lam"]) and cfg["memory_temperature"] == pytest.approx(
            tuned["T_mem"])
        assert cfg["memory_fingerprint"] == memory_fingerprint(memory)
        assert cfg["memory_base_fingerprint"] == memory.config.meta["base_fingerprint"]
        assert (cfg["memory_num_parameters"], cfg["base_model_num_parameters"]) == (memory.num_parameters(), n_lm)
        assert cfg["model_num_parameters"] == n_lm + memory.num_parameters()
    assert by_path["config"]["memory_source"] == str(best)
    # a model object and a memory to attach to it; not a second memory on top of one
    with pytest.raises(ValueError, match="already has a memory attached"):
        MemoryLM(pretrained=model, tokenizer=tok, memory=str(best))
    mlpmem.detach_memory(model)
    assert MemoryLM(pretrained=model, tokenizer=tok, memory=str(best), lam=0.5).lam == 0.5
    mlpmem.detach_memory(model)
    with pytest.raises(ValueError, match="memory= is required"):
        MemoryLM(pretrained=model, tokenizer=tok)


def test_the_lm_eval_entry_point_names_the_memory_lm():
    """pyproject declares `mlpmem` in the lm_eval.models entry-point group; lm-eval's registry, which takes entry
    points as lazy targets, resolves it to MemoryLM (lm-eval 0.4.13 does not scan the group itself)."""
    import importlib.metadata as md
    import tomllib

    from lm_eval.api.registry import get_model, model_registry

    from mlpmem.harness import MemoryLM

    eps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]
    ep = md.EntryPoint(name="mlpmem", value=eps["lm_eval.models"]["mlpmem"], group="lm_eval.models")
    assert ep.load() is MemoryLM
    model_registry.register("mlpmem-entry-point-test", target=ep)
    assert get_model("mlpmem-entry-point-test") is MemoryLM


def test_qa_tasks_declare_a_version_and_score_the_answer_log_likelihood(tmp_path):
    """The QA tasks `mlpmem qa` writes carry metadata.version; their log-likelihood tasks declare `loglik` (the
    answer's mean log-likelihood, what the stage reports) and `acc`, not lm-eval's per-answer "perplexity"."""
    from lm_eval.tasks import TaskManager

    from mlpmem.components.qa import Item, write_lm_eval_tasks

    items = [Item(f"{split}-0-{i}", split, 0, "number", f"Doc {i} was written in", " 1850", "1850")
             for split in ("train", "test") for i in range(2)]
    write_lm_eval_tasks(tmp_path, items, "mlpmem_qa", max_new_tokens=4)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = tm.load_task_or_group(["mlpmem_qa_heldin", "mlpmem_qa_heldin_loglik"])
    gen, ll = tasks["mlpmem_qa_heldin"], tasks["mlpmem_qa_heldin_loglik"]
    assert gen.VERSION == ll.VERSION == 1.0
    assert set(ll._metric_fn_list) == {"acc", "loglik"} and ll.higher_is_better()["loglik"] is True
    doc = ll.dataset["test"][0]
    assert ll.process_results(doc, [(-2.5, True)]) == {"loglik": -2.5, "acc": 1.0}


def test_the_command_line_runs_lm_eval_with_the_mlpmem_model(run):
    import subprocess
    import sys

    tmp, tasks = run
    exe = Path(sys.executable).parent / "mlpmem-lm-eval"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "mlpmem.harness"]),
           "--model", "mlpmem", "--model_args",
           f"pretrained={tmp / 'model-llama'},memory={tmp / 'run' / 'memory' / 'best'},dtype=float32",
           "--device", "cpu", "--tasks", "mlpmem_local_ppl", "--include_path", str(tasks), "--batch_size", "2",
           "--output_path", str(tmp / "lm_eval_out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mlpmem_local_ppl" in r.stdout and "word_perplexity" in r.stdout


def test_mlpmem_model_at_an_interior_lambda_answers_from_the_mixture(run):
    """At lam = 0.5 every request lm-eval makes of the mlpmem model (log-likelihood, rolling log-likelihood,
    greedy generation) is answered from log((1 - lam) p_LM + lam p_mem), computed here directly in float64 from
    the LM's logits and the memory's on the hidden state at its hook point, request by request; and the answers
    differ from the plain LM's, so the mixture is what makes them."""
    import math

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlpmem.components.capture import forward_hidden, resolve_hook
    from mlpmem.components.memory import MLPMemory
    from mlpmem.harness import MemoryLM

    tmp, tasks = run
    model_dir, mem_dir = tmp / "model-llama", tmp / "run" / "memory" / "best"
    lam = 0.5
    mlm = MemoryLM(pretrained=str(model_dir), memory=str(mem_dir), lam=lam, device="cpu", dtype="float32",
                   batch_size=2)
    samples = simple_evaluate(model=mlm, tasks=NAMES, log_samples=True,
                              task_manager=TaskManager(include_path=str(tasks), include_defaults=False))["samples"]

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    memory = MLPMemory.from_pretrained(mem_dir)
    meta = memory.config.meta
    hook = resolve_hook(lm, meta["hook"], int(meta.get("layer", -1)))
    T = mlm.mem_temperature

    def mix(ids: list[int], mem_lam: float = lam) -> torch.Tensor:
        """(len(ids), V) float64 log-probs of each next token under the mixture."""
        with torch.no_grad():
            x = torch.tensor([ids])
            lm_lp = lm(x).logits[0].double().log_softmax(-1)
            mem_lp = (memory(forward_hidden(lm, hook, x)[0]).double() / T).log_softmax(-1)
        if mem_lam == 0:
            return lm_lp
        return torch.logaddexp(lm_lp + math.log(1 - mem_lam), mem_lp + math.log(mem_lam))

    def encode(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    def loglik(ctx: str, cont: str, mem_lam: float = lam) -> float:
        n = len(ctx) - len(ctx.rstrip())  # lm-eval moves the context's trailing spaces into the continuation
        ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
        c, whole = encode(ctx), encode(ctx + cont)
        lp = mix(whole, mem_lam)
        return float(sum(lp[i - 1, whole[i]] for i in range(len(c), len(whole))))

    def args(s: dict) -> list[tuple]:  # the sample's requests' arguments
        return [tuple(a) for a in s["arguments"]]

    checked = {}
    for s in samples["mlpmem_local_mc"]:
        for (ctx, cont), (ll, _) in zip(args(s), [r[0] for r in s["resps"]]):
            assert ll == pytest.approx(loglik(ctx, cont), abs=1e-4)
            assert abs(ll - loglik(ctx, cont, 0.0)) > 1e-3  # not the plain LM's
            checked["mc"] = checked.get("mc", 0) + 1
    for s in samples["mlpmem_local_ppl"]:
        (text,), = args(s)
        toks = encode(text)
        assert len(toks) < mlm.max_length  # one window: every token predicted from the prefix token and all before
        lp = mix([mlm.prefix_token_id] + toks[:-1])
        assert s["resps"][0][0] == pytest.approx(float(sum(lp[i, t] for i, t in enumerate(toks))), rel=1e-5)
        checked["ppl"] = checked.get("ppl", 0) + 1
    changed = 0
    for s in samples["mlpmem_local_gen"]:
        (ctx, kw), = args(s)
        ids, plain = encode(ctx), encode(ctx)
        for _ in range(kw["max_gen_toks"]):
            ids.append(int(mix(ids)[-1].argmax()))
            plain.append(int(mix(plain, 0.0)[-1].argmax()))
        n = len(encode(ctx))
        want = tok.decode(ids[n:], skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == want, s["doc"]
        changed += want != tok.decode(plain[n:], skip_special_tokens=True).split("\n")[0]
        checked["gen"] = checked.get("gen", 0) + 1
    assert checked == {"mc": 12, "ppl": 6, "gen": 6}
    assert changed > 0
