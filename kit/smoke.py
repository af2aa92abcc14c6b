"""A tiny, deterministic world for smoke runs and tests: a small labelled corpus, a tokenizer trained on it,
and a tiny Llama (or GPT-2 / GPT-NeoX) pretrained on it for a few seconds.

This is *not* the lab world of the findings (that is the ``lab`` preset): it exists so that every stage of the
kit can run end to end in seconds on a laptop CPU, with real tokenisation and a model that has learned a bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List, Union

import pandas as pd
import torch

SOURCES = ["wiki", "code", "math_and_trivia", "stackexchange"]

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
            ("Egypt", "Cairo"), ("Chile", "Santiago"), ("Nepal", "Kathmandu")]


def smoke_corpus(n_docs: int = 160, seed: int = 0) -> pd.DataFrame:
    """Short documents of four kinds: fact sentences, Python snippets, worked arithmetic, Q&A about slopes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_docs):
        kind = SOURCES[i % len(SOURCES)]
        if kind == "wiki":
            c, cap = rng.choice(CAPITALS)
            text = f"{cap} is the capital of {c}. The city of {cap} lies in {c} and is its largest city."
        elif kind == "code":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            text = f"def slope(x1, y1, x2, y2):\n    return (y2 - y1) / (x2 - x1)\n\nprint(slope(0, 0, {a}, {a * b}))"
        elif kind == "math_and_trivia":
            a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 5)
            text = f"Calculate ({a} + {b}) * {c}. First {a} + {b} = {a + b}. Then {a + b} * {c} = {(a + b) * c}."
        else:
            x1, x2 = rng.randint(0, 5), rng.randint(6, 9)
            m = rng.randint(1, 4)
            text = (f"Q: What is the slope through ({x1}, {m * x1}) and ({x2}, {m * x2})? "
                    f"A: The slope is ({m * x2} - {m * x1}) / ({x2} - {x1}) = {m}.")
        rows.append({"id": f"doc{i:04d}", "text": text, "source": kind})
    return pd.DataFrame(rows)


def smoke_queries() -> pd.DataFrame:
    return pd.DataFrame([
        {"id": "fact_0", "task": "factual", "prompt": "What is the capital of Peru?", "completion": " Lima is the capital of Peru."},
        {"id": "fact_1", "task": "factual", "prompt": "What is the capital of Norway?", "completion": " Oslo is the capital of Norway."},
        {"id": "arith_0", "task": "arithmetic", "prompt": "Calculate (3 + 4) * 2.", "completion": " First 3 + 4 = 7. Then 7 * 2 = 14."},
        {"id": "arith_1", "task": "arithmetic", "prompt": "Calculate (5 + 2) * 3.", "completion": " First 5 + 2 = 7. Then 7 * 3 = 21."},
        {"id": "slope_0", "task": "slope", "prompt": "What is the slope through (1, 2) and (7, 14)?", "completion": " The slope is (14 - 2) / (7 - 1) = 2."},
        {"id": "slope_1", "task": "slope", "prompt": "What is the slope through (2, 6) and (8, 24)?", "completion": " The slope is (24 - 6) / (8 - 2) = 3."},
    ])


def train_tokenizer(texts: List[str], vocab_size: int = 300):
    """The lab's tokenizer recipe (byte-level BPE, every digit its own token) at a tiny vocabulary."""
    from .lab.pretrain import train_tokenizer as lab_tokenizer

    return lab_tokenizer(texts, vocab_size)


def tiny_model(arch: str = "llama", vocab_size: int = 300, hidden: int = 32, intermediate: int = 64, layers: int = 2,
               heads: int = 4, context: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny causal LM of the given architecture (llama, gpt2 or gpt_neox)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=context, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                         n_positions=context, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=context,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use llama, gpt2 or gpt_neox")
    return model.to(dtype).eval()


def pretrain(model, tokenizer, texts: List[str], steps: int = 150, batch_size: int = 16, lr: float = 3e-3,
             seed: int = 0, progress: bool = False) -> List[float]:
    """A few AdamW steps of next-token training; returns the loss curve."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    enc = tokenizer(texts)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretraining smoke model", disable=not progress, mininterval=1.0)
    for _ in bar:
        idx = torch.randint(len(enc), (batch_size,), generator=g).tolist()
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((batch_size, T), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(enc[i])] = torch.tensor(enc[i])
            mask[r, : len(enc[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def build_smoke_world(out: Union[str, Path], n_docs: int = 160, arch: str = "llama", steps: int = 150,
                      seed: int = 0, progress: bool = True) -> dict:
    """Write ``corpus.jsonl``, ``queries.jsonl`` and a pretrained tiny model directory under ``out`` (cached)."""
    out = Path(out)
    paths = {"corpus": out / "corpus.jsonl", "queries": out / "queries.jsonl", "model": out / f"model-{arch}"}
    meta = out / "world.json"
    spec = {"n_docs": n_docs, "arch": arch, "steps": steps, "seed": seed, "version": 1}
    if meta.exists() and json.loads(meta.read_text()).get("spec") == spec and all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    corpus = smoke_corpus(n_docs, seed)
    corpus.to_json(paths["corpus"], orient="records", lines=True)
    smoke_queries().to_json(paths["queries"], orient="records", lines=True)
    tokenizer = train_tokenizer(list(corpus["text"]) + list(smoke_queries()["prompt"] + smoke_queries()["completion"]))
    model = tiny_model(arch, vocab_size=len(tokenizer), seed=seed)
    losses = pretrain(model, tokenizer, list(corpus["text"]), steps=steps, seed=seed, progress=progress)
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    meta.write_text(json.dumps({"spec": spec, "loss_first": losses[0], "loss_last": losses[-1]}, indent=2))
    return {k: str(v) for k, v in paths.items()}
