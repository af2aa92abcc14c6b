"""Pretraining the lab models from scratch: a tokenizer trained on the corpus, and Llama-architecture causal LMs
in two sizes (``small`` and ``large``, standing in for the paper's 7B and 35B).

Training is plain next-token prediction on the corpus: every document becomes ``<s> text </s>``, documents are
concatenated and cut into blocks of ``block`` tokens (standard GPT-style packing), and AdamW with a warm-up and a
cosine decay runs for a fixed number of epochs. Everything is seeded, so a configuration gives the same weights
on the same machine. The result is a Hugging Face model directory (``config.json``, ``model.safetensors`` and the
tokenizer) that ``AutoModelForCausalLM.from_pretrained`` and ``python -m kit fit --model DIR`` load.

Besides the two lab sizes, :data:`SIZES` holds test and smoke presets and ``micro``, the size counterfactual
retraining (:mod:`kit.lab.retrain`) validates with: it retrains many times within a 30-minute budget, seconds each.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class PretrainConfig:
    """One lab model: architecture and schedule."""

    hidden: int = field(default=192, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    heads: int = field(default=6, metadata={"help": "attention heads"})
    intermediate: int = field(default=576, metadata={"help": "MLP width (gate/up/down projections: the tracked layers)"})
    context: int = field(default=256, metadata={"help": "max_position_embeddings of the saved model"})
    block: int = field(default=128, metadata={"help": "training sequence length (documents are packed)"})
    batch_size: int = field(default=32, metadata={"help": "sequences per optimiser step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=100, metadata={"help": "warm-up steps"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the corpus"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave torch's default)"})


SIZES: Dict[str, PretrainConfig] = {
    "small": PretrainConfig(hidden=96, layers=3, heads=4, intermediate=288, batch_size=16, lr=3e-3, epochs=1.5),
    "large": PretrainConfig(hidden=192, layers=4, heads=6, intermediate=576, batch_size=16, lr=2e-3, epochs=2.75),
    "tiny": PretrainConfig(hidden=32, layers=2, heads=4, intermediate=64, block=64, batch_size=16, warmup=10,
                           epochs=1.0, lr=3e-3),
    # the smoke preset of `make figures` (seconds each): enough steps to answer in the task's format
    "smoke_small": PretrainConfig(hidden=32, layers=2, heads=4, intermediate=64, block=64, batch_size=16, warmup=10,
                                  epochs=6.0, lr=3e-3),
    "smoke_large": PretrainConfig(hidden=48, layers=2, heads=4, intermediate=96, block=64, batch_size=16, warmup=10,
                                  epochs=6.0, lr=3e-3, seed=1),
    # counterfactual retraining (kit.lab.retrain): validation retrains a model many times (one per method, k and
    # query group, plus seeds for the noise floor) inside `make validate`'s 30-minute budget, so each retrain must
    # take seconds. Trained on a corpus subset: 2,000 lab documents (~148k tokens, 435 steps) took 16.3 s on 2
    # shared CPU cores (torch 2 threads), the loss falling from 7.6 to 1.95.
    "micro": PretrainConfig(hidden=64, layers=2, heads=4, intermediate=128, block=64, batch_size=16, warmup=20,
                            epochs=3.0, lr=3e-3),
}

TOKENIZER_VOCAB = 2048


def train_tokenizer(texts: Sequence[str], vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE trained on ``texts``; every digit is its own token (``1344`` -> ``1 3 4 4``).

    Single-digit tokens let a small model learn arithmetic digit by digit instead of memorising a token per
    number. ``<s>`` is prepended to every encoded text (the models are trained with it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def new_model(cfg: PretrainConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=cfg.context, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     tie_word_embeddings=True, rope_theta=10000.0)
    return LlamaForCausalLM(mc)


def pack_documents(tokenizer, texts: Sequence[str], block: int):
    """:func:`pack` and, beside it, the index in ``texts`` of the document each token comes from ``(n, block)``.

    The same stream as :func:`pack`: ``<s> doc </s>`` for every document in order, concatenated, cut into
    ``block``-token rows, the remainder dropped. The document map lets a counterfactual retrain
    (:mod:`kit.lab.retrain`) take some documents' tokens out of the very rows they were packed into.
    """
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    flat: List[int] = []
    owner: List[int] = []
    eos = tokenizer.eos_token_id
    for d, seq in enumerate(ids):
        flat.extend(seq)
        flat.append(eos)
        owner.extend([d] * (len(seq) + 1))
    n = len(flat) // block
    return (torch.tensor(flat[: n * block], dtype=torch.long).view(n, block),
            torch.tensor(owner[: n * block], dtype=torch.long).view(n, block))


def pack(tokenizer, texts: Sequence[str], block: int) -> torch.Tensor:
    """``<s> doc </s>`` for every document, concatenated and cut into ``block``-token rows (remainder dropped)."""
    return pack_documents(tokenizer, texts, block)[0]


def drop_tokens(blocks: torch.Tensor, keep: torch.Tensor, pad_id: int = 0):
    """Rows with the tokens where ``keep`` is False taken out: ``(input_ids, labels)``, both ``(n, block)``.

    The kept tokens of each row close up to the left in their order, and the row is right-padded with ``pad_id``
    (label ``-100``: no loss). No attention mask is needed: under the causal mask a real token never attends to
    the padding after it, so each row computes exactly what its kept tokens alone would. Rows and their number
    stay as they are, so the data order (a permutation of rows) is unchanged.
    """
    n, block = blocks.shape
    ids = torch.full_like(blocks, pad_id)
    labels = torch.full_like(blocks, -100)
    for r in torch.nonzero(~keep.all(1)).flatten().tolist():
        kept = blocks[r][keep[r]]
        ids[r, : len(kept)] = kept
        labels[r, : len(kept)] = kept
    whole = keep.all(1)
    ids[whole], labels[whole] = blocks[whole], blocks[whole]
    return ids, labels


def train(model, blocks: torch.Tensor, cfg: PretrainConfig, progress: bool = True, desc: str = "pretraining",
          labels: Optional[torch.Tensor] = None):
    """AdamW with linear warm-up and cosine decay; returns the per-step loss curve.

    ``labels``: next-token targets per row (``-100``: no loss), as :func:`drop_tokens` makes them; default the
    rows themselves (every token is a target, as in pretraining). A step whose batch has no target at all (every
    row emptied by a removal) changes nothing and is recorded as NaN; the schedule and data order go on as they
    were.
    """
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, len(blocks) // cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    model.train()
    losses: List[float] = []
    order = torch.randperm(len(blocks), generator=g)
    pos = 0
    bar = tqdm(range(total), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(blocks), generator=g), 0
        rows = order[pos: pos + cfg.batch_size]
        batch = blocks[rows]
        target = batch if labels is None else labels[rows]
        pos += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        if labels is not None and not bool((target[:, 1:] != -100).any()):
            losses.append(float("nan"))
            continue
        loss = model(input_ids=batch, labels=target).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    return losses


def pretrain(corpus_path, out, size: str = "large", cfg: Optional[PretrainConfig] = None,
             tokenizer_dir=None, progress: bool = True) -> Dict[str, object]:
    """Pretrain one lab model on a corpus into ``out`` (a HF model directory). Cached by configuration.

    ``tokenizer_dir``: reuse (or create there) the corpus tokenizer, so both sizes share one vocabulary.
    """
    from transformers import PreTrainedTokenizerFast

    from ..corpus import load_corpus

    cfg = cfg or SIZES[size]
    out = Path(out)
    corpus = load_corpus(corpus_path)
    corpus_hash = hashlib.sha256("\x00".join(corpus["text"]).encode()).hexdigest()[:16]
    spec = {"size": size, "config": asdict(cfg), "corpus_sha": corpus_hash, "n_docs": len(corpus),
            "vocab": TOKENIZER_VOCAB, "version": 1}
    meta = out / "pretrain.json"
    if meta.exists() and (out / "config.json").exists():
        done = json.loads(meta.read_text())
        if done.get("spec") == spec:
            return done
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else out
    stamp = tok_dir / "corpus_sha.txt"
    if (tok_dir / "tokenizer.json").exists() and stamp.exists() and stamp.read_text().strip() == corpus_hash:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:  # (re)train: the tokenizer belongs to this corpus
        tokenizer = train_tokenizer(list(corpus["text"]))
        tok_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(tok_dir)
        stamp.write_text(corpus_hash)
    t0 = time.time()
    blocks = pack(tokenizer, corpus["text"], cfg.block)
    model = new_model(cfg, len(tokenizer))
    losses = train(model, blocks, cfg, progress=progress, desc=f"pretraining {size}")
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    k = max(1, len(losses) // 50)
    done = {"spec": spec, "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_per_epoch": int(blocks.numel()), "steps": len(losses), "seconds": round(seconds, 1),
            "loss_first": losses[0], "loss_last": sum(losses[-k:]) / k,
            "loss_curve": [sum(losses[i: i + k]) / len(losses[i: i + k]) for i in range(0, len(losses), k)]}
    meta.write_text(json.dumps(done, indent=1))
    return done
