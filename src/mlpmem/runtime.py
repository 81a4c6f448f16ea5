"""Process-level set-up: rank/world, device, seeding, threads, logging, progress bars (rank 0 only)."""

from __future__ import annotations

import functools
import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> Dist:
    """Rank and world size from torchrun's environment (single process when absent)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed() -> Dist:
    """Initialise torch.distributed under torchrun (nccl on GPU, gloo on CPU); a no-op for one process."""
    d = dist_info()
    if d.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(d.local_rank)
        torch.distributed.init_process_group(backend)
        import atexit

        atexit.register(_shutdown_distributed)
    return d


def _shutdown_distributed() -> None:
    """Leave together: a rank that exits while another still talks to it can abort in the backend's threads."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        except Exception:  # another rank died first: nothing left to coordinate
            pass


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if _dist_on():
        torch.distributed.barrier()


def on_main(fn, *args):
    """``fn(*args)`` on rank 0 while the other ranks wait (they get {}): for stages one process does whole."""
    if not dist_info().is_main:
        barrier()
        return {}
    try:
        return fn(*args)
    finally:
        barrier()


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (a picklable object; the value itself for one process)."""
    if not _dist_on():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def fault_point(name: str) -> None:
    """Fault injection for tests: SIGKILL this process at the named point when MLPMEM_FAULT names it.

    ``MLPMEM_FAULT=name`` kills at the first pass, ``name@N`` at the N-th. A real signal: no ``finally``, no
    ``atexit``, no flush runs, as when a machine dies or the OOM killer strikes.
    """
    spec = os.environ.get("MLPMEM_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition("@")
    if want != name:
        return
    count = _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if count == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_fault_counts: dict[str, int] = {}


def native_bf16(device: str = "auto") -> bool:
    """Whether ``device`` ('auto', 'cpu', 'cuda', 'cuda:N') computes bf16 in hardware: a CUDA GPU that supports it,
    or a CPU with AVX512-BF16 / AMX (oneDNN's own check). Elsewhere torch emulates bf16, and on an AVX2 CPU a bf16
    matmul runs some 60x slower than fp32: bf16 is then the wrong default however much memory it saves."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume emulation
        return False


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """A concrete weights dtype: 'auto' is bf16 where ``device`` computes it natively, else fp32."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int | None) -> None:
    """torch and faiss CPU threads: ``n``; None: OMP_NUM_THREADS if set (torchrun sets it per process), else every
    core this process may run on."""
    if not n and os.environ.get("OMP_NUM_THREADS"):
        return  # the libraries read it themselves
    if not n:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def setup_logging(verbose: bool = False) -> None:
    """mlpmem's own INFO lines on rank 0; every other library at WARNING (faiss' loader, for one, logs its failed
    AVX512 import at INFO, which reads like an error). ``verbose``: everything at DEBUG."""
    d = dist_info()
    fmt = "%(asctime)s %(levelname).1s %(name)s" + (f" [rank {d.rank}]" if d.world_size > 1 else "") + ": %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=fmt, datefmt="%H:%M:%S",
                        force=True)
    own = logging.DEBUG if verbose else (logging.INFO if d.is_main else logging.WARNING)
    logging.getLogger("mlpmem").setLevel(own)


def progress_enabled(show: bool = True) -> bool:
    """Whether this process draws progress bars: rank 0 only, never with MLPMEM_NO_PROGRESS set or ``show`` off."""
    return show and dist_info().is_main and not os.environ.get("MLPMEM_NO_PROGRESS")


def progress(iterable=None, show: bool = True, label: str | None = None, **kw):
    """tqdm on rank 0 (disabled elsewhere, when ``show`` is False and when MLPMEM_NO_PROGRESS is set).

    ``label`` tells bars with the same ``desc`` apart (the split, a variant): "extract shard 0 (validation)". The bar
    shows its own rate (tok/s for ``unit="tok"``), so a postfix restating it (``tok_s=...``) is dropped."""
    if label:
        kw["desc"] = f"{kw['desc']} ({label})" if kw.get("desc") else label
    return _bar_class()(iterable, disable=not progress_enabled(show), dynamic_ncols=True, mininterval=2.0, **kw)


@functools.cache
def _bar_class():
    from tqdm.auto import tqdm  # imported on first use: ``import mlpmem`` stays light

    class Bar(tqdm):
        """tqdm whose postfix leaves out a rate the bar already shows: ``tok_s`` on a bar counting "tok"."""

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            unit = getattr(self, "unit", "it")  # a disabled bar has none
            own = {f"{unit}_s", f"{unit}s_s"}
            kwargs = {k: v for k, v in kwargs.items() if k not in own}
            if ordered_dict is not None:
                ordered_dict = {k: v for k, v in dict(ordered_dict).items() if k not in own}
            return super().set_postfix(ordered_dict, refresh, **kwargs)

    return Bar


@contextmanager
def library_progress(show: bool = True) -> Iterator[None]:
    """transformers' and huggingface_hub's own bars ("Loading weights", downloads) follow mlpmem's setting
    (:func:`progress_enabled`) inside the block: off on ranks > 0 and under MLPMEM_NO_PROGRESS, the caller's own
    choice restored after. Where mlpmem draws bars, the libraries' settings are left as the user made them."""
    if progress_enabled(show):
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    was_on, hub_was_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' switch; it turns huggingface_hub's off too
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()  # turns huggingface_hub's on as well ...
            if hub_was_off:
                disable_progress_bars()  # ... which the caller had off


# ----------------------------------------------------------------------------- measurement helpers (bench)

def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What a benchmark number was measured on: CPU model, cores, threads, library versions, GPU name."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # > cpu_count: others share the CPU, timings noisy
    except OSError:
        pass
    return info
