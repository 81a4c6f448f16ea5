"""The run directory: where every artifact lives, and a typed reader for each that checks it before use.

Every reader verifies the artifact's whole upstream chain (:func:`verify_chain`), so a datastore built from a
corpus that ``prepare`` has since replaced, targets over a re-extracted datastore, or a memory trained on either,
is refused with a message naming what to rerun, never silently mixed.

Layout under ``--out_dir``::

    data/<split>/tokens.npy, offsets.npy      prepare
    ood/tokens.npy, offsets.npy                eval, with --eval.ood_source (its own manifest, upstream: none)
    datastore/keys-*, vals-*, validation/      extract (train datastore; validation keys for the memory)
    index/index.faiss                          index
    targets/ids-*, probs-*, validation/        knn-targets
    memory/best, last (checkpoint symlinks)    train
    <eval.out_name>/results.json, scores/      eval
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mlpmem.artifacts.manifest import read_manifest, verify_chain
from mlpmem.errors import StageError
from mlpmem.artifacts.ranges import check_ids, check_offsets, check_probs, corrupt
from mlpmem.files import fingerprint, load_npy, read_json
from mlpmem import systems as sy

if TYPE_CHECKING:
    from mlpmem.components.gate import Gate

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
OOD = "ood"  # the out-of-domain split (--eval.ood_source), and its directory: prepared by `eval`, not `prepare`
DATA, FINETUNE, DATASTORE, DATASTORE_VAL, INDEX, TARGETS, MEMORY = (
    "data", "finetune", "datastore", "datastore/validation", "index", "targets", "memory")
FINETUNED_MODEL = "model"  # the Hugging Face model directory inside finetune/ (and joint/)
JOINT, JOINT_MEMORY = "joint", "memory"  # `mlpmem joint`'s output, and the memory directory inside it


def is_complete(path: Path) -> bool:
    m = read_manifest(path)
    return bool(m and m.get("complete"))


# ----------------------------------------------------------------------------- prepared splits

def _split_source(run_dir: Path, split: str) -> tuple[dict, Path, str]:
    """(manifest, directory of tokens.npy/offsets.npy, the command that rewrites them) of a prepared split:
    train/validation/test under data/ (`prepare`), the out-of-domain corpus under ood/ (`eval` prepares it)."""
    if split == OOD:
        m = read_manifest(run_dir / OOD)
        if m is None or not m.get("complete"):
            raise StageError(f"no out-of-domain corpus prepared in {run_dir / OOD}: run `mlpmem eval` with "
                             "--eval.ood_source")
        return verify_chain(run_dir, OOD, OOD), run_dir / OOD, f"rm -r {run_dir / OOD}; mlpmem eval --force"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return verify_chain(run_dir, DATA, "prepare"), run_dir / DATA / split, "mlpmem prepare --force"


def load_split(run_dir: Path, split: str, tokenizer_hash: str | None = None) -> tuple[np.ndarray, dict]:
    """(tokens int32, its manifest) of a prepared split (train, validation, test, or ood: the out-of-domain corpus
    of --eval.ood_source); checks the tokenizer matches the model's."""
    run_dir = Path(run_dir)
    m, d, rerun = _split_source(run_dir, split)
    if tokenizer_hash is not None and m["tokenizer_hash"] != tokenizer_hash:
        raise StageError(f"the corpus in {d} was prepared with another tokenizer "
                         f"({m['tokenizer_name']}, hash {m['tokenizer_hash']}) than the model's "
                         f"(hash {tokenizer_hash}): rerun `{rerun}` with the same --model.name")
    path = d / "tokens.npy"
    tokens = load_npy(path, np.int32, m["counts"][split]["tokens"])
    check_ids(path, tokens, m.get("vocab_size"), rerun, "token")  # absent in older manifests
    return tokens, m


def load_offsets(run_dir: Path, split: str) -> np.ndarray:
    """int64 (n_docs + 1,): where each document of a prepared split starts in its stream, then the stream length."""
    m, d, _ = _split_source(Path(run_dir), split)
    return np.asarray(load_npy(d / "offsets.npy", np.int64, m["counts"][split]["documents"] + 1))


# ----------------------------------------------------------------------------- base model

def base_model(cfg) -> tuple:
    """(ModelConfig of the base LM every later stage uses, upstream links). With --finetune.mode full/lora that is
    this run's fine-tuned model directory (checked: complete, fresh, made with that mode); else --model as given."""
    if cfg.finetune.mode == "none":
        return cfg.model, {}
    m = verify_chain(cfg.run_dir, FINETUNE, "finetune")
    if m.get("mode") != cfg.finetune.mode:
        raise StageError(f"{cfg.run_dir / FINETUNE} holds a {m.get('mode')!r} fine-tuning, but --finetune.mode is "
                         f"{cfg.finetune.mode!r}: rerun `mlpmem finetune --force`")
    if m.get("settings") != dataclasses.asdict(cfg.finetune):
        raise StageError(f"{cfg.run_dir / FINETUNE} was fine-tuned with other --finetune settings than these: rerun "
                         "`mlpmem finetune --force` (and the stages after it), or `mlpmem pipeline`")
    path = (cfg.run_dir / FINETUNE / FINETUNED_MODEL).absolute()  # the link, not the version it points to now
    return dataclasses.replace(cfg.model, name=str(path), revision=None), {FINETUNE: m["fingerprint"]}


def joint_model(cfg) -> tuple:
    """(ModelConfig of the LM trained jointly with the memory, the memory's directory, the joint manifest): the
    outputs of `mlpmem joint` in this run, checked complete and fresh."""
    m = verify_chain(cfg.run_dir, JOINT, "joint")
    d = (cfg.run_dir / JOINT).absolute()
    return dataclasses.replace(cfg.model, name=str(d / FINETUNED_MODEL), revision=None), d / JOINT_MEMORY, m


# ----------------------------------------------------------------------------- datastore

class Datastore:
    """Read access to a finished datastore: shard memmaps of keys (float16) and vals (int32), by global row."""

    def __init__(self, run_dir: Path, expect_model: dict | None = None, expect_hook: str | None = None,
                 split: str = "train", limit: int | None = None):
        """``limit``: use only the first ``limit`` rows (--knn.datastore_tokens), a datastore over a prefix of the
        train split that shares this extraction with larger ones."""
        self.run_dir = Path(run_dir)
        self.key = DATASTORE if split == "train" else f"{DATASTORE}/{split}"
        self.dir = self.run_dir / self.key
        self.manifest = m = verify_chain(self.run_dir, self.key, "extract")
        if expect_model is not None and m["model"]["fingerprint"] != expect_model["fingerprint"]:
            raise StageError(f"the datastore in {self.dir} was built with model {m['model']['name']} "
                             f"(weights or config differ from {expect_model['name']} now): rerun "
                             "`mlpmem extract --force` (and the stages after it) or fix --model.name")
        if expect_hook is not None and m["hook"] != expect_hook:
            raise StageError(f"the datastore in {self.dir} holds keys from hook {m['hook']}, but the config names "
                             f"{expect_hook}: rerun `mlpmem extract --force` or set --extract.hook {m['hook']}")
        self.n, self.dim = m["n_positions"], m["dim"]
        try:
            self.keys = [load_npy(self.dir / s["keys"], np.float16, s["stop"] - s["start"]) for s in m["shards"]]
            self.vals_shards = [load_npy(self.dir / s["vals"], np.int32, s["stop"] - s["start"])
                                for s in m["shards"]]
        except StageError as e:
            raise StageError(f"damaged datastore: {e} (that stage is `mlpmem extract --force`)") from None
        for k in self.keys:
            if k.ndim != 2 or k.shape[1] != self.dim:
                raise StageError(f"a key shard in {self.dir} has shape {k.shape}, expected (rows, {self.dim}): "
                                 "rerun `mlpmem extract --force`")
        self.shards = [dict(s) for s in m["shards"]]  # {start, stop, ...} in row order
        self.limit = limit
        if limit is not None:
            if limit > self.n:
                raise StageError(f"--knn.datastore_tokens {limit} exceeds the {self.n} positions of the datastore "
                                 f"in {self.dir}: lower it, or prepare and extract more train text "
                                 "(--data.max_train_tokens)")
            keep = [i for i, sh in enumerate(self.shards) if sh["start"] < limit]
            self.shards = [{**self.shards[i], "stop": min(self.shards[i]["stop"], limit)} for i in keep]
            self.keys = [self.keys[i][:sh["stop"] - sh["start"]] for i, sh in zip(keep, self.shards)]
            self.vals_shards = [self.vals_shards[i][:sh["stop"] - sh["start"]] for i, sh in zip(keep, self.shards)]
            self.n = limit
        for s, v in zip(self.shards, self.vals_shards):  # the next-token ids (the kNN labels)
            check_ids(self.dir / s["vals"], v, (m.get("model") or {}).get("vocab_size"), "mlpmem extract --force")

    @property
    def fingerprint(self) -> str:
        """The extraction's fingerprint (what downstream manifests record as their upstream)."""
        return self.manifest["fingerprint"]

    @property
    def scope(self) -> list[int]:
        """What a stage reading this datastore adds to its fingerprint: [rows] for a prefix, [] for all of it
        (so runs made before prefixes existed keep their fingerprints)."""
        return [] if self.limit is None else [self.n]

    @property
    def bytes(self) -> int:
        """Bytes of the keys and values in use (a prefix's share of the extraction's)."""
        return int(self.manifest["bytes"] * self.n / self.manifest["n_positions"])

    @property
    def has_validation(self) -> bool:
        return is_complete(self.run_dir / DATASTORE_VAL)

    def validation(self) -> "Datastore":
        """The validation positions' keys (opened and checked once per Datastore)."""
        if not hasattr(self, "_validation"):
            self._validation = Datastore(self.run_dir, split="validation")
        return self._validation

    @property
    def vals(self) -> np.ndarray:
        """All values as one int32 array in memory (4 bytes per row)."""
        if not hasattr(self, "_vals"):
            self._vals = np.concatenate([np.asarray(v) for v in self.vals_shards])
        return self._vals

    def key_rows(self, rows: np.ndarray) -> np.ndarray:
        """Keys of arbitrary global rows, (len(rows), d) float16, in the order given."""
        from mlpmem.components.index import ConcatRows

        return ConcatRows(self.keys)[np.asarray(rows, dtype=np.int64)]


# ----------------------------------------------------------------------------- index

def open_index(run_dir: Path, nprobe: int):
    """(FAISS index, its manifest), checked to be built on the datastore now on disk."""
    from mlpmem.components.index import load_index

    m = verify_chain(run_dir, INDEX, "index")
    return load_index(Path(run_dir) / INDEX / "index.faiss", nprobe), m


# ----------------------------------------------------------------------------- targets

def _csr_set(d: Path, names: dict, rows: int, vocab_size: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rerun = "mlpmem knn-targets --force"
    offsets = load_npy(d / names["offsets"], np.int64, rows + 1)
    ids, probs = load_npy(d / names["ids"], np.int32), load_npy(d / names["probs"], np.float16)
    if ids.ndim != 1 or probs.ndim != 1:
        raise StageError(f"the kNN targets in {d} are not 1-D CSR arrays: rerun `{rerun}`")
    check_offsets(d / names["offsets"], offsets, len(ids), d / names["ids"], rerun)
    if len(probs) != len(ids):
        raise corrupt(d / names["probs"], f"{len(probs)} probabilities for {len(ids)} ids", rerun)
    check_ids(d / names["ids"], ids, vocab_size, rerun)
    check_probs(d / names["probs"], probs, rerun)
    return offsets, ids, probs


class TargetStore:
    """Read access to finished targets: the train shards' and the validation positions' CSR sets, in the order of
    the trainer's row space (train rows, then validation rows), as one :class:`CsrRows`."""

    def __init__(self, run_dir: Path, vocab_size: int | None = None):
        """``vocab_size``: the bound on target ids; None takes the model's of this run's datastore (the targets'
        upstream, whose labels the memory learns alongside them)."""
        from mlpmem.components.sparse import CsrRows, csr_names

        self.dir = Path(run_dir) / TARGETS
        self.manifest = m = verify_chain(run_dir, TARGETS, "knn-targets")
        if m.get("layout") != "csr":
            raise StageError(f"the kNN targets in {self.dir} use an older layout: rerun `mlpmem knn-targets --force`")
        if vocab_size is None:
            vocab_size = ((read_manifest(Path(run_dir) / DATASTORE) or {}).get("model") or {}).get("vocab_size")
        self.train = [_csr_set(self.dir, s, s["stop"] - s["start"], vocab_size) for s in m["shards"]]
        self.n_validation = m["validation"]
        self.val = [_csr_set(self.dir / "validation", csr_names(""), self.n_validation, vocab_size)] \
            if self.n_validation else []
        self.rows = CsrRows(self.train + self.val)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


# ----------------------------------------------------------------------------- memory

def check_memory_matches(memory, identity: dict, hook) -> None:
    """StageError unless the memory was trained for this base model (tokenizer and weights) and hook point."""
    from mlpmem.components.hub import MemoryMismatch, check_base

    meta = memory.config.meta or {}
    try:
        check_base(meta, identity)
    except MemoryMismatch as e:
        raise StageError(f"{e} (--model.name; or retrain the memory)") from None
    if meta.get("hook") and meta["hook"] != str(hook):
        raise StageError(f"this memory was trained on hook point {meta['hook']}, but the config resolves to "
                         f"{hook}: set --extract.hook {meta['hook']}")


def load_memory(run_dir: Path, lm, hook, path: str | Path | None = None, required: bool = False):
    """(memory, meta) of this run's selected (best-by-validation) checkpoint, checked against the loaded base LM
    and for finite weights; (None, {}) with a warning when there is none (an error if ``required``).

    ``path``: load that checkpoint directory instead (for ablations over a finished run, or the joint memory)."""
    from mlpmem.components.memory import MLPMemory

    d = Path(run_dir) / MEMORY
    if path is None:
        m = read_manifest(d)
        if m is None or not m.get("complete"):
            if required:
                raise StageError(f"no trained memory in {d}: run `mlpmem train` first")
            log.warning("memory skipped: no trained memory in %s (run `mlpmem train`)", d)
            return None, {}
        m = verify_chain(run_dir, MEMORY, "train")
        path = d / m["checkpoint"]
    else:
        m = {"fingerprint": fingerprint(str(path))}
    try:
        # inference in the LM's dtype (bf16 halves the memory's cost on CPU and GPU); mixing happens in float32
        memory = MLPMemory.from_pretrained(path, device=str(lm.device), dtype=next(lm.model.parameters()).dtype)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(f"cannot load the memory: {e}. Rerun `mlpmem train --force` to rebuild it") from None
    bad = [n for n, p in memory.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise StageError(f"the memory in {path} has non-finite weights ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): training diverged; rerun `mlpmem train --force` "
                         "with a lower --train.lr")
    check_memory_matches(memory, lm.identity, hook)
    meta = {"fingerprint": m["fingerprint"], "params": memory.num_parameters(),
            "bytes": (Path(path) / "model.safetensors").stat().st_size}
    return memory.eval(), meta


class KnnSource:
    """kNN-LM over a run's datastore and index, as evaluation and decoding use it (see :func:`open_knn`)."""

    def __init__(self, index, ds: "Datastore", im: dict, k: int, exact: bool) -> None:
        self.index, self.keys, self.vals, self.k, self.exact = index, ds.keys, ds.vals, k, exact
        self.meta = {"upstream": {DATASTORE: ds.fingerprint, INDEX: im["fingerprint"]},
                     "settings": [k, "exact" if exact else "index"], "bytes": ds.bytes + im["bytes"],
                     "factory": im["factory"], "k": k}

    def scorer(self, temperatures):
        """``scorer(hidden (M, d), gold (M,)) -> log p_kNN(gold)`` (len(temperatures), M); components.knn."""
        from mlpmem.components.knn import knn_scorer

        return knn_scorer(self.index, self.keys, self.vals, self.k, temperatures, self.exact)

    def logprobs(self, hidden: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
        """The whole kNN distribution of (B, d) queries, log-probabilities (B, V) float32."""
        from mlpmem.components.knn import knn_logprobs

        return knn_logprobs(self.index, self.keys, self.vals, self.k, temperature, self.exact, hidden, vocab_size)


def open_knn(cfg, lm, hook) -> KnnSource | None:
    """kNN-LM over this run's datastore and index (k = --eval.knn_k or --knn.k); None if there is none yet.

    A datastore or index that does not exist yet only skips kNN-LM (with a warning); one built for another model,
    hook point or corpus, or an index over another datastore, is an error: its keys would not be comparable.
    """
    for key, stage in ((DATASTORE, "extract"), (INDEX, "index")):
        if not is_complete(cfg.run_dir / key):
            log.warning("kNN-LM skipped: no complete %s output in %s (run `mlpmem %s`)", stage,
                        cfg.run_dir / key, stage)
            return None
    ds = Datastore(cfg.run_dir, expect_model=lm.identity, expect_hook=str(hook), limit=cfg.knn.datastore_tokens)
    index, im = open_index(cfg.run_dir, cfg.index.nprobe)
    if index.ntotal != ds.n:
        raise StageError(f"the index in {cfg.run_dir / INDEX} holds {index.ntotal} keys but the datastore "
                         f"{ds.n}{' (--knn.datastore_tokens)' if ds.limit else ''}: rerun `mlpmem index --force`")
    k = cfg.eval.knn_k or cfg.knn.k
    if k > ds.n:
        raise StageError(f"--knn.k {k} is larger than the datastore ({ds.n} keys): lower --knn.k or --eval.knn_k")
    src = KnnSource(index, ds, im, k, cfg.knn.distances == "exact")
    src.meta["settings"] = [k, cfg.knn.distances, cfg.index.nprobe]
    return src


# ----------------------------------------------------------------------------- evaluation results


def load_eval_results(run_dir: Path, out_name: str) -> dict | None:
    """The results of a finished `eval`, checked against its manifest and upstream chain; None if there are none."""
    d = Path(run_dir) / out_name
    if not is_complete(d):
        return None
    m = verify_chain(run_dir, out_name, "eval")
    res = read_json(d / "results.json")
    if not isinstance(res, dict) or res.get("fingerprint") != m["fingerprint"]:
        raise StageError(f"{d / 'results.json'} does not belong to the eval manifest beside it (an interrupted "
                         "write?): rerun `mlpmem eval --force`")
    return res


def scores_path(eval_dir: Path, split: str, rank: int, world: int) -> Path:
    """Where process ``rank`` of ``world`` saves its share of a split's per-token gold log-probs."""
    return Path(eval_dir) / "scores" / f"{split}-{rank:05d}-of-{world:05d}.npz"


def save_scores(path: Path, sc, fp: str) -> None:
    """A :class:`Scored` share, tagged with the eval fingerprint it belongs to (a few numbers per token)."""
    from mlpmem.files import atomic_file

    arrays = {"lm": sc.lm, "meta": np.array(json.dumps({"fingerprint": fp, "seconds": sc.seconds,
                                                         "mem_T": sc.mem_T, "knn_T": sc.knn_T}))}
    if sc.mem is not None:
        arrays["mem"] = sc.mem
    if sc.knn is not None:
        arrays["knn"] = sc.knn
    if sc.lm_feats is not None and sc.mem_feats is not None:  # the adaptive gate's features (memory+gate)
        arrays["lm_feats"], arrays["mem_feats"] = sc.lm_feats, sc.mem_feats
    with atomic_file(path) as f:
        np.savez(f, **arrays)


def load_scores(path: Path, fp: str, strict: bool = False):
    """The :class:`Scored` saved at ``path`` if made with fingerprint ``fp``; else None (or an error if strict)."""
    from mlpmem.components.scoring import Scored

    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            if meta["fingerprint"] == fp:
                return Scored(lm=z["lm"], mem=z["mem"] if "mem" in z else None,
                              knn=z["knn"] if "knn" in z else None, seconds=meta["seconds"],
                              mem_T=meta.get("mem_T"), knn_T=meta.get("knn_T"),
                              lm_feats=z["lm_feats"] if "lm_feats" in z else None,
                              mem_feats=z["mem_feats"] if "mem_feats" in z else None)
            why = "were made by another configuration"
    except (OSError, KeyError, ValueError) as e:
        why = f"cannot be read ({e})"
    if strict:
        raise StageError(f"eval: the scores {path} {why}; rerun `mlpmem eval` with the same processes")
    return None


def load_eval_scores(run_dir: Path, out_name: str, split: str):
    """The per-token scores of a finished evaluation's split (all processes' shares joined), checked."""
    from mlpmem.components.scoring import Scored

    m = verify_chain(run_dir, out_name, "eval")
    world = int(m.get("processes", 1))
    d = Path(run_dir) / out_name
    return Scored.join([load_scores(scores_path(d, split, r, world), m["fingerprint"], strict=True)
                        for r in range(world)])


@dataclasses.dataclass(frozen=True)
class TunedSettings:
    """The mixing settings later stages use, as :func:`tuned_settings` resolves them.

    lam, mem_T: the memory's weight and softmax temperature (lam None only when the caller did not ask for the
    memory and eval did not tune it); knn_lam, knn_T: kNN-LM's, None when eval did not tune it; gate: the adaptive
    gate fitted for memory+gate (:class:`mlpmem.components.gate.Gate`), None when eval has none or kept the fixed
    λ; source: where lam came from (a flag, or the results file); systems: every system's setting as eval recorded
    it ({} without a finished evaluation); fingerprint: the evaluation's (record it as an upstream), or None."""

    lam: float | None
    mem_T: float
    knn_lam: float | None = None
    knn_T: float | None = None
    gate: "Gate | None" = None
    source: str = ""
    systems: dict = dataclasses.field(default_factory=dict)
    fingerprint: str | None = None


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def tuned_settings(run_dir: Path, out_name: str, lam: float | None = None, *, flag: str | None = None,
                   mem_T: float = 1.0, memory: bool = True) -> TunedSettings:
    """The settings every stage that mixes the memory (or kNN-LM) in uses, by ONE rule:

    a value the user set explicitly (``lam``, from ``flag``: --generate.lam, --joint.lam) wins; else the value a
    finished `mlpmem eval` in ``<run_dir>/<out_name>`` tuned on validation (read through its manifest and upstream
    chain: a stale evaluation is refused, never silently used); else a StageError saying to run `mlpmem eval` or
    set ``flag`` (the option that gives ``lam``; None where there is none). No number is made up: there is no
    default λ.

    The temperatures go with the tuned λ: the memory's is eval's tuned one, else ``mem_T`` (the configured
    --memory.temperature: a λ given without an evaluation is used at it). ``memory``: the caller mixes the memory
    in, so a memory λ is required; False (e.g. `qa`, which uses whatever eval tuned) requires only a finished
    evaluation."""
    from mlpmem.components.gate import Gate

    where = Path(run_dir) / out_name
    res = load_eval_results(run_dir, out_name)
    systems = dict((res or {}).get("settings") or {})
    mem, knn, gated = systems.get(sy.MEMORY) or {}, systems.get(sy.KNN) or {}, systems.get(sy.MEMORY_GATE) or {}
    tuned_lam = _finite(mem.get("lam"))
    if lam is not None:
        use, source = float(lam), flag or "given"
    elif tuned_lam is not None:
        use, source = tuned_lam, f"{where / 'results.json'} (tuned on validation)"
    elif memory or res is None:
        command = "mlpmem eval" + ("" if out_name == "eval" else f" --eval.out_name {out_name}")
        raise StageError(f"no tuned {'memory lambda' if memory else 'settings'} in {where}: run `{command}` first"
                         + (" (with memory among --eval.systems)" if memory else "")
                         + (f", or set {flag}" if flag else ""))
    else:
        use, source = None, f"{where / 'results.json'}"
    return TunedSettings(
        lam=use, mem_T=_finite(mem.get("T_mem")) or float(mem_T), knn_lam=_finite(knn.get("lam")),
        knn_T=_finite(knn.get("T")), gate=Gate.from_dict(gated["gate"]) if gated.get("gate") else None,
        source=source, systems=systems, fingerprint=res["fingerprint"] if res is not None else None)
