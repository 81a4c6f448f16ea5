"""The offline default model (SmolLM2-135M) and corpus (Wikipedia leads), on small slices.

Needs the cached assets (``mlpmem fetch-assets``; the set-up script does it). Marked slow.
"""

import json

import numpy as np
import pytest
import torch

from mlpmem.config import ModelConfig
from mlpmem.runtime import native_bf16

pytestmark = pytest.mark.slow

TEXT = "The Roman Empire was the state ruled by the Romans following Octavian's assumption of sole rule in 27 BC."


@pytest.fixture(scope="module")
def lm_fp32():
    from mlpmem.components.lm import load_lm

    return load_lm(ModelConfig(dtype="fp32", device="cpu"))


@pytest.fixture(scope="module")
def gguf():
    """The original GGUF, dequantised by transformers itself (~25 s): the reference for the cached copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlpmem.assets import default_gguf

    path = default_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_default_model_loads_from_cache():
    from mlpmem.assets import DEFAULT_MODEL_ID
    from mlpmem.components.lm import load_lm

    lm = load_lm(ModelConfig())  # the defaults: 'default' model, auto dtype, auto device
    ident = lm.identity
    assert ident["name"] == DEFAULT_MODEL_ID and ident["model_type"] == "llama"
    assert ident["hidden_size"] == 576 and ident["vocab_size"] == 49152
    assert 134e6 < ident["n_params"] < 136e6
    assert lm.model.config.num_hidden_layers == 30
    want = torch.bfloat16 if native_bf16() else torch.float32  # 'auto': bf16 only where it is native
    assert next(lm.model.parameters()).dtype == want
    assert not any(p.requires_grad for p in lm.model.parameters()) and not lm.model.training


def test_cached_copy_equals_the_gguf(lm_fp32, gguf):
    model, tok = gguf
    ids_cached = lm_fp32.tokenizer(TEXT, add_special_tokens=False).input_ids
    assert tok(TEXT, add_special_tokens=False).input_ids == ids_cached
    ids = torch.tensor([ids_cached])
    with torch.no_grad():
        a = lm_fp32.model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert a.shape == (1, len(ids_cached), 49152)
    assert torch.equal(a, b)


def test_default_model_perplexity_on_wikipedia(tmp_path, capsys):
    from mlpmem.cli import main

    run = tmp_path / "run"
    assert main(["prepare", "--out_dir", str(run), "--data.max_train_tokens", "1000",
                 "--data.max_eval_tokens", "2000"]) == 0
    m = json.loads((run / "data" / "manifest.json").read_text())
    assert m["complete"] and m["source"] == "default"
    n_test = m["counts"]["test"]["tokens"]
    assert 1500 <= n_test <= 2000 and m["counts"]["test"]["documents"] >= 5
    assert m["counts"]["train"]["tokens"] <= 1000
    assert m["separator"] == [0]  # SmolLM2's <|endoftext|>
    tokens = np.load(run / "data" / "test" / "tokens.npy")
    assert tokens.dtype == np.int32 and len(tokens) == n_test
    assert main(["eval", "--out_dir", str(run), "--eval.systems", "base", "--eval.splits", "test",
                 "--window.context", "512", "--window.stride", "256", "--window.batch_size", "4"]) == 0
    assert "| base |" in capsys.readouterr().out
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["dtype"] == ("bf16" if native_bf16() else "fp32") and res["splits"]["test"]["tokens"] == n_test - 1
    p = res["splits"]["test"]["systems"]["base"]["ppl"]
    assert 5.0 < p < 40.0, p
