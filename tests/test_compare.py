"""`mlpmem compare` on a tiny random model and a memorisable corpus: every variant runs, the rows stand on the
same test tokens with bootstrap intervals, the control reuses the fine-tuned run's datastore and targets."""

import json

import yaml

from helpers import make_texts, tiny_config, write_corpus
from mlpmem.cli import main


def test_compare_runs_every_variant_side_by_side(tmp_path, capsys):
    write_corpus(tmp_path / "corpus.txt", make_texts(20) * 4)
    cfg = tiny_config(tmp_path, "llama", **{"joint.max_steps": 4, "joint.batch_size": 4, "joint.eval_every": 2,
                                            "joint.save_every": 2, "joint.val_windows": 8, "joint.lam": 0.5,
                                            "finetune.max_steps": 12, "finetune.batch_size": 4, "finetune.lr": 1e-3,
                                            "finetune.eval_every": 6, "finetune.save_every": 6,
                                            "finetune.val_windows": 8, "train.epochs": 2})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["compare", "--config", str(tmp_path / "cfg.yaml")]) == 0
    root = tmp_path / "run"
    res = json.loads((root / "compare" / "results.json").read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert set(rows) == {"base LM", "base + kNN-LM", "base + memory", "base + memory + kNN-LM", "fine-tuned (full)",
                         "fine-tuned (LoRA)", "fine-tuned + kNN-LM", "fine-tuned + memory",
                         "fine-tuned + memory + kNN-LM", "fine-tuned + memory, alpha = 0 (control)",
                         "fine-tuned + memory, then trained jointly", "its jointly trained LM without the memory"}
    # the variants share the prepared text; the control shares the fine-tuned model, datastore and targets
    for v in ("full", "lora", "full-ce"):
        assert (root / v / "data").is_symlink() and (root / v / "data").resolve() == (root / "vanilla" / "data")
    for d in ("finetune", "datastore", "targets"):
        assert (root / "full-ce" / d).resolve() == (root / "full" / d).resolve()
    ce = json.loads((root / "full-ce" / "memory" / "manifest.json").read_text())
    assert ce["upstream"]["targets"] == json.loads((root / "full" / "targets" / "manifest.json").read_text())[
        "fingerprint"]
    # on a memorisable corpus, fine-tuning and every addition beat the untouched base, with intervals that say so
    base = rows["base LM"]["ppl"]
    for label in ("fine-tuned (full)", "fine-tuned (LoRA)", "fine-tuned + memory", "base + kNN-LM"):
        r = rows[label]
        assert r["ppl"] < base and r["vs_base"]["excludes_zero"] and r["vs_base"]["ci95"][1] < 0, label
        assert r["vs_base"]["change"] == __import__("pytest").approx(r["ppl"] / base - 1, rel=1e-9)
    assert rows["fine-tuned (LoRA)"]["trainable_lm_params"] < rows["fine-tuned (full)"]["trainable_lm_params"]
    pairs = {(c["a"], c["b"]) for c in res["comparisons"]}
    assert ("fine-tuned + memory", "fine-tuned + memory, alpha = 0 (control)") in pairs
    assert ("fine-tuned + memory", "fine-tuned (full)") in pairs
    assert res["tokens"] > 0 and res["documents"] >= 2
    assert set(res["wall_seconds"]) == {"vanilla", "full", "lora", "full-ce", "joint"}
    # joint starts from full's fine-tuned LM and memory (LoRA unless --joint.mode says otherwise), scored as a pair
    jm = json.loads((root / "joint" / "joint" / "manifest.json").read_text())
    assert jm["upstream"]["eval"] == json.loads((root / "full" / "eval" / "manifest.json").read_text())["fingerprint"]
    assert (root / "joint" / "eval-joint" / "results.json").is_file()
    assert jm["mode"] == "lora" and jm["upstream"]["memory"] == json.loads(
        (root / "full" / "memory" / "manifest.json").read_text())["fingerprint"]
    assert (root / "joint" / "eval").resolve() == (root / "full" / "eval").resolve()
    assert "joint" in rows["fine-tuned + memory, then trained jointly"]["compute"]
    assert ("fine-tuned + memory, then trained jointly", "fine-tuned + memory") in pairs
    out = capsys.readouterr().out
    assert "| fine-tuned + memory" in out and "Paired bootstrap" in out
