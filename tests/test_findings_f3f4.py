"""F3 as the paper's Fig. 3 (answers in the top k, per task, correct and wrong apart) and the paper's A.8.3 keyword
categories (part of F4), on planted data with hand-computed answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kit import findings as FD
from kit.errors import InputError
from kit.findings import answers, procedures

# ------------------------------------------------------------------------------------------------------------- F3

D = 100
FILLER = "filler text about rivers, towns and markets"


def ranking(placements: dict, seed: int) -> np.ndarray:
    """Scores over D documents that put each ``doc: rank`` (1-based) of ``placements`` at exactly that rank; the other
    documents fill the remaining ranks in a seeded random order."""
    rng = np.random.default_rng(seed)
    free_docs = [j for j in rng.permutation(D) if j not in placements]
    free_ranks = [r for r in range(1, D + 1) if r not in placements.values()]
    rank = np.empty(D, dtype=int)
    for doc, r in placements.items():
        rank[doc] = r
    rank[free_docs] = free_ranks
    return (D - rank).astype(float)


def test_the_answer_search_is_remembered_per_corpus_only():
    """The search results kept between calls belong to one corpus: other texts are searched afresh."""
    run = planted_fig3_run()
    first = answers.answer_ranks(run).set_index("query")
    changed = run.documents.copy()
    changed.loc[10, "text"] = "No capital is named here."  # Paris (query q000, rank 1) is gone
    other = answers.answer_ranks(FD.from_arrays(run.scores, list(run.tasks), texts=list(changed["text"]),
                                                prompt=list(run.queries["prompt"]), answer=list(run.queries["answer"]),
                                                correct=list(run.queries["correct"]))).set_index("query")
    assert first.loc["q000", "rank_found"] == 1 and other.loc["q000", "rank_found"] is None
    again = answers.answer_ranks(run).set_index("query")
    pd.testing.assert_frame_equal(again, first)


def planted_fig3_run():
    """Factual answers, arithmetic and slope step answers planted at known ranks in correct and wrong queries.

    query            task        correct  planted ranks (docs)                rank at which the answer is complete
    capital Paris    factual     yes      1                                   1
    capital Berlin   factual     yes      3                                   3
    capital Madrid   factual     yes      8                                   8
    capital Rome     factual     yes      40                                  40
    capital Lisbon   factual     no       2                                   2
    capital Vienna   factual     no       60                                  60
    capital Oslo     factual     no       (no document holds it)              never
    (7 - 4) * 7      arithmetic  yes      steps at 2 and 9                    9
    (9 + 2) - 5      arithmetic  no       steps at 1 and 30                   30
    (8 - 6) * 4      arithmetic  no       step 1 at 1, step 2 nowhere          never
    (1,2)-(3,8)      slope       yes      steps at 4, 5, 6                    6
    (10,40)-(12,30)  slope       no       steps at 3, 70, 2                   70
    a reasoning control (not searched)
    """
    texts = [FILLER] * D
    docs = {"Paris": 10, "Berlin": 11, "Madrid": 12, "Rome": 13, "Lisbon": 14, "Vienna": 15,
            "7 - 4 = 3": 20, "3 * 7 = 21": 21, "9 + 2 = 11": 22, "11 - 5 = 6": 23, "8 - 6 = 2": 24,
            "8 - 2 = 6": 30, "3 - 1 = 2": 31, "6 / 2 = 3": 32, "30 - 40 = -10": 33, "12 - 10 = 2": 34,
            "-10 / 2 = -5": 35}
    for what, j in docs.items():
        texts[j] = f"The capital is {what}." if what[0].isalpha() else f"We work it out: {what}, as shown."
    cap = lambda c: f"What is the capital of {c}?"  # noqa: E731
    queries = [  # (task, prompt, answer, correct, {doc: rank})
        ("factual", cap("France"), "Paris", True, {10: 1}),
        ("factual", cap("Germany"), "Berlin", True, {11: 3}),
        ("factual", cap("Spain"), "Madrid", True, {12: 8}),
        ("factual", cap("Italy"), "Rome", True, {13: 40}),
        ("factual", cap("Portugal"), "Lisbon", False, {14: 2}),
        ("factual", cap("Austria"), "Vienna", False, {15: 60}),
        ("factual", cap("Norway"), "Oslo", False, {}),
        ("arithmetic", "Calculate the answer: (7 - 4) * 7\n\nThink step-by-step.", None, True, {20: 2, 21: 9}),
        ("arithmetic", "Calculate the answer: (9 + 2) - 5\n\nThink step-by-step.", None, False, {22: 1, 23: 30}),
        ("arithmetic", "Calculate the answer: (8 - 6) * 4\n\nThink step-by-step.", None, False, {24: 1}),
        ("slope", "What is the slope of the line passing through the points (1, 2) and (3, 8)?\n\n"
                  "Think step-by-step.", None, True, {30: 4, 31: 5, 32: 6}),
        ("slope", "What is the slope of the line passing through the points (10, 40) and (12, 30)?\n\n"
                  "Think step-by-step.", None, False, {33: 3, 34: 70, 35: 2}),
        ("reasoning_control", "The slope of the line is -22. What is the slope of the line?", None, True, {}),
    ]
    scores = np.vstack([ranking(q[4], seed=i) for i, q in enumerate(queries)])
    return FD.from_arrays(scores, [q[0] for q in queries], texts=texts, prompt=[q[1] for q in queries],
                          answer=[q[2] for q in queries], correct=[q[3] for q in queries])


KS = [1, 2, 5, 10, 50, 100]
# hand-computed: queries of each task and split whose answer is complete within the top k, for each k in KS
EXPECTED = {  # (task, split): (n, [found at k for k in KS])
    ("factual", "correct"): (4, [1, 1, 2, 3, 4, 4]),
    ("factual", "wrong"): (3, [0, 1, 1, 1, 1, 2]),
    ("factual", "all"): (7, [1, 2, 3, 4, 5, 6]),
    ("arithmetic", "correct"): (1, [0, 0, 0, 1, 1, 1]),
    ("arithmetic", "wrong"): (2, [0, 0, 0, 0, 1, 1]),
    ("slope", "correct"): (1, [0, 0, 0, 1, 1, 1]),
    ("slope", "wrong"): (1, [0, 0, 0, 0, 0, 1]),
}


def test_answer_ranks_recover_the_planted_ranks():
    rk = answers.answer_ranks(planted_fig3_run()).set_index("query")
    assert "q012" not in rk.index  # the reasoning control is not searched
    assert rk["rank_found"].tolist()[:7] == [1, 3, 8, 40, 2, 60, None]
    assert rk.loc["q007", "step_ranks"] == [2, 9] and rk.loc["q007", "rank_found"] == 9
    assert rk.loc["q009", "step_ranks"] == [1, None] and rk.loc["q009", "rank_found"] is None
    assert rk.loc["q010", "step_ranks"] == [4, 5, 6]  # 8 - 2 = 6, 3 - 1 = 2, 6 / 2 = 3
    assert rk.loc["q011", "step_ranks"] == [3, 70, 2] and rk.loc["q011", "rank_found"] == 70
    assert rk["split"].tolist() == ["correct"] * 4 + ["wrong"] * 3 + ["correct", "wrong", "wrong", "correct", "wrong"]
    assert not rk.loc["q006", "found_anywhere"] and rk.loc["q008", "found_anywhere"]


def test_answer_curves_equal_hand_computed_shares_per_task_and_split():
    run = planted_fig3_run()
    cur = answers.answer_curves(run, [k / D for k in KS])
    assert sorted(cur["k"].unique()) == KS
    assert list(dict.fromkeys(cur["task"])) == ["factual", "arithmetic", "slope"]  # the paper's order
    for (task, split), (n, found) in EXPECTED.items():
        part = cur[(cur["task"] == task) & (cur["split"] == split)].sort_values("k")
        assert part["n"].tolist() == [n] * len(KS), (task, split)
        assert part["found"].tolist() == found, (task, split)
        assert part["share"].to_numpy() == pytest.approx(np.array(found) / n)
        for _, r in part.iterrows():  # 95 % Wilson interval, as scipy computes it
            ci = stats.binomtest(int(r["found"]), int(r["n"])).proportion_ci(method="wilson")
            assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
            assert r["ci_low"] <= r["share"] <= r["ci_high"] and r["testable"]
    # the curves agree with the module's top-k search, query by query
    rk = answers.answer_ranks(run)
    for k in KS:
        found = answers.search(run, k)["found"].to_numpy()
        assert (found == (rk["rank_found"].astype(float).fillna(np.inf) <= k).to_numpy()).all()


def test_answer_curves_default_grid_reaches_one_document_and_the_paper_cut():
    run = planted_fig3_run()
    cur = answers.answer_curves(run)
    assert cur["k"].min() == 1 and cur["k"].max() == D
    assert answers.PAPER_ANSWER_FRACTION == 1e-4 and 1e-4 in set(cur["fraction"])
    at = cur[cur["fraction"] == 1e-4]
    assert set(at["k"]) == {1} and at["k_floored"].all() and set(at["paper_k"]) == {500.0}
    one = cur[(cur["k"] == 1) & (cur["task"] == "factual") & (cur["split"] == "correct")]
    assert set(one["found"]) == {1}


def test_paper_cut_summary_gives_the_bars_of_fig3():
    run = planted_fig3_run()
    s = answers.paper_cut_summary(run)
    json.dumps(s)  # JSON-able as it is
    assert s["k"] == 1 and s["k_floored"] and s["paper"]["k"] == 500 and "top 1 of this run's 100" in s["note"]
    bars = {(b["task"], b["split"]): b for b in s["bars"]}
    assert set(bars) == {(t, sp) for t in ("factual", "arithmetic", "slope") for sp in ("correct", "wrong")}
    assert (bars[("factual", "correct")]["found"], bars[("factual", "correct")]["n"]) == (1, 4)
    assert bars[("factual", "wrong")]["share"] == 0.0 and bars[("slope", "wrong")]["n"] == 1
    s10 = answers.paper_cut_summary(run, fraction=0.1)  # top 10
    bars = {(b["task"], b["split"]): b for b in s10["bars"]}
    assert bars[("factual", "correct")]["share"] == 0.75 and bars[("factual", "wrong")]["found"] == 1
    assert bars[("arithmetic", "correct")]["found"] == 1 and bars[("arithmetic", "wrong")]["found"] == 0
    groups = {(g["group"], g["split"]): g for g in s10["groups"]}
    assert (groups[("reasoning", "correct")]["found"], groups[("reasoning", "correct")]["n"]) == (2, 2)
    assert (groups[("reasoning", "wrong")]["found"], groups[("reasoning", "wrong")]["n"]) == (0, 3)
    assert s10["paper_reported"]["7B"]["factual_correct_share"] == 0.55


def test_a_split_without_queries_reads_not_testable():
    run = planted_fig3_run()
    run.queries["correct"] = True
    s = answers.paper_cut_summary(run)
    wrong = [b for b in s["bars"] if b["split"] == "wrong"]
    assert wrong and all(not b["testable"] and b["share"] is None and "not testable" in b["reason"] for b in wrong)
    run.queries["correct"] = np.nan  # ungraded: only the pooled split can be read
    cur = answers.answer_curves(run, [0.1])
    assert not cur[cur["split"] != "all"]["testable"].any() and cur[cur["split"] == "all"]["testable"].all()


@pytest.mark.parametrize("bad", [0.0, 1.5, -1e-4, "many"])
def test_bad_fractions_raise_input_error(bad):
    with pytest.raises(InputError, match="fraction"):
        answers.answer_curves(planted_fig3_run(), [bad])


def test_existing_summary_is_unchanged_by_the_shared_search():
    s = answers.summarise(planted_fig3_run(), k=10)
    assert s["by_group"]["factual"]["correct"] == {"found": 3, "n": 4, "share": 0.75}
    assert s["by_group"]["reasoning"]["all"] == {"found": 2, "n": 5, "share": 0.4}


# ------------------------------------------------------------------------------------------------------------- F4

SLOPE_CODE = ("def slope(x1, y1, x2, y2):\n    \"\"\"Slope of the line through two points.\"\"\"\n"
              "    return (y2 - y1) / (x2 - x1)\n")
SLOPE_PROSE = ("To find the slope of the line through (2, 3) and (5, 9), subtract the y-values: 9 - 3 = 6. Then "
               "subtract the x-values: 5 - 2 = 3. Divide the two: 6 / 3 = 2, so the slope is 2.")
MATHS_TEXT = ("Algebra is the branch of mathematics that studies symbols and the rules for manipulating them; a "
              "theorem is a statement proved from axioms.")
UNRELATED = "The river winds through the old town, past the market square and the cathedral, before reaching the sea."
TWO_STEP = "We compute (3 + 4) * 5 = 35 by adding first."
LINEAR = "Solve for x: 3x + 2 = 11. Subtract 2 from both sides: 3x = 9, so x = 3."
NOT_MATHS = "Between 1990-1995 the town grew; call 555-1234 for the museum."
PLAIN_CODE = "import os\nprint(os.getcwd())\n"


@pytest.mark.parametrize("task,expected", [
    ("slope", ["code_with_arithmetic", "similar_arithmetic", "text_about_maths", "other", "other_maths",
               "other_maths", "other", "other"]),
    ("arithmetic", ["code_with_arithmetic", "other_maths", "text_about_maths", "other", "similar_arithmetic",
                    "other_maths", "other", "other"]),
    ("linear", ["code_with_arithmetic", "other_maths", "text_about_maths", "other", "other_maths",
                "similar_arithmetic", "other", "other"]),
    (None, ["code_with_arithmetic", "similar_arithmetic", "text_about_maths", "other", "similar_arithmetic",
            "similar_arithmetic", "other", "other"])])
def test_keyword_counter_classifies_hand_written_documents(task, expected):
    docs = [SLOPE_CODE, SLOPE_PROSE, MATHS_TEXT, UNRELATED, TWO_STEP, LINEAR, NOT_MATHS, PLAIN_CODE]
    cats = procedures.keyword_categories(docs, task)
    assert cats["category"].tolist() == expected
    assert cats["code"].tolist() == [True, False, False, False, False, False, False, True]
    assert cats.loc[2, "maths_words"] == 5  # algebra, mathematics, theorem, proved, axioms
    assert cats.loc[3, "maths_words"] == 0
    assert not cats.loc[6, "formula"]  # year ranges and phone numbers are not formulas


def test_keyword_counter_rejects_bad_input():
    with pytest.raises(InputError, match="list of texts"):
        procedures.keyword_categories("one string")
    with pytest.raises(InputError, match="reasoning tasks"):
        procedures.keyword_categories([UNRELATED], "factual")


def planted_keyword_run():
    """200 documents: 5 slope programs, 10 worked slopes, 5 maths paragraphs, 1 standard-library snippet, the rest
    unrelated prose. q0 (slope) ranks code, worked slopes and maths text first; q1 (slope) ranks 20 unrelated
    documents first; q2 (arithmetic) ranks the 10 worked slopes, then 10 unrelated documents first."""
    n = 200
    texts, kinds, procs = [UNRELATED] * n, ["wiki_country"] * n, [""] * n
    code, worked, maths, stdlib = range(0, 5), range(5, 15), range(15, 20), 20
    for j in code:
        texts[j], kinds[j], procs[j] = SLOPE_CODE, "code_slope_py", "slope"
    for j in worked:
        texts[j], kinds[j], procs[j] = SLOPE_PROSE, "math_slope", "slope"
    for j in maths:
        texts[j], kinds[j] = MATHS_TEXT, "arxiv_abstract"
    texts[stdlib], kinds[stdlib] = PLAIN_CODE, "stdlib"
    kinds[199] = "arxiv_abstract"  # a label the rules disagree with: unrelated prose labelled as a maths abstract
    scores = np.zeros((3, n))
    scores[0, :20] = np.arange(20, 0, -1) + 100
    scores[1, 100:120] = 1.0
    scores[2, 5:15] = 2.0
    scores[2, 150:160] = 1.0
    run = FD.from_arrays(scores, ["slope", "slope", "arithmetic"], texts=texts)
    run.documents["kind"], run.documents["procedure"] = kinds, procs
    return run


def test_keyword_counts_on_planted_rankings_equal_the_planted_counts():
    run = planted_keyword_run()
    out = procedures.keyword_counts(run, fraction=0.1, min_k=1)
    json.dumps(out)
    assert out["k"] == 20 and not out["floored"]
    rec = {(r["task"], r["category"]): r for r in out["records"]}
    expected = {("slope", "code_with_arithmetic"): 5, ("slope", "similar_arithmetic"): 10,
                ("slope", "text_about_maths"): 5, ("slope", "other"): 20, ("slope", "other_maths"): 0,
                ("arithmetic", "other_maths"): 10, ("arithmetic", "other"): 10, ("arithmetic", "similar_arithmetic"): 0}
    for key, count in expected.items():
        assert rec[key]["count"] == count, key
        assert rec[key]["label_count"] == count, key  # the lab labels agree on these documents
    assert sum(rec[("slope", c)]["count"] for c in procedures.KEYWORD_CATEGORIES) == 40  # 2 queries x 20
    r = rec[("slope", "code_with_arithmetic")]
    assert (r["n_slots"], r["share"], r["queries_with"], r["unique_documents"]) == (40, 0.125, 1, 5)
    assert r["base_share"] == pytest.approx(5 / 200) and r["multiplier"] == pytest.approx(5.0)
    assert rec[("slope", "other")]["queries_with"] == 1 and rec[("slope", "other")]["unique_documents"] == 20
    assert rec[("slope", "other_maths")]["multiplier"] is None  # no document is other maths for slopes
    assert rec[("arithmetic", "other_maths")]["base_share"] == pytest.approx(10 / 200)
    assert all(rec[(t, c)]["label_unknown"] == 0 for t, c in rec)


def test_keyword_counts_state_the_papers_cut_and_the_floor():
    run = planted_keyword_run()
    out = procedures.keyword_counts(run)  # top 500 of 5M = 0.02 documents of 200 -> 1, raised to 10
    assert (out["k_unfloored"], out["k"], out["min_k"], out["floored"]) == (1, 10, 10, True)
    assert "top 500 of 5,000,000" in out["note"] and "floor of 10" in out["note"]
    rec = {(r["task"], r["category"]): r for r in out["records"]}
    assert rec[("slope", "code_with_arithmetic")]["count"] == 5 and rec[("slope", "similar_arithmetic")]["count"] == 5
    assert rec[("slope", "other")]["count"] == 10  # q1's top 10 (a tie broken by document order)
    with pytest.raises(InputError, match="fraction"):
        procedures.keyword_counts(run, fraction=2.0)
    none = procedures.keyword_counts(FD.from_arrays(np.zeros((1, 3)), ["factual"], texts=["a", "b", "c"]))
    assert none["records"] == [] and "not testable" in none["reason"]


def test_keyword_accuracy_against_planted_labels():
    acc = procedures.keyword_accuracy(planted_keyword_run(), tasks=["slope"])
    assert acc["testable"] and acc["n_scored"] == 199  # the stdlib snippet has no corresponding label
    rec = {r["category"]: r for r in acc["records"]}
    assert (rec["code_with_arithmetic"]["precision"], rec["code_with_arithmetic"]["recall"]) == (1.0, 1.0)
    assert (rec["similar_arithmetic"]["labelled"], rec["similar_arithmetic"]["both"]) == (10, 10)
    t = rec["text_about_maths"]
    assert (t["labelled"], t["detected"], t["both"], t["precision"]) == (6, 5, 5, 1.0)
    assert t["recall"] == pytest.approx(5 / 6)
    o = rec["other"]
    assert (o["labelled"], o["detected"], o["both"]) == (178, 179, 178)
    assert o["precision"] == pytest.approx(178 / 179) and o["recall"] == 1.0 and o["detected_unlabelled"] == 1
    assert rec["other_maths"]["precision"] is None and "no document labelled so" in rec["other_maths"]["reason"]
    assert acc["confusion"]["slope"]["text_about_maths"]["other"] == 1
    bare = FD.from_arrays(np.zeros((1, 2)), ["slope"], texts=["a", "b"])
    assert not procedures.keyword_accuracy(bare)["testable"]


def test_keyword_counter_agrees_with_the_lab_corpus_labels(tmp_path):
    from kit.lab.corpus import PRESETS, write_corpus

    write_corpus(tmp_path, PRESETS["smoke"], progress=False)
    docs = pd.read_parquet(tmp_path / "corpus.parquet")
    run = FD.from_arrays(np.zeros((1, len(docs))), ["slope"], texts=docs["text"])
    run.documents["kind"], run.documents["procedure"] = docs["kind"].to_numpy(), docs["procedure"].to_numpy()
    acc = procedures.keyword_accuracy(run, tasks=list(procedures.REASONING))
    recs = pd.DataFrame(acc["records"])
    assert (recs["labelled"] >= 10).all(), recs
    assert (recs["precision"] >= 0.9).all() and (recs["recall"] >= 0.9).all(), recs


def test_an_unparseable_reasoning_prompt_is_searched_by_its_answer_or_left_out():
    from kit.findings.answers import query_targets

    assert query_targets("Work out this odd puzzle, please", "arithmetic") == []
    [(label, pat)] = query_targets("Work out this odd puzzle, please", "slope", answer=42)
    assert label == "42" and pat.search("so it is 42.") and not pat.search("it is 420")
