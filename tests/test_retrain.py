"""Counterfactual retraining (kit.lab.retrain): same seed and data order without some documents, cached per retrain.

A planted world: 60 short documents, each stating the capital of a made-up country (30 countries, two documents
each) followed by filler words, except that one document states "The capital of Zorbia is Quelt." instead, the
only place Zorbia or Quelt occurs. A tiny Llama is pretrained on it; retrained without that document the model
loses the fact, retrained without a filler document it barely changes.
"""

import random
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from kit.corpus import InputError
from kit.lab.pretrain import SIZES, drop_tokens, new_model, pack, pack_documents, pretrain
from kit.lab.retrain import completion_logprob, greedy_correct, retrain, retrain_key
from planted import planted_corpus

# 60 documents pack into 20 rows of 64 tokens: 5 steps an epoch at batch 4, 125 steps, ~1.3 s a training here
CFG = replace(SIZES["tiny"], batch_size=4, epochs=25.0, threads=0)
PROMPT, COMPLETION = "The capital of Zorbia is", " Quelt"


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("retrain")
    docs, teach = planted_corpus()
    assert sum("Zorbia" in d for d in docs) == 1 and sum("Quelt" in d for d in docs) == 1
    pd.DataFrame({"id": [f"d{i}" for i in range(len(docs))], "text": docs, "source": "wiki"}).to_parquet(
        root / "corpus.parquet")
    info = pretrain(root / "corpus.parquet", root / "model", "tiny", CFG, tokenizer_dir=root / "tok", progress=False)
    tok = PreTrainedTokenizerFast.from_pretrained(root / "tok")
    pretrained = AutoModelForCausalLM.from_pretrained(root / "model")
    return {"root": root, "docs": docs, "teach": teach, "tok": tok, "pretrained": pretrained, "info": info}


def test_removing_nothing_is_pretraining_bit_for_bit(world):
    model = retrain(world["docs"], world["tok"], CFG, cache_dir=world["root"] / "cache")
    assert not model.retrain_info["cached"] and model.retrain_info["steps"] == world["info"]["steps"]
    assert _equal(_weights(model), _weights(world["pretrained"]))
    losses = model.retrain_info["loss_curve"]  # pretraining's too (pretrain.json keeps its first and last steps)
    k = max(1, len(losses) // 50)
    assert losses[0] == world["info"]["loss_first"] and sum(losses[-k:]) / k == world["info"]["loss_last"]
    print(f"planted world: {len(losses)} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
          f"{model.retrain_info['seconds']} s")


def test_retraining_is_deterministic_and_cached_per_key(world):
    docs, tok, teach, cache = world["docs"], world["tok"], world["teach"], world["root"] / "cache"
    first = retrain(docs, tok, CFG, remove=[teach], cache_dir=cache)
    assert not first.retrain_info["cached"]
    key = first.retrain_info["key"]
    assert key == retrain_key(docs, tok, CFG, [teach]) != retrain_key(docs, tok, CFG, [])
    entry = cache / key
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    # deterministic: a second training (no cache) gives the very same weights
    again = retrain(docs, tok, CFG, remove=[teach])
    assert not again.retrain_info["cached"] and _equal(_weights(first), _weights(again))
    # cached: the same key (indices in any order, repeated) loads, trains nothing, rewrites nothing
    loaded = retrain(docs, tok, CFG, remove=[teach, teach], cache_dir=cache)
    assert loaded.retrain_info["cached"] and loaded.retrain_info["key"] == key
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    assert _equal(_weights(first), _weights(loaded)) and not loaded.training
    names = [p.name for p in cache.iterdir()]
    assert key in names and all(len(n) == 20 and not n.startswith(".") for n in names)  # no temporary leftovers
    assert sorted(p.name for p in entry.iterdir()) == ["model.safetensors", "retrain.json"]
    # a removal changes the weights; another config is another key
    assert not _equal(_weights(first), _weights(world["pretrained"]))
    assert retrain_key(docs, tok, replace(CFG, seed=1), [teach]) != key
    with pytest.raises(InputError, match="outside the corpus"):
        retrain(docs, tok, CFG, remove=[len(docs)])


def test_removing_the_teaching_document_loses_the_fact(world):
    docs, tok, teach, cache = world["docs"], world["tok"], world["teach"], world["root"] / "cache"
    full = completion_logprob(world["pretrained"], tok, [PROMPT], [COMPLETION])[0]
    without = completion_logprob(retrain(docs, tok, CFG, remove=[teach], cache_dir=cache), tok, [PROMPT],
                                 [COMPLETION])[0]
    filler = random.Random(1).choice([i for i in range(len(docs)) if i != teach])
    other = completion_logprob(retrain(docs, tok, CFG, remove=[filler]), tok, [PROMPT], [COMPLETION])[0]
    print(f"log p(Quelt): full {full:.3f}, without the teaching doc {without:.3f}, without filler {filler}: "
          f"{other:.3f}")
    # measured (torch 2 threads, CPU): full -5.23, without the teaching document -7.35 (a drop of 2.13 nats),
    # without filler document 8 -5.20 (+0.02)
    assert full - without > 1.5
    assert abs(full - other) < 0.25
    assert full - without > 5 * abs(full - other)


def test_completion_logprob_is_the_query_loss_convention(world):
    """Summed log-probability of the completion tokens only, prompt with <s>, as kit.queries.completion_nats."""
    tok, model = world["tok"], world["pretrained"]
    lp = completion_logprob(model, tok, [PROMPT], [COMPLETION])[0]
    p = tok(PROMPT, add_special_tokens=True)["input_ids"]
    c = tok(COMPLETION, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0]
    by_hand = sum(torch.log_softmax(logits[len(p) - 1 + i], -1)[t].item() for i, t in enumerate(c))
    assert lp == pytest.approx(by_hand, abs=1e-4)


def test_greedy_correct_grades_the_greedy_completion(world):
    from kit.queries import generate

    tok, model = world["tok"], world["pretrained"]
    prompt = "The capital of " + world["docs"][0].split()[3] + " is"
    out = generate(model, tok, [prompt], max_new_tokens=4, progress=False)[0]
    word = next(w.strip(".,") for w in out.split() if any(ch.isalpha() for ch in w))
    got = greedy_correct(model, tok, [prompt, prompt], [word, "Nowhereville"], tasks=["factual", "factual"],
                         max_new_tokens=4)
    assert got.dtype == bool and got.tolist() == [True, False]


def test_drop_tokens_keeps_rows_and_order_and_computes_as_the_kept_tokens_alone(world):
    tok, docs = world["tok"], world["docs"]
    blocks, owner = pack_documents(tok, docs, CFG.block)
    assert torch.equal(blocks, pack(tok, docs, CFG.block)) and owner.shape == blocks.shape
    # a document straddling two rows loses its tokens from both
    r0 = next(r for r in range(len(owner) - 1) if owner[r, -1] == owner[r + 1, 0])
    straddler = int(owner[r0, -1])
    keep = owner != straddler
    ids, labels = drop_tokens(blocks, keep, pad_id=tok.pad_token_id)
    assert ids.shape == blocks.shape and int((~keep).sum()) == int((labels == -100).sum())
    n_tok = len(tok(docs[straddler])["input_ids"]) + 1
    assert int((~keep).sum()) == n_tok and int((~keep.all(1)).sum()) == 2
    for r in torch.nonzero(~keep.all(1)).flatten().tolist():
        kept = blocks[r][keep[r]]
        assert torch.equal(ids[r, : len(kept)], kept) and (labels[r, len(kept):] == -100).all()
        # right padding needs no attention mask: the kept tokens compute what they compute alone
        model = world["pretrained"]
        with torch.no_grad():
            padded = model(input_ids=ids[r: r + 1]).logits[0, : len(kept)]
            alone = model(input_ids=kept[None]).logits[0]
        assert torch.allclose(padded, alone, atol=1e-5)
    untouched = keep.all(1)
    assert torch.equal(ids[untouched], blocks[untouched]) and torch.equal(labels[untouched], blocks[untouched])
    assert new_model(CFG, len(tok)).config.vocab_size == len(tok)
    np.testing.assert_array_equal(owner.flatten().numpy(), np.sort(owner.flatten().numpy()))


def test_ekfac_top_document_is_the_teaching_one_and_removing_it_costs_the_fact(world):
    """Closing the loop: EK-FAC (kit's fit + score) ranks the teaching document first for the Zorbia query, and
    retraining without that top-1 document loses the fact."""
    import kit
    from kit.cli import main

    root, docs, teach = world["root"], world["docs"], world["teach"]
    pd.DataFrame({"id": ["zorbia"], "prompt": [PROMPT], "completion": [COMPLETION]}).to_json(
        root / "queries.jsonl", orient="records", lines=True)
    run = root / "run"
    assert main(["fit", "--model", str(root / "model"), "--corpus", str(root / "corpus.parquet"), "--out", str(run),
                 "--fisher", "empirical"]) == 0
    assert main(["score", "--run", str(run), "--queries", str(root / "queries.jsonl")]) == 0
    raw = kit.load_scores(run, "raw").loc["zorbia"].sort_values(ascending=False)
    # measured: teaching document d19 scores 830.9, the runner-up 361.1, the median document 106.4
    # (document-normalised scores also rank it first, but only by 2 %: 30.28 vs 29.73)
    assert raw.index[0] == f"d{teach}" and raw.iloc[0] > 1.5 * raw.iloc[1]
    top1 = int(raw.index[0][1:])
    full = completion_logprob(world["pretrained"], world["tok"], [PROMPT], [COMPLETION])[0]
    without = retrain(docs, world["tok"], CFG, remove=[top1], cache_dir=root / "cache")
    assert full - completion_logprob(without, world["tok"], [PROMPT], [COMPLETION])[0] > 1.5


def test_a_step_with_no_target_left_changes_nothing(world):
    """Every row of every batch emptied by a removal: no loss to take, so the weights stay at initialisation."""
    from kit.lab.pretrain import train

    blocks = pack(world["tok"], world["docs"], CFG.block)
    model = new_model(CFG, len(world["tok"]))
    init = _weights(model)
    losses = train(model, blocks, replace(CFG, epochs=1.0), progress=False, labels=torch.full_like(blocks, -100))
    assert len(losses) == len(blocks) // CFG.batch_size and all(l != l for l in losses)
    assert _equal(init, _weights(model))


def test_removing_ekfac_top1_flips_the_answer_and_a_random_removal_does_not(tmp_path):
    """The issue's planted case, on the answer itself: one document (stating the fact four times) alone teaches
    "Quelt"; the model answers it greedily; without EK-FAC's top-1 document it no longer does, without a random
    other document it still does."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    import kit
    from kit.cli import main

    docs, teach = planted_corpus(repeat=4)
    cfg = replace(CFG, epochs=60.0)  # 300 steps: enough for the tiny model to answer "Quelt" greedily
    pd.DataFrame({"id": [f"d{i}" for i in range(len(docs))], "text": docs, "source": "wiki"}).to_parquet(
        tmp_path / "corpus.parquet")
    pretrain(tmp_path / "corpus.parquet", tmp_path / "model", "tiny", cfg, tokenizer_dir=tmp_path / "tok",
             progress=False)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")

    def answers(model) -> bool:
        return bool(greedy_correct(model, tok, [PROMPT], ["Quelt"], tasks=["factual"], max_new_tokens=6)[0])

    assert answers(base)
    pd.DataFrame({"id": ["zorbia"], "prompt": [PROMPT], "completion": [COMPLETION]}).to_json(
        tmp_path / "queries.jsonl", orient="records", lines=True)
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "corpus.parquet"), "--out",
                 str(run), "--fisher", "empirical"]) == 0
    assert main(["score", "--run", str(run), "--queries", str(tmp_path / "queries.jsonl")]) == 0
    top1 = int(kit.load_scores(run, "raw").loc["zorbia"].idxmax()[1:])
    assert top1 == teach
    assert not answers(retrain(docs, tok, cfg, remove=[top1]))
    others = [i for i in range(len(docs)) if i != teach]
    kept = [answers(retrain(docs, tok, cfg, remove=[i])) for i in random.Random(3).sample(others, 3)]
    assert all(kept), kept
