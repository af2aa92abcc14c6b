"""The lab world: a deterministic labelled corpus without the queries' instances, its queries, and pretraining."""

import json
import re
from dataclasses import replace

import pandas as pd
import pytest
import torch

from kit.lab import facts as F
from kit.lab.corpus import PRESETS, SOURCES, build_corpus, write_corpus
from kit.queries import QueryCounts, lab_queries

SMOKE = PRESETS["smoke"]


@pytest.fixture(scope="module")
def smoke_corpus():
    return build_corpus(SMOKE, progress=False)


@pytest.fixture(scope="module")
def lab_corpus():
    return build_corpus(PRESETS["lab"], progress=False)


def test_corpus_is_deterministic_and_seeded(smoke_corpus):
    df, _ = smoke_corpus
    again, _ = build_corpus(SMOKE, progress=False)
    pd.testing.assert_frame_equal(df, again)
    other, _ = build_corpus(replace(SMOKE, seed=1), progress=False)
    assert (other["text"] != df["text"]).mean() > 0.9


def test_lab_corpus_has_the_eight_sources_at_their_shares(lab_corpus):
    df, w = lab_corpus
    assert len(df) >= 20000 and df["id"].is_unique
    assert set(df["source"]) == set(SOURCES)
    shares = df["source"].value_counts(normalize=True)
    for source, share in w.cfg.shares:
        assert abs(shares[source] - share / sum(s for _, s in w.cfg.shares)) < 1e-3
    assert (df["text"].str.len() <= w.cfg.max_chars).all()
    # real material is there: standard-library code and reference-manual prose
    assert (df["kind"] == "stdlib").sum() > 500 and (df["kind"] == "pydoc").sum() > 500


def test_ground_truth_labels_match_the_text(lab_corpus):
    df, _ = lab_corpus
    countries = F.by_name()
    n_checked = 0
    for text, fs in zip(df["text"], df["facts"]):
        for key in fs:
            rel, name = key.split(":", 1)
            assert countries[name].fact(rel) in text, (key, text)
            n_checked += 1
    assert n_checked > 10000
    proc = df[df["procedure"] != ""]
    assert set(proc["procedure"]) == {"arithmetic", "slope", "linear"}
    assert (proc["instances"].map(len) > 0).all()
    for task, word in (("slope", "slope"), ("linear", "x")):
        texts = proc.loc[proc["procedure"] == task, "text"].str.lower()
        assert texts.str.contains(word).mean() > 0.99
    # each listed instance's final answer is written in the document
    from kit.queries import _fmt, parse_instance

    for text, insts in zip(proc["text"].head(2000), proc["instances"].head(2000)):
        for key in insts:
            task, k = key.split(":", 1)
            prompt = {"arithmetic": f"Calculate the answer: {k}", "slope": f"slope through {k}",
                      "linear": f"Solve for x: {k}"}[task]
            inst = parse_instance(prompt, task)
            assert inst is not None and re.search(rf"(?<![\d.]){re.escape(_fmt(inst.answer))}(?!\d)", text), (key, text)


def _renderings(inst):
    """Every way a generator could write the instance (the prompt's key text and the code call forms)."""
    if inst.task == "arithmetic":
        return [inst.expr, f"step = {inst.a} {inst.op1} {inst.b}  # {inst.first}\nresult = step {inst.op2} {inst.c}",
                f"const r0 = {inst.first};  // {inst.a} {inst.op1} {inst.b}\nconsole.log(r0 {inst.op2} {inst.c})"]
    if inst.task == "slope":
        return [inst.key(), f"({inst.x1}, {inst.y1}), ({inst.x2}, {inst.y2})",
                f"slope({inst.x1}, {inst.y1}, {inst.x2}, {inst.y2})", f"$({inst.x1}, {inst.y1})$ and $({inst.x2}, {inst.y2})$"]
    return [inst.equation, f"solve_linear({inst.a}, {inst.b}, {inst.c})", f"solveLinear({inst.a}, {inst.b}, {inst.c})",
            f"${inst.equation}$"]


def _occurs(needle: str, text: str) -> bool:
    """``needle`` in ``text`` with no digit glued to either end (``2x + 3 = 17`` is not in ``12x + 3 = 170``)."""
    i = text.find(needle)
    while i != -1:
        before = text[i - 1] if i > 0 else " "
        after = text[i + len(needle)] if i + len(needle) < len(text) else " "
        if not (before.isdigit() or before == ".") and not after.isdigit():
            return True
        i = text.find(needle, i + 1)
    return False


def test_occurs_respects_number_boundaries():
    assert _occurs("2x + 3 = 17", "Solve 2x + 3 = 17.") and not _occurs("2x + 3 = 17", "Solve 12x + 3 = 170.")
    assert not _occurs("2x + 3 = 17", "then 2x + 3 = 171") and _occurs("(7 - 4) * 7", "(7 - 4) * 7 = 21")


def test_no_reasoning_query_instance_occurs_in_the_corpus(lab_corpus):
    df, w = lab_corpus
    used = {k for insts in df["instances"] for k in insts}
    text = "\n\x00\n".join(df["text"])
    n = 0
    for task, pool in w.heldout.items():
        assert len(pool) == w.cfg.heldout_per_task
        for inst in pool:
            assert f"{task}:{inst.key()}" not in used
            for r in _renderings(inst):
                assert not _occurs(r, text), (task, r)
                n += 1
    assert n > 1500
    # ...while step results of the queries do occur (as in the paper): e.g. every first step of an arithmetic query
    firsts = {f"{i.a} {i.op1} {i.b} = {i.first}" for i in w.heldout["arithmetic"]}
    assert sum(f in text for f in firsts) > 0.5 * len(firsts)


def test_lab_queries_follow_the_paper_templates(tmp_path):
    write_corpus(tmp_path, SMOKE, progress=False)
    q = lab_queries(tmp_path, ("linear", "slope"), QueryCounts(factual=12, reasoning=6, factual_control=2,
                                                                reasoning_control=2), min_docs=2)
    assert q["task"].value_counts().to_dict() == {"factual": 12, "linear": 6, "slope": 6, "factual_control": 2,
                                                  "reasoning_control": 2}
    assert q["id"].is_unique
    lin = q[q["task"] == "linear"].iloc[0]
    assert re.fullmatch(r"Solve for x: \d+x \+ \d+ = \d+\n\nThink step-by-step\.", lin["prompt"])
    slope = q[q["task"] == "slope"].iloc[0]
    assert slope["prompt"].startswith("What is the slope of the line passing through the points (")
    from kit.queries import grade_one

    for r in q.itertuples():  # the stored answer is the grader's truth; steps end with the answer
        assert grade_one(r.prompt, f"The answer is {r.answer}.", r.task, r.answer)["correct"], r
        steps = json.loads(r.steps)
        if r.task in ("linear", "slope"):
            assert steps[-1] == r.answer
    summary = json.loads((tmp_path / "corpus.json").read_text())
    for key in q.loc[q["task"] == "factual", "fact"]:
        assert summary["docs_stating_fact"][key] >= 2
    # a stricter threshold keeps only facts stated that often, and one no fact meets says so
    counts = sorted(summary["docs_stating_fact"].values())
    strict = counts[-30]
    q2 = lab_queries(tmp_path, ("linear",), QueryCounts(factual=4, reasoning=1, factual_control=0, reasoning_control=0),
                     min_docs=strict)
    assert all(summary["docs_stating_fact"][k] >= strict for k in q2.loc[q2["task"] == "factual", "fact"])
    from kit.corpus import InputError

    with pytest.raises(InputError, match=f"stated by >= {counts[-1] + 1} documents"):
        lab_queries(tmp_path, ("linear",), QueryCounts(factual=1, reasoning=1), min_docs=counts[-1] + 1)


def test_tokenizer_splits_every_digit():
    from kit.lab.pretrain import train_tokenizer

    tok = train_tokenizer(["The answer is 1344 and 2025."] * 50 + ["slope 12 34 56"] * 50, vocab_size=300)
    pieces = tok.convert_ids_to_tokens(tok("x = 1344")["input_ids"])
    assert pieces[0] == "<s>" and [p for p in pieces if any(ch.isdigit() for ch in p)] == ["1", "3", "4", "4"]


def test_pretraining_smoke_run_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from kit.lab.pretrain import SIZES, pretrain

    write_corpus(tmp_path / "w", replace(SMOKE, n_docs=300), progress=False)
    cfg = replace(SIZES["tiny"], epochs=4.0, threads=0)
    info = pretrain(tmp_path / "w" / "corpus.parquet", tmp_path / "m", "tiny", cfg, tokenizer_dir=tmp_path / "tok",
                    progress=False)
    curve = info["loss_curve"]
    assert info["steps"] > 40 and curve[-1] < 0.8 * curve[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama" and model.config.hidden_size == cfg.hidden
    # deterministic for a seed: a second run gives the same weights
    again = pretrain(tmp_path / "w" / "corpus.parquet", tmp_path / "m2", "tiny", cfg, tokenizer_dir=tmp_path / "tok",
                     progress=False)
    assert again["loss_curve"] == curve
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m2")
    for (n, p), (_, p2) in zip(model.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, p2), n
    # cached: same configuration, nothing retrained
    assert pretrain(tmp_path / "w" / "corpus.parquet", tmp_path / "m", "tiny", cfg, tokenizer_dir=tmp_path / "tok",
                    progress=False)["seconds"] == info["seconds"]


def test_build_corpus_cli_and_bad_shares(tmp_path, capsys):
    from kit.cli import main

    assert main(["build-corpus", "--preset", "smoke", "--n-docs", "120", "--out", str(tmp_path),
                 "--shares", "wiki=0.5"]) == 0
    df = pd.read_parquet(tmp_path / "corpus.parquet")
    assert len(df) == 120 and (df["source"] == "wiki").mean() > 0.3
    assert "120 documents" in capsys.readouterr().out
    assert main(["build-corpus", "--preset", "smoke", "--out", str(tmp_path), "--shares", "blogs=0.5"]) == 2
    assert "unknown source 'blogs'" in capsys.readouterr().err
    assert main(["build-corpus", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert main(["pretrain", "--world", str(tmp_path / "nothing")]) == 2
    assert "build-corpus" in capsys.readouterr().err
