"""Tiny in-process models, tokenizers and corpora for tests (no network, seconds to build)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the of and to in is was for on as with by at from his her that which were are this be it an or had "
         "city river king music science war history language people art water light energy planet animal").split()


def make_texts(n_docs: int = 60, seed: int = 0, words_per_doc: tuple[int, int] = (20, 60)) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        n = rng.randint(*words_per_doc)
        docs.append(f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(n)) + ".")
    return docs


def make_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on the texts, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_model(family: str, vocab_size: int, seed: int = 0, n_positions: int = 512):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=n_positions,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_positions,
                          bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_lm(family: str):
    """A 2-layer random LM with vocabulary 99 (no tokenizer) of the family: gpt2, llama, gemma2 (logit soft cap
    3), granite (logits scaled by 1/4) or cohere (logits scaled by 0.5); the last three scale their logits in
    forward, which the joint LM and the evaluator must handle."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config,
                              GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, bos_token_id=98, eos_token_id=98)
        return GPT2LMHeadModel(cfg).eval()
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=3.0)).eval()
    if family == "granite":
        return GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=4.0)).eval()
    if family == "cohere":
        return CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.5)).eval()
    raise ValueError(family)


def make_model_dir(path: Path, family: str = "llama", seed: int = 0, texts: list[str] | None = None) -> Path:
    """Save a tiny random model + tokenizer to ``path`` (loadable with --model.name path)."""
    texts = texts or make_texts()
    tok = make_tokenizer(texts)
    model = make_model(family, len(tok), seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_corpus(path: Path, texts: list[str] | None = None, fmt: str = "txt") -> Path:
    texts = texts or make_texts()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
    return path


def tiny_config(tmp: Path, family: str = "llama", **overrides):
    """A Config for a whole tiny run in ``tmp`` (model dir + corpus made if absent)."""
    from mlpmem.config import load_config

    model_dir = tmp / f"model-{family}"
    if not (model_dir / "config.json").exists():
        make_model_dir(model_dir, family)
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus, make_texts(80))
    base = {
        "out_dir": str(tmp / "run"), "model.name": str(model_dir), "model.dtype": "fp32",
        "data.source": str(corpus), "data.validation_fraction": 0.15, "data.test_fraction": 0.15,
        "window.context": 64, "window.stride": 32, "window.batch_size": 4,
        "index.factory": "Flat", "knn.k": 16, "knn.store_ids": 8, "knn.query_batch": 256,
        "memory.num_blocks": 1, "train.batch_size": 64, "train.epochs": 1, "train.warmup_steps": 2,
        "train.eval_every": 5, "train.save_every": 5, "train.val_positions": 200, "train.bf16": False,
        "eval.knn_temperatures": [1.0, 4.0], "generate.max_new_tokens": 4,
    }
    base.update(overrides)
    return load_config(None, base)


def metrics_untimed(path: Path) -> list[dict]:
    """A metrics.jsonl without its timings (tokens_per_s), to compare a resumed run's with an uninterrupted one's."""
    return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in path.read_text().splitlines()]


def spy_resumes(monkeypatch, module) -> list[int]:
    """The steps ``module._load_last`` (trainer or finetune) resumes from, in order."""
    resumed, load_last = [], module._load_last

    def spy(*a, **k):
        st = load_last(*a, **k)
        resumed.append(int(st["step"]))
        return st

    monkeypatch.setattr(module, "_load_last", spy)
    return resumed
