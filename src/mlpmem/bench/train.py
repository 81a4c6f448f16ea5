"""Training part of `mlpmem bench`: sparse vs dense-target loss, speed and peak memory, side by side.

Peak memory on CPU is read from ru_maxrss, a high-water mark that cannot be reset, so each probe runs in a fresh
forked child of a helper process; on CUDA the peak-memory counter is reset in-process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import torch

from mlpmem.config import Config
from mlpmem.runtime import peak_rss_bytes, sync

log = logging.getLogger(__name__)

# the losses compared, in the report's order: the trainer's (chunked custom backward), the same loss through plain
# autograd (what the trainer used before), dense targets built by one scatter, and dense targets built per row
LOSSES = ("sparse", "sparse-autograd", "dense", "dense-loop")


def dense_loop_memory_loss(logits, tgt_ids, tgt_probs, labels, alpha):
    """Dense targets rebuilt row by row in a Python loop, as earlier implementations did (one vocabulary-size
    vector per position, stacked into (N, V) float32), then the same KL + CE as ``losses.dense_memory_loss``."""
    from mlpmem.components.losses import dense_target_loss

    n, v = logits.shape
    rows = []
    for i in range(n):
        row = torch.zeros(v, dtype=torch.float32, device=logits.device)
        keep = tgt_ids[i] >= 0
        row.index_add_(0, tgt_ids[i][keep].long(), tgt_probs[i][keep].float())
        rows.append(row)
    return dense_target_loss(logits, torch.stack(rows), labels, alpha)


def loss_fns() -> dict:
    from mlpmem.components.losses import dense_memory_loss, memory_loss, memory_loss_autograd

    return {"sparse": memory_loss, "sparse-autograd": memory_loss_autograd, "dense": dense_memory_loss,
            "dense-loop": dense_loop_memory_loss}


def _fake_targets(n: int, K: int, V: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Sparse targets shaped like real ones: K distinct ids per row (last quarter padded with -1), probabilities
    sorted descending and summing to 1, plus gold labels."""
    step = max(1, V // K)
    ids = (torch.randint(0, V, (n, 1), generator=gen) + torch.arange(K) * step) % V
    probs = torch.rand(n, K, generator=gen).pow(4).sort(1, descending=True).values
    pad = torch.arange(K) >= max(1, (3 * K) // 4)
    ids, probs = ids.masked_fill(pad, -1), probs.masked_fill(pad, 0.0)
    return ids, probs / probs.sum(1, keepdim=True), torch.randint(0, V, (n,), generator=gen)


def _random_logits(n: int, V: int, gen: torch.Generator, dev, dtype) -> torch.Tensor:
    """(n, V) standard normal logits in ``dtype``, drawn 64 rows at a time: a float32 (n, V) temporary would set
    the process' memory high-water mark above what a frugal loss needs, hiding its peak from ru_maxrss."""
    out = torch.empty(n, V, dtype=dtype, device=dev)
    for i in range(0, n, 64):
        out[i:i + 64] = torch.randn(min(64, n - i), V, generator=gen).to(dev, dtype)
    return out


def _train_setup(spec: dict):
    """(step(loss_fn), device): a memory in training mode, AdamW (fused where supported, as the trainer) with its
    state and the gradients already allocated, and one fixed batch of random inputs and sparse targets."""
    from mlpmem.components.memory import MLPMemory, MLPMemoryConfig

    dev = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    memory = MLPMemory(MLPMemoryConfig.from_dict(spec["memory_config"])).to(dev).train()
    gen = torch.Generator().manual_seed(spec["seed"])
    n, V = spec["batch"], memory.config.vocab_size
    x = torch.randn(n, memory.config.input_size, generator=gen).to(dev)
    ids, probs, labels = (t.to(dev) for t in _fake_targets(n, spec["K"], V, gen))
    try:
        opt = torch.optim.AdamW(memory.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(memory.parameters(), lr=1e-4)
    for p in memory.parameters():  # resident state first: zero grads make AdamW allocate its moments
        p.grad = torch.zeros_like(p)
    opt.step()

    def step(loss_fn) -> None:
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: they are resident state, not step memory
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=spec["bf16"]):
            logits = memory(x)
        loss_fn(logits, ids, probs, labels, spec["alpha"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(memory.parameters(), 1.0)
        opt.step()

    return step, dev


def train_probe(spec: dict) -> dict:
    """Peak memory of the loss ``spec['loss']`` (one of LOSSES) on (batch, V) logits, forward and then
    forward + backward (``spec['what'] == 'loss'``), or of one whole training step above the resident
    parameters + gradients + AdamW state (``'step'``: activations, logits, loss intermediates, their gradients).

    On CPU it is the rise of ru_maxrss, a high-water mark that cannot be reset, so call this in a fresh (forked)
    process; on CUDA the rise of torch.cuda.max_memory_allocated over the allocated baseline.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    loss_fn = loss_fns()[spec["loss"]]
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"

    def peak() -> int:
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes()

    if spec["what"] == "step":
        step, _ = _train_setup(spec)
    else:
        gen = torch.Generator().manual_seed(spec["seed"])
        n, V = spec["batch"], spec["memory_config"]["vocab_size"]
        logits = _random_logits(n, V, gen, dev, torch.bfloat16 if spec["bf16"] else torch.float32)
        ids, probs, labels = (t.to(dev) for t in _fake_targets(n, spec["K"], V, gen))
        logits.requires_grad_(True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else peak()
    out = {"memory_measure": "cuda max_memory_allocated" if cuda else "ru_maxrss"}
    if spec["what"] == "step":
        step(loss_fn)  # one step: every step allocates the same (autocast weight casts are dropped after each)
        out["step_peak_bytes"] = peak() - base
    else:
        loss = loss_fn(logits, ids, probs, labels, spec["alpha"]).loss
        out["loss_forward_peak_bytes"] = peak() - base
        loss.backward()
        out["loss_peak_bytes"] = peak() - base
    return out


# The probes run in one helper process that pays torch's imports (and the lazy torch._dynamo import of
# torch.optim) once, then forks a fresh child per probe: each child's ru_maxrss starts at the helper's small RSS.
_PROBE_SERVER = r"""
import json, os, sys, traceback
import torch
from mlpmem.bench.train import train_probe
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports only; no parallel region runs before fork
for spec in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.write(w, json.dumps(train_probe(spec)).encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    if os.waitpid(pid, 0)[1] != 0:
        sys.exit("probe with the %s loss failed" % spec["loss"])
    print("@@" + json.dumps({**json.loads(data), "loss": spec["loss"], "what": spec["what"]}), flush=True)
"""


def run_probes(specs: list[dict]) -> list[dict]:
    """train_probe for each spec: in forked children of a helper process on CPU (ru_maxrss is a high-water mark
    that cannot be reset), in this process on CUDA (its peak-memory counter can be reset)."""
    if all(s["device"].startswith("cuda") for s in specs):
        return [{**train_probe(s), "loss": s["loss"], "what": s["what"]} for s in specs]
    r = subprocess.run([sys.executable, "-c", _PROBE_SERVER, json.dumps(specs)], capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("@@")]
    if r.returncode != 0 or len(lines) != len(specs):
        raise RuntimeError(f"bench: training probes failed: {r.stderr.strip()[-2000:]}")
    return [json.loads(ln[2:]) for ln in lines]


def _interleaved(fns: dict, steps: int, device) -> dict[str, list[float]]:
    """Seconds of each call of each fn, calls interleaved a, b, a, b, ... after one untimed call of each."""
    secs: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            secs[name].append(time.perf_counter() - t0)
    return secs


def bench_training(cfg: Config, memory, device) -> dict:
    """The LOSSES on the same memory, batch and optimizer: tokens/s of whole training steps and of the loss alone
    (steps interleaved sparse, sparse-autograd, dense, ..., sparse, ...; the fastest step of each counts), and
    each step's peak memory (probes)."""
    mc = memory.config.to_dict()
    mc["dropout"] = cfg.memory.dropout
    n, K, V = cfg.train.batch_size, cfg.knn.store_ids or min(cfg.knn.k, 256), memory.config.vocab_size  # CSR rows: ~200 distinct ids at k = 1024
    spec = {"memory_config": mc, "batch": n, "K": K, "bf16": cfg.train.bf16, "alpha": cfg.train.alpha,
            "seed": cfg.seed, "device": str(device), "threads": torch.get_num_threads()}
    losses = loss_fns()
    out = {"batch": n, "K": K, "steps": cfg.bench.train_steps, "bf16": cfg.train.bf16, "losses": list(LOSSES),
           "memory": f"memory-{memory.config.num_blocks}b", "memory_params": memory.num_parameters()}
    probes = run_probes([{**spec, "loss": name, "what": what} for what in ("step", "loss") for name in losses])
    for name in losses:
        out[name] = {k: v for p in probes if p["loss"] == name for k, v in p.items() if k not in ("loss", "what")}
    step, _ = _train_setup(spec)
    per_step = _interleaved({k: (lambda f=f: step(f)) for k, f in losses.items()}, cfg.bench.train_steps, device)
    gen = torch.Generator().manual_seed(0)
    logits = _random_logits(n, V, gen, device, torch.bfloat16 if cfg.train.bf16 else torch.float32)
    logits.requires_grad_(True)
    ids, probs, labels = (t.to(device) for t in _fake_targets(n, K, V, gen))

    def loss_call(f) -> None:
        logits.grad = None
        f(logits, ids, probs, labels, cfg.train.alpha).loss.backward()

    per_loss = _interleaved({k: (lambda f=f: loss_call(f)) for k, f in losses.items()}, cfg.bench.train_steps,
                            device)
    for name in losses:  # the fastest call: the one least disturbed by other work on the machine
        out[name].update(tokens_per_s=n / min(per_step[name]), step_s=[round(t, 4) for t in per_step[name]],
                         loss_only_tokens_per_s=n / min(per_loss[name]))
        log.info("bench: training with the %s loss: %.0f tok/s (loss alone %.0f), step peak %.0f MiB", name,
                 out[name]["tokens_per_s"], out[name]["loss_only_tokens_per_s"], out[name]["step_peak_bytes"] / 2**20)
    # the trainer's sparse loss against each other loss: > 1 means the sparse loss is faster / needs less memory
    sp = out["sparse"]
    out["vs"] = {name: {"step_speedup": sp["tokens_per_s"] / out[name]["tokens_per_s"],
                        "loss_only_speedup": sp["loss_only_tokens_per_s"] / out[name]["loss_only_tokens_per_s"],
                        "step_ram_ratio": out[name]["step_peak_bytes"] / max(1, sp["step_peak_bytes"]),
                        "loss_ram_ratio": out[name]["loss_peak_bytes"] / max(1, sp["loss_peak_bytes"]),
                        "loss_forward_ram_ratio": out[name]["loss_forward_peak_bytes"]
                        / max(1, sp["loss_forward_peak_bytes"])}
                 for name in LOSSES[1:]}
    return out
