"""Hook points: resolution on GPT-2 / Llama / Gemma 2, clear errors, capture alignment and early stopping."""

import pytest
import torch

from helpers import tiny_lm as tiny
from mlpmem.components.capture import HookPoint, capture, decoder_layers, forward_hidden, hook_width, resolve_hook


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return tiny(request.param)


def ids(b=2, t=7, seed=1):
    return torch.randint(0, 99, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,expected", [
    ("gpt2", "transformer.h.1.ln_2:output"),
    ("llama", "model.layers.1.post_attention_layernorm:output"),
    # Gemma 2's post_attention_layernorm normalises the attention output; the FFN's input norm is pre_feedforward
    ("gemma2", "model.layers.1.pre_feedforward_layernorm:output"),
])
def test_auto_hook_is_pre_ffn_norm_of_last_layer(family, expected):
    m = tiny(family)
    hp = resolve_hook(m)
    assert str(hp) == expected
    assert resolve_hook(m, "auto", layer=1) == hp
    assert resolve_hook(m, "auto", layer=0).module == expected.split(":")[0].replace(".1.", ".0.")
    assert hook_width(m, hp) == 32


def test_decoder_layers_found(model):
    path, layers = decoder_layers(model)
    assert path in ("transformer.h", "model.layers") and len(layers) == 2


def test_explicit_names_and_parsing():
    m = tiny("llama")
    assert resolve_hook(m, "model.layers.0.mlp:input") == HookPoint("model.layers.0.mlp", "input")
    assert resolve_hook(m, "model.layers.0.mlp") == HookPoint("model.layers.0.mlp", "output")
    assert str(HookPoint.parse("a.b:input")) == "a.b:input"
    assert hook_width(m, HookPoint("model.layers.0.mlp", "input")) == 32
    assert hook_width(m, HookPoint("model.layers.0.mlp.down_proj", "input")) == 64


def test_bad_names_give_clear_errors():
    m = tiny("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp.*--extract\.hook"):
        resolve_hook(m, "model.layers.1.mlpp:input")
    with pytest.raises(ValueError, match="hook kind"):
        resolve_hook(m, "model.layers.1.mlp:outptu")
    with pytest.raises(ValueError, match="--extract.layer"):
        resolve_hook(m, "auto", layer=2)
    with pytest.raises(ValueError, match="--extract.hook"):  # a Llama name on GPT-2
        resolve_hook(tiny("gpt2"), "model.layers.1.post_attention_layernorm")


def test_capture_input_equals_norm_output_and_hooks_are_removed(model):
    hp = resolve_hook(model)
    layer = hp.module.rpartition(".")[0]
    x = ids()
    with torch.no_grad(), capture(model, hp) as out, capture(model, HookPoint(layer + ".mlp", "input")) as inp:
        model(x)
    assert out.value.shape == (2, 7, 32)
    torch.testing.assert_close(inp.value, out.value, rtol=0, atol=0)
    with pytest.raises(RuntimeError), capture(model, hp):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_forward_hidden_equals_full_forward_and_skips_the_rest(model):
    x = ids()
    mask = torch.ones_like(x)
    for layer in (-1, 0):
        hp = resolve_hook(model, "auto", layer=layer)
        with torch.no_grad(), capture(model, hp) as cap:
            model(x, attention_mask=mask)
        started = []
        watched = {"head": model.get_output_embeddings(), "layer1": decoder_layers(model)[1][1]}
        handles = [m.register_forward_pre_hook(lambda *a, n=n: started.append(n)) for n, m in watched.items()]
        with torch.no_grad():
            h = forward_hidden(model, hp, x, mask)
        for hd in handles:
            hd.remove()
        torch.testing.assert_close(h, cap.value, rtol=0, atol=0)
        # the head never runs; with the hook in layer 0, layer 1 never starts
        assert started == ([] if layer == 0 else ["layer1"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_is_causal_and_aligned(model):
    """The hidden state at position t equals the last one of a direct forward of tokens[:t+1]."""
    hp = resolve_hook(model)
    x = ids(b=1, t=6)
    with torch.no_grad():
        full = forward_hidden(model, hp, x)
        for t in range(x.shape[1]):
            prefix = forward_hidden(model, hp, x[:, : t + 1])
            torch.testing.assert_close(full[:, t], prefix[:, -1], rtol=1e-5, atol=1e-5)


def test_left_padding_with_positions_matches_unpadded(model):
    hp = resolve_hook(model)
    x = ids(b=1, t=5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = forward_hidden(model, hp, x)
        got = forward_hidden(model, hp, padded, mask, position_ids=pos)
    torch.testing.assert_close(got[:, 3:], ref, rtol=1e-5, atol=1e-5)
