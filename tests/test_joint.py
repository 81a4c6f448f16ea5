"""Mixing math (interpolate.py) and the joint LM inside Hugging Face generate/forward (joint.py)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from helpers import tiny_lm as tiny
from mlpmem.components.capture import capture, resolve_hook
from mlpmem.components.interpolate import memory_logprobs, mix3, mix_gold, mix_logprobs, perplexity
from mlpmem.components.joint import attach_memory, attached_memory, detach_memory

class StandInMemory(nn.Module):
    """Stand-in for MLPMemory: hidden (..., d) -> logits (..., V); strong weights so it changes the argmax."""

    def __init__(self, d=32, vocab=99, meta=None):
        super().__init__()
        torch.manual_seed(123)
        self.proj = nn.Linear(d, vocab)
        nn.init.normal_(self.proj.weight, std=1.0)
        self.config = SimpleNamespace(meta=dict(meta or {}))

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    m = tiny(request.param)
    yield m
    detach_memory(m)


def left_padded_batch():
    """3 prompts of lengths 5, 2, 4, left-padded with 0, and their attention mask."""
    g = torch.Generator().manual_seed(7)
    lens, width = [5, 2, 4], 5
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(1, 98, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def gen(model, ids, mask, **kw):
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kw}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kw)


# ---------------------------------------------------------------------------------------------------------------
# interpolate.py


def rand_logprobs(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 3, -1).to(dtype)


@pytest.mark.parametrize("lam", [0.0, 1e-4, 0.25, 0.5, 0.9, 1.0])
def test_mix_logprobs_equals_float64_formula(lam):
    lm, mem = rand_logprobs(4, 99, seed=1), rand_logprobs(4, 99, seed=2)
    ref = torch.log((1 - lam) * lm.double().exp() + lam * mem.double().exp())
    got = mix_logprobs(lm, mem, lam)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(mix_logprobs(lm.double(), mem.double(), lam), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(4), rtol=0, atol=1e-5)


def test_mix_logprobs_exact_ends_and_minus_inf():
    lm, mem = rand_logprobs(3, 99, seed=1), rand_logprobs(3, 99, seed=2)
    assert mix_logprobs(lm, mem, 0.0) is lm and mix_logprobs(lm, mem, 1.0) is mem
    lm[:, 0] = -math.inf
    mem[:, :2] = -math.inf
    out = mix_logprobs(lm, mem, 0.3)
    assert not out.isnan().any() and out[:, 0].eq(-math.inf).all() and out[:, 1].isfinite().all()
    with pytest.raises(ValueError, match="lam"):
        mix_logprobs(lm, mem, 1.5)


def test_memory_logprobs_temperature():
    z = torch.randn(2, 99)
    torch.testing.assert_close(memory_logprobs(z, 2.0), torch.log_softmax(z / 2, -1))
    with pytest.raises(ValueError):
        memory_logprobs(z, 0.0)


def test_mix_gold_float64_and_sweep():
    rng = np.random.default_rng(0)
    lm, other = np.log(rng.uniform(1e-6, 1, 50)), np.log(rng.uniform(1e-6, 1, 50))
    other[3] = -np.inf
    for lam in (0.0, 0.25, 1.0):
        got = mix_gold(lm, other, lam)
        assert got.dtype == np.float64 and not np.isnan(got).any()
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(got, np.log((1 - lam) * np.exp(lm) + lam * np.exp(other)), rtol=1e-12)
    np.testing.assert_array_equal(mix_gold(lm, other, 0.0), lm)
    np.testing.assert_array_equal(mix_gold(lm, other, 1.0), other)
    lams = np.array([0.0, 0.5, 1.0])
    sweep = mix_gold(lm, other, lams[:, None])
    assert sweep.shape == (3, 50)
    np.testing.assert_array_equal(sweep[0], lm)
    np.testing.assert_allclose(sweep[1], mix_gold(lm, other, 0.5), rtol=1e-15)


def test_mix3():
    lm, mem, knn = (rand_logprobs(2, 99, seed=s, dtype=torch.float64) for s in (1, 2, 3))
    ref = torch.log(0.5 * lm.exp() + 0.3 * mem.exp() + 0.2 * knn.exp())
    torch.testing.assert_close(mix3(lm, mem, knn, 0.3, 0.2), ref, rtol=0, atol=1e-12)
    assert torch.equal(mix3(lm, mem, knn, 0.25, 0.0), mix_logprobs(lm, mem, 0.25))
    assert torch.equal(mix3(lm, mem, knn, 0.0, 0.0), lm)
    np_out = mix3(lm.numpy(), mem.numpy(), knn.numpy(), 0.3, 0.2)
    np.testing.assert_allclose(np_out, ref.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="<= 1"):
        mix3(lm, mem, knn, 0.7, 0.6)


def test_perplexity():
    assert perplexity(np.full(10, -math.log(5.0))) == pytest.approx(5.0)
    assert perplexity(np.array([-1e6])) == math.inf
    assert math.isnan(perplexity(np.zeros(0)))


# ---------------------------------------------------------------------------------------------------------------
# joint.py


def test_lam0_is_bit_identical_generate_and_loss(model):
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    plain = gen(model, ids, mask)
    with torch.no_grad():
        plain_out = model(ids, attention_mask=mask, labels=labels)
    attach_memory(model, StandInMemory(), lam=0.0)
    joint = gen(model, ids, mask)
    with torch.no_grad():
        joint_out = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(joint, plain)
    assert torch.equal(joint_out.logits, plain_out.logits) and torch.equal(joint_out.loss, plain_out.loss)


def test_lam_half_forward_equals_hand_mix(model):
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    mem = StandInMemory()
    hp = resolve_hook(model)
    with torch.no_grad(), capture(model, hp) as cap:
        lm_logits = model(ids, attention_mask=mask).logits
        expected = mix_logprobs(torch.log_softmax(lm_logits, -1),
                                torch.log_softmax(mem(cap.value) / 2.0, -1), 0.5)
    handle = attach_memory(model, mem, lam=0.5, mem_temperature=2.0)
    assert attached_memory(model) is handle and handle.hook_point == hp
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        last2 = model(ids, attention_mask=mask, logits_to_keep=2).logits
        picked = model(ids, attention_mask=mask, logits_to_keep=torch.tensor([0, 3])).logits
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-5)
    nll = -expected[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(out.loss, nll[labels[:, 1:] != -100].mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last2, expected[:, -2:], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(picked, expected[:, [0, 3]], rtol=1e-6, atol=1e-5)
    handle.lam = 1.0  # the memory alone
    with torch.no_grad():
        alone = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(alone, torch.log_softmax(mem(cap.value) / 2.0, -1), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError):
        handle.lam = -0.1


def test_kv_cache_generate_equals_cache_free_recomputation(model):
    """Greedy generate (KV cache, logits_to_keep=1, left padding) = argmax of the full joint forward at each step:
    the memory sees the newest position's hidden state."""
    ids, mask = left_padded_batch()
    plain = gen(model, ids, mask)
    attach_memory(model, StandInMemory(), lam=0.5)
    cached = gen(model, ids, mask, use_cache=True)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(6):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(cached, seq)
    assert not torch.equal(cached, plain)  # the memory really changed the continuation


def test_beam_search_and_sampling(model):
    ids, mask = left_padded_batch()
    plain_beam = gen(model, ids, mask, num_beams=3)
    torch.manual_seed(5)
    plain_sample = gen(model, ids, mask, do_sample=True, top_k=20)
    handle = attach_memory(model, StandInMemory(), lam=0.0)
    assert torch.equal(gen(model, ids, mask, num_beams=3), plain_beam)
    torch.manual_seed(5)
    assert torch.equal(gen(model, ids, mask, do_sample=True, top_k=20), plain_sample)
    handle.lam = 0.5
    beam = gen(model, ids, mask, num_beams=3, num_return_sequences=2)
    assert beam.shape[0] == 6 and beam.max() < 99
    sample = gen(model, ids, mask, do_sample=True, temperature=0.8)
    assert sample.shape == (3, 11)


def test_detach_restores_the_model(model):
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    handle = attach_memory(model, StandInMemory(), lam=0.5)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_memory(model, StandInMemory())
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask).logits, before)
    handle.detach()
    handle.detach()  # idempotent
    assert attached_memory(model) is None and not detach_memory(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    attach_memory(model, StandInMemory(), lam=0.5)  # attachable again
    assert detach_memory(model)


def test_memory_for_another_model_or_hook_is_refused():
    gpt2 = tiny("gpt2")
    with pytest.raises(ValueError, match="another base model or hook point"):  # a Llama hook on GPT-2
        attach_memory(gpt2, StandInMemory(meta={"hook": "model.layers.1.post_attention_layernorm:output"}))
    with pytest.raises(ValueError, match="another base model or hook point"):  # trained on layer 0, attached at -1
        attach_memory(gpt2, StandInMemory(meta={"hook": "transformer.h.0.ln_2:output"}), hook="auto")
    with pytest.raises(ValueError, match="another base model"):
        attach_memory(gpt2, StandInMemory(meta={"vocab_size": 50257}))
    with pytest.raises(ValueError, match="inputs of size 64"):
        attach_memory(gpt2, StandInMemory(meta={"input_size": 64}))
    assert attached_memory(gpt2) is None
    # the meta hook is the default hook point
    h = attach_memory(gpt2, StandInMemory(meta={"hook": "transformer.h.0.ln_2:output", "vocab_size": 99,
                                                "input_size": 32}))
    assert str(h.hook_point) == "transformer.h.0.ln_2:output"
    h.detach()


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
def test_post_head_logit_transforms(family):
    """Softcapping / logit scaling applied after the head: the mixture must use the transformed LM logits, and the
    model must be restored on detach."""
    model = tiny(family)
    ids, mask = left_padded_batch()
    mem = StandInMemory()
    with torch.no_grad(), capture(model, resolve_hook(model)) as cap:
        lm_logits = model(ids, attention_mask=mask).logits
        expected = mix_logprobs(torch.log_softmax(lm_logits, -1), torch.log_softmax(mem(cap.value), -1), 0.5)
    plain = gen(model, ids, mask)
    handle = attach_memory(model, mem, lam=0.0)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, lm_logits)
    assert torch.equal(gen(model, ids, mask), plain)
    handle.lam = 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=1e-6, atol=1e-5)
    handle.detach()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, lm_logits)


def test_bf16_model_with_fp32_memory_and_input_hook():
    """A bf16 LM with a float32 memory: hidden states are cast up, the mixture is float32; an explicit ':input'
    hook on the FFN sees the same tensor as the auto hook (the pre-FFN norm's output)."""
    model = tiny("llama").to(torch.bfloat16)
    ids, mask = left_padded_batch()
    mem = StandInMemory()
    with torch.no_grad():
        auto = attach_memory(model, mem, lam=0.5)
        a = model(ids, attention_mask=mask).logits
        auto.detach()
        attach_memory(model, mem, lam=0.5, hook="model.layers.1.mlp:input")
        b = model(ids, attention_mask=mask).logits
        out = gen(model, ids, mask)
    detach_memory(model)
    assert a.dtype == torch.float32 and mem.proj.weight.dtype == torch.float32
    assert torch.equal(a, b) and out.shape == (3, 11)
