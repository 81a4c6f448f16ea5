"""Two CPU processes (torchrun, gloo) give the same datastore, targets, scores and (within float tolerance) memory
as one.

The single-process run uses the same --extract.shards 2, so shard files compare one for one. Both runs read the
same prepared corpus. Training is data-parallel: each rank takes half of every global batch and gradients are
all-reduced, so only the order of float additions differs from one process (bf16 off, dropout 0). Eval is
checked on a copy of the single-process run (same memory and index), scored by two processes.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from helpers import tiny_config
from mlpmem.cli import main

pytestmark = pytest.mark.distributed

STAGES = ("extract", "index", "knn-targets", "train")
# One launch runs every stage through the CLI entry point (one process group, one interpreter start per rank).
DRIVER = """
import sys
from mlpmem.cli import main
for stage in sys.argv[2:]:
    rc = main([stage, "--config", sys.argv[1]])
    if rc:
        sys.exit(rc)
"""


def _config(tmp_path, name):
    cfg = tiny_config(tmp_path, "llama", **{"out_dir": str(tmp_path / name), "extract.shards": 2,
                                             "memory.dropout": 0.0, "train.bf16": False, "train.epochs": 2})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _npy_files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*.npy"))


def _torchrun(driver, config, *stages):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLPMEM_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), str(config), *stages], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_two_processes_match_one(tmp_path):
    one, two = _config(tmp_path, "one"), _config(tmp_path, "two")
    assert main(["prepare", "--config", str(one)]) == 0
    shutil.copytree(tmp_path / "one" / "data", tmp_path / "two" / "data")
    for stage in STAGES + ("eval",):
        assert main([stage, "--config", str(one)]) == 0, stage

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    _torchrun(driver, two, *STAGES)

    for stage in ("datastore", "targets"):
        a, b = tmp_path / "one" / stage, tmp_path / "two" / stage
        files = _npy_files(a)
        assert files == _npy_files(b) and any("-00001-of-00002" in f for f in files), files
        for f in files:  # keys/vals and ids/probs of each shard, and the validation arrays
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{stage}/{f} differs"
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
        assert ma["shards"] == mb["shards"] and ma["fingerprint"] == mb["fingerprint"]

    ma, mb = (json.loads((tmp_path / run / "memory" / "manifest.json").read_text()) for run in ("one", "two"))
    assert ma["fingerprint"] != mb["fingerprint"]  # the train fingerprint records world_size: 2 ranks really ran
    assert ma["summary"]["steps"] == mb["summary"]["steps"] > 4
    assert ma["summary"]["best_step"] == mb["summary"]["best_step"]
    # each rank trained on its own half of every global batch: together exactly the single process's positions,
    # never the whole batch each (which would also give matching weights after the gradient average)
    (one_share,), two_shares = ma["summary"]["rank_shares"], mb["summary"]["rank_shares"]
    assert one_share["positions"] == ma["summary"]["steps"] * 64
    assert [s["positions"] for s in two_shares] == [one_share["positions"] // 2] * 2
    assert sum(s["sum"] for s in two_shares) == one_share["sum"]
    assert two_shares[0]["sum"] != two_shares[1]["sum"]
    assert mb["summary"]["final_train_loss"] == pytest.approx(ma["summary"]["final_train_loss"], rel=1e-4)
    for ckpt in ("last", "best"):
        wa, wb = (load_file(str(tmp_path / run / "memory" / ckpt / "model.safetensors")) for run in ("one", "two"))
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=2e-6, err_msg=f"{ckpt}/{k}")
    la, lb = ([json.loads(ln) for ln in (tmp_path / run / "memory" / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two"))
    assert [x["step"] for x in la] == [x["step"] for x in lb]
    for x, y in zip(la, lb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)

    # eval: two processes score halves of each split of the same run (memory, index) and rank 0 joins them
    shutil.copytree(tmp_path / "one", tmp_path / "three")
    shutil.rmtree(tmp_path / "three" / "eval")
    three = tmp_path / "three.yaml"
    three.write_text(one.read_text().replace(str(tmp_path / "one"), str(tmp_path / "three")))
    _torchrun(driver, three, "eval")
    ea, eb = (tmp_path / run / "eval" for run in ("one", "three"))
    assert sorted(p.name for p in (eb / "scores").iterdir()) == [
        f"{s}-0000{r}-of-00002.npz" for s in ("test", "validation") for r in (0, 1)]
    for split in ("validation", "test"):
        a, b = np.load(ea / "scores" / f"{split}-00000-of-00001.npz"), \
            [np.load(eb / "scores" / f"{split}-0000{r}-of-00002.npz") for r in (0, 1)]
        assert 0 < len(b[0]["lm"]) < len(a["lm"])  # each rank scored a real share
        for name in ("lm", "mem", "knn"):
            joined = np.concatenate([x[name] for x in b], axis=-1)
            np.testing.assert_allclose(joined, a[name], rtol=0, atol=1e-5, err_msg=f"{split}/{name}")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ea, eb))
    assert ra["settings"] == rb["settings"]
    for split, res in ra["splits"].items():
        assert rb["splits"][split]["tokens"] == res["tokens"]
        for system, row in res["systems"].items():
            assert rb["splits"][split]["systems"][system]["ppl"] == pytest.approx(row["ppl"], rel=1e-5), (split, system)
