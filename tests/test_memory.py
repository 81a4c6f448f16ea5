"""The memory network: families, parameter counts, init from the LM, save/load."""

import json
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mlpmem.components.memory import MLPMemory, MLPMemoryConfig, init_head_from_lm, memory_config_for, memory_logprobs

logging.getLogger("transformers").setLevel(logging.ERROR)



def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def test_gpt2_family_shape_and_count() -> None:
    c = memory_config_for(gpt2_config())
    assert (c.family, c.input_size, c.hidden_size, c.intermediate_size, c.num_blocks) == ("gpt2", 32, 32, 128, 3)
    assert c.vocab_size == 99 and c.norm_eps == 1e-5 and c.meta["base_model_type"] == "gpt2"
    m = MLPMemory(c)
    d, i, v = 32, 128, 99
    block = 2 * d + (d * i + i) + (i * d + d)  # LayerNorm, fc1, fc2 (with biases)
    assert m.in_proj is None
    assert m.num_parameters() == 3 * block + 2 * d + d * v


def test_llama_family_shape_and_count() -> None:
    c = memory_config_for(llama_config())
    assert (c.family, c.input_size, c.hidden_size, c.intermediate_size, c.num_blocks) == ("llama", 32, 32, 64, 3)
    assert c.norm_eps == llama_config().rms_norm_eps
    m = MLPMemory(c)
    d, i, v = 32, 64, 99
    block = d + 3 * d * i  # RMSNorm, gate, up, down (no biases)
    assert m.num_parameters() == 3 * block + d + d * v
    assert all(p.dim() != 1 or "norm" in n for n, p in m.named_parameters())  # no biases anywhere


def test_overrides_and_input_projection() -> None:
    c = memory_config_for(llama_config(), num_blocks=5, hidden_size=48, intermediate_size=80, meta={"hook": "x"})
    assert (c.input_size, c.hidden_size, c.intermediate_size, c.num_blocks) == (32, 48, 80, 5)
    assert c.meta["hook"] == "x"
    m = MLPMemory(c)
    assert m.in_proj is not None and m.in_proj.weight.shape == (48, 32)
    y = m(torch.randn(2, 3, 32, dtype=torch.float16))  # any leading dims, any float dtype
    assert y.shape == (2, 3, 99) and y.dtype == torch.float32
    g = memory_config_for(gpt2_config(), hidden_size=16)
    assert g.intermediate_size == 64  # GPT-2 keeps 4 x the memory width


def test_unknown_family_is_rejected() -> None:
    from transformers import BertConfig

    with pytest.raises(ValueError, match="bert"):
        memory_config_for(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64))
    with pytest.raises(ValueError, match="family"):
        MLPMemoryConfig(family="bert", input_size=4, hidden_size=4, intermediate_size=4, num_blocks=1, vocab_size=4)


def test_init_scaling() -> None:
    torch.manual_seed(0)
    c = memory_config_for(gpt2_config(), num_blocks=8)
    m = MLPMemory(c)
    assert m.blocks[0].fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.blocks[0].fc2.weight.std().item() == pytest.approx(0.02 / 4.0, rel=0.1)  # 1/sqrt(2*8)
    assert torch.all(m.blocks[0].fc1.bias == 0) and torch.all(m.norm.weight == 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_init_head_from_lm(family: str) -> None:
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(gpt2_config()) if family == "gpt2" else LlamaForCausalLM(llama_config())
    with torch.no_grad():  # make the LM's final norm non-trivial so the copy is observable
        norm = lm.base_model.ln_f if family == "gpt2" else lm.base_model.norm
        norm.weight.uniform_(0.5, 1.5)
        if family == "gpt2":
            norm.bias.uniform_(-0.1, 0.1)
    m = MLPMemory(memory_config_for(lm.config))
    assert not torch.equal(m.head.weight, lm.get_output_embeddings().weight)
    init_head_from_lm(m, lm)
    assert torch.equal(m.head.weight, lm.get_output_embeddings().weight)
    assert m.head.weight.data_ptr() != lm.get_output_embeddings().weight.data_ptr()  # a copy, not tied
    assert torch.equal(m.norm.weight, norm.weight)
    if family == "gpt2":
        assert torch.equal(m.norm.bias, norm.bias)
    # with the memory blocks zeroed the memory reads a hidden state exactly like the LM's last norm + head
    with torch.no_grad():
        for b in m.blocks:
            b.residual_proj().weight.zero_()
            if b.residual_proj().bias is not None:
                b.residual_proj().bias.zero_()
    h = torch.randn(5, 32)
    torch.testing.assert_close(m.eval()(h), lm.get_output_embeddings()(norm(h)))


def test_init_head_rejects_width_mismatch() -> None:
    lm = LlamaForCausalLM(llama_config())
    m = MLPMemory(memory_config_for(lm.config, hidden_size=48))
    with pytest.raises(ValueError, match="head shape"):
        init_head_from_lm(m, lm)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_load_round_trip(tmp_path, family: str) -> None:
    torch.manual_seed(0)
    lmc = gpt2_config() if family == "gpt2" else llama_config()
    m = MLPMemory(memory_config_for(lmc, hidden_size=40, meta={"tokenizer_sha256": "abc"})).eval()
    with torch.no_grad():
        for p in m.parameters():  # move every tensor off its init value, so the test sees them all
            p.add_(torch.randn_like(p) * 0.01)
    m.save_pretrained(tmp_path / "mem")
    m.save_pretrained(tmp_path / "mem")  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]  # no temp directories left behind
    cfg = json.loads((tmp_path / "mem" / "config.json").read_text())
    assert cfg["architecture"] == "MLPMemory" and cfg["format_version"] == 1
    assert cfg["meta"]["tokenizer_sha256"] == "abc"
    r = MLPMemory.from_pretrained(tmp_path / "mem")
    assert r.config == m.config and not r.training
    x = torch.randn(7, 32)
    assert torch.equal(r(x), m(x))
    r16 = MLPMemory.from_pretrained(tmp_path / "mem", dtype=torch.bfloat16)
    assert r16.head.weight.dtype == torch.bfloat16


def test_incomplete_or_mismatched_checkpoint(tmp_path) -> None:
    m = MLPMemory(memory_config_for(llama_config()))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MLPMemory.from_pretrained(tmp_path / "nowhere")
    m.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: missing model\.safetensors"):
        MLPMemory.from_pretrained(tmp_path / "a")
    m.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["intermediate_size"] = 65
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its config.json.*gate.weight"):
        MLPMemory.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="unreadable"):
        MLPMemory.from_pretrained(tmp_path / "b")


def test_memory_logprobs() -> None:
    m = MLPMemory(memory_config_for(gpt2_config())).eval()
    h = torch.randn(3, 32)
    lp = memory_logprobs(m, h.half(), temperature=2.0)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(lp, torch.log_softmax(m(h.half().float()) / 2.0, -1))
    with pytest.raises(ValueError, match="temperature"):
        memory_logprobs(m, h, temperature=0.0)
