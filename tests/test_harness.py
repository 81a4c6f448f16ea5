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
    with pytest.raises(ValueError, match="lam= is required"):  # outside a run directory: no tuned lambda
        MemoryLM(pretrained=str(tmp / "model-llama"), memory=str(exported), device="cpu")
    assert MemoryLM(pretrained=str(tmp / "model-llama"), memory=str(exported), lam=0.3, device="cpu").lam == 0.3


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
