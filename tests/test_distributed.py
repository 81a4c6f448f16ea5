"""Two CPU processes (torchrun, gloo) give the same datastore, targets, scores and (within float tolerance) memory
as one.

The single-process run uses the same --extract.shards 2, so shard files compare one for one. Both runs read the
same prepared corpus. Training is data-parallel: each rank takes half of every global batch and gradients are
all-reduced, so only the order of float additions differs from one process (bf16 off, dropout 0). Eval is
checked on a copy of the single-process run (same memory and index), scored by two processes.

Who computed what is read from each rank's own record (MLPMEM_TRACE: the rows a rank extracted and searched, with
digests of what it produced; the positions every training step read and the rank's loss on them), not from the
plan: a rank that extracted every shard, or trained on the whole global batch with its gradient halved, writes the
same files and weights, and only these records show it.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from helpers import tiny_config
from mlpmem.cli import main
from mlpmem.components.losses import memory_loss
from mlpmem.components.memory import MLPMemory
from mlpmem.components.sparse import CsrRows
from mlpmem.components.trainer import Targets

pytestmark = pytest.mark.distributed

STAGES = ("extract", "index", "knn-targets", "train")
TRACE = "MLPMEM_TRACE"  # directory where each rank records what it computed (off by default)
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


def _traced(d, name, world_size):
    """What each rank recorded under MLPMEM_TRACE=d: per rank, a list of records (one JSON object per line)."""
    return [[json.loads(ln) for ln in (d / f"{name}-rank{r}.jsonl").read_text().splitlines()]
            for r in range(world_size)]


def _sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _torchrun(driver, config, *stages, trace=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLPMEM_NO_PROGRESS": "1"}
    env.pop(TRACE, None)
    if trace:
        env[TRACE] = str(trace)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(driver), str(config), *stages], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_two_processes_match_one(tmp_path, monkeypatch):
    one, two = _config(tmp_path, "one"), _config(tmp_path, "two")
    trace1, trace2 = tmp_path / "trace-one", tmp_path / "trace-two"
    assert main(["prepare", "--config", str(one)]) == 0
    shutil.copytree(tmp_path / "one" / "data", tmp_path / "two" / "data")
    monkeypatch.setenv(TRACE, str(trace1))
    for stage in STAGES:
        assert main([stage, "--config", str(one)]) == 0, stage
    monkeypatch.delenv(TRACE)
    assert main(["eval", "--config", str(one)]) == 0

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    _torchrun(driver, two, *STAGES, trace=trace2)

    for stage in ("datastore", "targets"):
        a, b = tmp_path / "one" / stage, tmp_path / "two" / stage
        files = _npy_files(a)
        assert files == _npy_files(b) and any("-00001-of-00002" in f for f in files), files
        for f in files:  # keys/vals and ids/probs of each shard, and the validation arrays
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{stage}/{f} differs"
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
        assert ma["shards"] == mb["shards"] and ma["fingerprint"] == mb["fingerprint"]

    # extract and knn-targets, from what each rank recorded computing (not the shard plan): rank r did shard r alone,
    # the ranks' rows are disjoint and together every row, and what each computed for its rows equals that slice of
    # the single-process arrays
    run1 = tmp_path / "one"
    ds_shards = json.loads((run1 / "datastore" / "manifest.json").read_text())["shards"]
    keys, vals = (np.concatenate([np.load(run1 / "datastore" / sh[k]) for sh in ds_shards]) for k in ("keys", "vals"))
    tg_shards = json.loads((run1 / "targets" / "manifest.json").read_text())["shards"]
    csr = [tuple(np.load(run1 / "targets" / sh[k]) for k in ("offsets", "ids", "probs")) for sh in tg_shards]
    counts = np.concatenate([np.diff(off) for off, _, _ in csr])
    ids, probs = np.concatenate([i for _, i, _ in csr]), np.concatenate([p for _, _, p in csr])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ext = [[x for x in recs if x["out"] == "datastore"] for recs in _traced(trace2, "extract", 2)]
    knn = _traced(trace2, "knn-targets", 2)
    for stage, recs in (("extract", ext), ("knn-targets", knn)):
        assert [[x["shard"] for x in rank_recs] for rank_recs in recs] == [[0], [1]], (stage, recs)
        cover = np.zeros(len(vals), dtype=np.int64)
        for x in recs[0] + recs[1]:
            cover[x["rows"][0]:x["rows"][1]] += 1
        assert (cover == 1).all(), f"{stage}: rows computed by both ranks or by neither: {np.flatnonzero(cover != 1)}"
    for x in ext[0] + ext[1]:
        lo, hi = x["rows"]
        assert x["computed"] == hi - lo
        assert (x["keys_sha256"], x["vals_sha256"]) == (_sha(keys[lo:hi]), _sha(vals[lo:hi])), x
    for x in knn[0] + knn[1]:
        lo, hi = x["rows"]
        a, b = offsets[lo], offsets[hi]
        assert (x["counts_sha256"], x["ids_sha256"], x["probs_sha256"]) == (
            _sha(counts[lo:hi]), _sha(ids[a:b]), _sha(probs[a:b])), x

    ma, mb = (json.loads((tmp_path / run / "memory" / "manifest.json").read_text()) for run in ("one", "two"))
    assert ma["fingerprint"] != mb["fingerprint"]  # the train fingerprint records world_size: 2 ranks really ran
    assert ma["summary"]["steps"] == mb["summary"]["steps"] > 4
    assert ma["summary"]["best_step"] == mb["summary"]["best_step"]
    # training, from the positions each step actually read and the loss computed on them (per rank, before the
    # gradient all-reduce): a rank training on the whole global batch with its gradient halved would give the same
    # weights, so only these show that each rank trained on its own half
    (t1,), t2 = _traced(trace1, "train", 1), _traced(trace2, "train", 2)
    assert [x["step"] for x in t1] == [x["step"] for x in t2[0]] == [x["step"] for x in t2[1]] == \
        list(range(1, ma["summary"]["steps"] + 1))
    for g, x, y in zip(t1, *t2):
        glob, px, py = (np.asarray(r["positions"]) for r in (g, x, y))
        # (a) the ranks' halves are disjoint and together exactly the single process's global batch of this step
        assert len(px) == len(py) == len(glob) // 2, g["step"]
        assert Counter(px.tolist()) + Counter(py.tolist()) == Counter(glob.tolist()), g["step"]
        if len(np.unique(glob)) == len(glob):  # (a batch straddling two epochs may hold a row twice)
            assert len(np.intersect1d(px, py)) == 0, g["step"]
        # the rank losses average to the single-process loss (weights equal up to float addition order)
        assert (len(px) * x["loss"] + len(py) * y["loss"]) / len(glob) == pytest.approx(g["loss"], rel=1e-4)
    # (b) at step 1 (the seeded initial memory, the same in both runs) each rank's loss is a single-process
    # computation on exactly its half; checked first on the whole batch against the single process's own record
    cfg1 = yaml.safe_load(one.read_text())
    mcfg = MLPMemory.from_pretrained(run1 / "memory" / "last").config
    with torch.random.fork_rng():
        torch.manual_seed(cfg1["seed"])  # as the train stage seeds it (memory.init_head random)
        memory = MLPMemory(mcfg)
    targets = Targets(CsrRows(csr), vals)

    @torch.no_grad()
    def loss_on(pos):
        pos = np.sort(np.asarray(pos))
        x = torch.from_numpy(keys[pos].astype(np.float32))
        return memory_loss(memory(x), *targets.batch(pos), cfg1["train"]["alpha"]).loss.item()

    assert loss_on(t1[0]["positions"]) == pytest.approx(t1[0]["loss"], rel=1e-6)
    for r in (0, 1):
        assert t2[r][0]["loss"] == pytest.approx(loss_on(t2[r][0]["positions"]), rel=1e-6), r
        assert t2[r][0]["loss"] != pytest.approx(t1[0]["loss"], rel=1e-6), r  # a half's loss, not the batch's
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
