"""The grader: true answers computed from prompts, final answers read from free-form completions."""

import io
import json
import os

import pandas as pd
import pytest

from kit.queries import (Arithmetic, Linear, Ranges, Slope, canonical_task, grade, grade_file, grade_one,
                         infer_task, parse_instance, solution, true_answer)

ARITH = "Calculate the answer: (7 - 4) * 7\n\nThink step-by-step."
SLOPE = "What is the slope of the line passing through the points (94, 62) and (95, 19)?\n\nThink step-by-step."
LINEAR = "Solve for x: 14x + 1 = 99\n\nThink step-by-step."

# (prompt, completion, task, answer, expected extracted, expected correct)
TABLE = [
    (ARITH, "First, 7 - 4 = 3.\nThen, 3 * 7 = 21.\nTherefore, the answer is 21.", None, None, 21, True),
    (ARITH, "Step 1: 7 - 4 = 3\nStep 2: 3 × 7 = 21\n\n**Answer: 21**", None, None, 21, True),
    (ARITH, "The answer is 21. Let me verify: 3 * 7 = 21 and 7 - 4 = 3.", None, None, 21, True),
    (ARITH, "Therefore, the answer is 20.", None, None, 20, False),
    (ARITH, "I am not sure how to do this.", None, None, None, False),
    (ARITH, "(7 - 4) = 3\n3 * 7 = 21", None, None, 21, True),
    (ARITH, "The final answer is $\\boxed{21}$.", None, None, 21, True),
    (ARITH, "Therefore, the answer is 21.0", None, None, 21, True),
    ("Calculate the answer: (56 * 24)\n\nThink step-by-step.", "56 * 24 = 1,344\n\nThe answer is **1,344**.", None, None, 1344, True),
    ("Calculate the answer: (48 * 28)\n\nThink step-by-step.", "48 * 28 = 1344. So the result is 1,344.", None, None, 1344, True),
    (SLOPE, "m = (19 - 62) / (95 - 94) = -43 / 1 = -43\n\nThe slope is −43.", None, None, -43, True),
    (SLOPE, "The slope is (y2 - y1) / (x2 - x1).\ny2 - y1 = 19 - 62 = -43.\nx2 - x1 = 95 - 94 = 1.\n"
            "The slope is -43 / 1 = -43.\nTherefore, the answer is -43.", None, None, -43, True),
    (SLOPE, "The slope of the line is **-43**.", None, None, -43, True),
    (SLOPE, "Slope = -43/1", None, None, -43, True),
    (SLOPE, "The slope is 43.", None, None, 43, False),
    ("What is the slope of the line passing through the points (0, 0) and (2, 3)?", "The slope is 3/2.", None, None, 1.5, True),
    ("What is the slope of the line passing through the points (0, 0) and (2, 3)?", "So m = 1.5", None, None, 1.5, True),
    (LINEAR, "Subtract 1 from both sides: 14x = 98.\nDivide by 14: x = 7.\n\nCheck: 14(7) + 1 = 99 ✓", None, None, 7, True),
    (LINEAR, "14x = 99 - 1 = 98\nx = 98 / 14 = 7", None, None, 7, True),
    (LINEAR, "Therefore, the answer is x = 7.", None, None, 7, True),
    (LINEAR, "**x = 7**\n\nVerification: 14 * 7 + 1 = 98 + 1 = 99.", None, None, 7, True),
    ("Solve for x: 2x + 10 = 150\n\nThink step-by-step.", "2x = 140\nx = 70", None, None, 70, True),
    ("Solve for x: 5x - 3 = 12", "5x = 15, so x = 3.", None, None, 3, True),
    ("What is the capital of France?", "\nThe capital of France is Paris.", "factual", "Paris", "Paris", True),
    ("What is the capital of France?", "\nThe capital of France is Lyon.", "factual", "Paris", None, False),
    ("What is the tallest mountain in the world and how tall is it?",
     "Mount **Everest** is the tallest at 29,029 feet.", "factual", "Everest", "Everest", True),
    ("The planet Zog has a mountain called Wirtu which is 29,029 feet tall. What is the largest mountain on the "
     "planet Zog?", "The largest mountain on Zog is Wirtu.", None, None, "Wirtu", True),
    ("The slope of the line is -22. What is the slope of the line?", "The slope of the line is −22.", None, None, -22, True),
    ("Find the answer: There are 132 marbles in a jar. How many marbles are in the jar?",
     "There are 132 marbles in the jar.", None, None, 132, True),
    ("Find the answer: There are 1,132 marbles in a jar. How many marbles are in the jar?",
     "The answer is 1132.", None, None, 1132, True),
]


@pytest.mark.parametrize("prompt, completion, task, answer, extracted, correct", TABLE)
def test_grader_table(prompt, completion, task, answer, extracted, correct):
    g = grade_one(prompt, completion, task, answer)
    assert g["extracted"] == extracted
    assert g["correct"] is correct


def test_true_answers_are_computed_from_the_prompt():
    assert true_answer(ARITH) == 21
    assert true_answer(SLOPE) == -43
    assert true_answer(LINEAR) == 7
    assert true_answer("Calculate the answer: (12 + 8) / 4 - 3") == 2
    assert infer_task(ARITH) == "arithmetic" and infer_task(SLOPE) == "slope" and infer_task(LINEAR) == "linear"
    assert infer_task("The slope of the line is -22. What is the slope of the line?") == "reasoning_control"
    with pytest.raises(ValueError, match="answer"):
        true_answer("Who wrote Hamlet?", "factual")


def test_instances_round_trip_through_their_prompts():
    import random

    rng = random.Random(0)
    for cls in (Arithmetic, Slope, Linear):
        for _ in range(200):
            inst = cls.sample(rng, Ranges())
            assert parse_instance(inst.prompt(), inst.task) == inst
            assert true_answer(inst.prompt()) == inst.answer
            g = grade_one(inst.prompt(), "\n" + solution(inst))  # the canonical worked answer grades correct
            assert g["correct"], (inst, solution(inst))
            if isinstance(inst, Slope):
                assert inst.dy % inst.dx == 0  # never a fraction, as the paper
            if isinstance(inst, Arithmetic):
                assert inst.answer > 0


def test_grade_file_prints_one_json_object_per_line(tmp_path):
    rows = [{"id": "a", "prompt": ARITH, "completion": "The answer is 21."},
            {"id": "b", "prompt": LINEAR, "completion": "x = 8", "task": "linear"}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    buf = io.StringIO()
    assert grade_file(str(path), buf) == 2
    out = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert [o["correct"] for o in out] == [True, False]
    assert out[0]["task"] == "arithmetic" and out[0]["answer"] == 21 and out[1]["extracted"] == 8
    assert out[0]["id"] == "a" and out[0]["completion"] == "The answer is 21."


def test_grade_dataframe_adds_columns():
    df = pd.DataFrame({"prompt": [ARITH, SLOPE], "completion": ["The answer is 21.", "The slope is 2."]})
    g = grade(df)
    assert list(g["correct"]) == [True, False] and list(g["task"]) == ["arithmetic", "slope"]


def test_grade_cli_and_its_errors(tmp_path, capsys):
    from kit.cli import main

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "s", "prompt": SLOPE, "completion": "The slope is -43."}) + "\n")
    assert main(["grade", str(path)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["correct"] is True and row["answer"] == -43 and row["task"] == "slope"
    assert main(["grade", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path.write_text(json.dumps({"id": "s", "prompt": SLOPE}) + "\n")
    assert main(["grade", str(path)]) == 2
    assert "completion" in capsys.readouterr().err
    path.write_text(json.dumps({"id": "f", "prompt": "Who wrote Hamlet?", "completion": "Shakespeare"}) + "\n")
    assert main(["grade", str(path)]) == 2
    assert "add an 'answer' column" in capsys.readouterr().err


def test_answer_queries_generates_greedily_and_measures_nats(smoke_world):
    """Greedy completions (checked against a token-by-token argmax loop) and their nats (against a brute-force sum)."""
    import torch

    from kit.models import load_model
    from kit.queries import answer_queries

    model, tok = load_model(smoke_world["model"])
    q = pd.DataFrame([{"id": "a", "task": "arithmetic", "prompt": "Calculate (3 + 4) * 2."},
                      {"id": "s", "task": "slope", "prompt": "What is the slope through (1, 2) and (7, 14)?"}])
    out = answer_queries(model, tok, q, max_new_tokens=12, progress=False)
    for r in out.itertuples():
        ids = tok(r.prompt, return_tensors="pt")["input_ids"]
        for _ in range(12):  # greedy, one token at a time, no padding
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        n_prompt = len(tok(r.prompt)["input_ids"])
        assert r.completion == tok.decode(ids[0, n_prompt:], skip_special_tokens=True)
        # nats: -sum log p(completion tokens | prompt), completion tokenised on its own as the scoring pipeline does
        comp = tok(r.completion, add_special_tokens=False)["input_ids"]
        full = torch.tensor([tok(r.prompt)["input_ids"] + comp])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
        want = -sum(float(lp[n_prompt + i - 1, t]) for i, t in enumerate(comp))
        assert abs(r.nats - want) < 1e-3 * max(1.0, want)
    assert set(out.columns) >= {"completion", "nats", "extracted", "correct", "question"}


# --------------------------------------------------------------------------------------------------------------
# What users write: task spellings, the paper's controls, unreadable rows, bad files
# --------------------------------------------------------------------------------------------------------------

PAPER_SLOPE = "What is the slope of the line passing through the points (93, 28) and (76, 73)?\n\nThink step-by-step."
PAPER_LINEAR = "Solve for x: 5x + 21 = 91\n\nThink step-by-step."
BEAGLES = "Find the answer: 90 beagles were bought by a dog breeder. How many beagles were bought?"


@pytest.mark.parametrize("spelling, task", [
    ("slopes", "slope"), ("Slope", "slope"), ("SLOPES", "slope"), ("slope_of_a_line", "slope"),
    ("linear equations", "linear"), ("Linear-Equation", "linear"), ("linear_equations", "linear"),
    ("two-step arithmetic", "arithmetic"), ("Two_Step Arithmetic", "arithmetic"), ("arithmetic", "arithmetic"),
    ("reasoning controls", "reasoning_control"), ("Reasoning-Control", "reasoning_control"),
    ("factual controls", "factual_control"), ("Facts", "factual"),
])
def test_task_spellings_name_the_kit_tasks(spelling, task):
    assert canonical_task(spelling) == task


@pytest.mark.parametrize("spelling", ["slopes", "Slopes", "slope", "SLOPE", "slopes "])
def test_slope_spellings_grade_the_paper_template(spelling):
    g = grade_one(SLOPE, "The slope is -43.", spelling)
    assert (g["task"], g["answer"], g["extracted"], g["correct"]) == ("slope", -43, -43, True)
    assert grade_one(SLOPE, "The slope is 43.", spelling)["correct"] is False


@pytest.mark.parametrize("prompt, spelling, completion, answer", [
    (LINEAR, "linear equations", "x = 7", 7), (LINEAR, "Linear Equation", "x = 7", 7),
    (ARITH, "two-step arithmetic", "The answer is 21.", 21), (ARITH, "Two Step Arithmetic", "The answer is 21.", 21),
    (PAPER_LINEAR, "linear-equations", "x = 14", 14),
])
def test_other_spellings_grade_as_the_canonical_task(prompt, spelling, completion, answer):
    g = grade_one(prompt, completion, spelling)
    assert g["answer"] == answer and g["correct"] is True and g["task"] in ("linear", "arithmetic")


def test_the_issue_file_with_task_slopes_grades(tmp_path, capsys):
    """The paper's own slope template with ``task: slopes`` stopped the whole file before."""
    from kit.cli import main

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "s", "task": "slopes", "prompt": SLOPE, "completion": "The slope is -43."}) + "\n"
                    + json.dumps({"id": "l", "task": "Linear Equations", "prompt": LINEAR, "completion": "x = 6"}) + "\n")
    assert main(["grade", str(path)]) == 0
    captured = capsys.readouterr()
    out = [json.loads(ln) for ln in captured.out.splitlines()]
    assert captured.err == ""
    assert [(o["task"], o["graded_as"], o["answer"], o["correct"]) for o in out] == [
        ("slopes", "slope", -43, True), ("Linear Equations", "linear", 7, False)]


def test_unknown_task_name_falls_back_to_inference():
    assert canonical_task("geometry") is None
    g = grade_one(SLOPE, "The slope is -43.", "geometry")
    assert (g["task"], g["answer"], g["correct"]) == ("slope", -43, True)
    g = grade_one(ARITH, "The answer is 21.", "homework set 3")
    assert (g["task"], g["answer"], g["correct"]) == ("arithmetic", 21, True)
    # only a prompt the kit cannot read asks for an answer
    g = grade_one("Who wrote Hamlet?", "Shakespeare wrote it.", "literature", strict=False)
    assert g["correct"] is None and "add an 'answer' column" in g["reason"]
    g = grade_one("Who wrote Hamlet?", "Shakespeare wrote it.", "literature", "Shakespeare")
    assert (g["task"], g["correct"], g["reason"]) == ("factual", True, None)


def test_declared_task_the_prompt_does_not_follow_is_read_from_the_prompt():
    """A reasoning control labelled with its task ("slope") is graded as the control it is."""
    g = grade_one("The slope of the line is -22. What is the slope of the line?", "The slope of the line is -22.",
                  "slope")
    assert (g["task"], g["answer"], g["correct"]) == ("reasoning_control", -22, True)


@pytest.mark.parametrize("prompt, answer", [
    (BEAGLES, 90),
    ("Find the answer: There are 132 marbles in a jar. How many marbles are in the jar?", 132),
    ("Find the answer: The price of the book is 15 dollars. What is the price of the book?", 15),
    ("Find the answer: A farmer has 12 cows and 30 chickens. How many chickens does the farmer have?", 30),
    ("90 beagles were bought by a dog breeder. How many beagles were bought?", 90),
    ("The slope of the line is -22. What is the slope of the line?", -22),
    ("The tower is 1,250 feet tall. How tall is the tower?", 1250),
])
def test_reasoning_control_templates_are_read(prompt, answer):
    assert infer_task(prompt) == "reasoning_control"
    assert true_answer(prompt) == answer


def test_reasoning_control_is_graded():
    assert grade_one(BEAGLES, "90 beagles were bought.") == {
        "task": "reasoning_control", "answer": 90, "extracted": 90, "correct": True, "reason": None}
    assert grade_one(BEAGLES, "The dog breeder bought 90 beagles.")["correct"] is True
    assert grade_one(BEAGLES, "The answer is ninety.")["correct"] is True
    g = grade_one(BEAGLES, "The dog breeder bought 9 beagles.")
    assert (g["extracted"], g["correct"]) == (9, False)
    g = grade_one(BEAGLES, "90 beagles were bought.", "Reasoning Controls")
    assert (g["task"], g["correct"]) == ("reasoning_control", True)


def test_word_problems_and_factual_controls_are_not_reasoning_controls():
    assert infer_task("Tom has 3 apples and buys 4 more. How many apples does he have?") == "factual"
    assert infer_task("The planet Zog has a mountain called Wirtu which is 29,029 feet tall. What is the largest "
                      "mountain on the planet Zog?") == "factual_control"
    assert infer_task("What is the capital of France?") == "factual"
    with pytest.raises(ValueError, match="add an 'answer' column"):
        true_answer("Find the answer: 3 cats and 5 dogs live here. How many animals live here?")


def test_unreadable_row_is_reported_on_that_row_and_the_others_are_graded(tmp_path, capsys):
    from kit.cli import main

    rows = [{"id": "a", "prompt": ARITH, "completion": "The answer is 21."},
            {"id": "b", "prompt": "Who wrote Hamlet?", "completion": "Shakespeare"},
            {"id": "c", "prompt": BEAGLES, "completion": "90 beagles were bought."},
            {"id": "d", "prompt": SLOPE, "completion": "The slope is 43.", "task": "slopes"}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    buf = io.StringIO()
    assert grade_file(str(path), buf) == 4
    out = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    assert [o["correct"] for o in out] == [True, None, True, False]
    assert [o["reason"] for o in out][0::2] == [None, None]
    assert out[1]["reason"].startswith("line 2: no known answer") and "add an 'answer' column" in out[1]["reason"]
    assert out[1]["answer"] is None and out[2]["answer"] == 90 and out[3]["graded_as"] == "slope"
    # the command line prints every row, then names the rows it could not grade (exit 2)
    assert main(["grade", str(path)]) == 2
    captured = capsys.readouterr()
    assert [json.loads(ln)["correct"] for ln in captured.out.splitlines()] == [True, None, True, False]
    assert captured.err.count("\n") == 1 and "1 of 4 rows could not be graded" in captured.err
    assert "line 2" in captured.err and "Traceback" not in captured.err


def test_grade_dataframe_marks_an_unreadable_row_and_grades_the_rest():
    df = pd.DataFrame({"prompt": [ARITH, "Who wrote Hamlet?", BEAGLES],
                       "completion": ["The answer is 21.", "Shakespeare", "There were 91 beagles."],
                       "task": ["two-step arithmetic", None, float("nan")]})
    g = grade(df)
    assert list(g["correct"]) == [True, None, False]
    assert list(g["task"]) == ["arithmetic", "factual", "reasoning_control"]
    assert pd.isna(g["reason"][0]) and "add an 'answer' column" in g["reason"][1]


def _cli_error(args, capsys):
    from kit.cli import main

    code = main(args)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_grade_cli_file_errors_are_one_clear_line(tmp_path, capsys):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"prompt": "Café?", "completion": "x"}, ensure_ascii=False).encode("latin-1"))
    err = _cli_error(["grade", str(latin1)], capsys)
    assert "is not UTF-8" in err and "0xe9" in err and "line 1" in err and "save it as UTF-8" in err

    err = _cli_error(["grade", str(tmp_path)], capsys)
    assert "is a directory" in err and "JSON-lines file" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in _cli_error(["grade", str(empty)], capsys)
    empty.write_text("\n  \n")
    assert "is empty" in _cli_error(["grade", str(empty)], capsys)

    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "prompt": ARITH, "completion": "The answer is 21."})
    bad.write_text(good + "\n" + good + "\n\n" + '{"id": "c", "prompt": oops}\n' + good + "\n")
    err = _cli_error(["grade", str(bad)], capsys)  # nothing printed before the bad line is found
    assert "line 4: not a JSON object" in err and "nothing was graded" in err

    bad.write_text(good + "\n" + "[1, 2]\n")
    assert "line 2: expected a JSON object, got list" in _cli_error(["grade", str(bad)], capsys)


def test_grade_reads_utf8_with_bom_and_a_json_array(tmp_path):
    rows = [{"id": "a", "prompt": ARITH, "completion": "The answer is 21."},
            {"id": "b", "prompt": SLOPE, "completion": "The slope is -43."}]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps(rows, indent=2))
    for path in (bom, arr):
        buf = io.StringIO()
        assert grade_file(str(path), buf) == 2
        assert [json.loads(ln)["correct"] for ln in buf.getvalue().splitlines()] == [True, True]


# The paper's reasoning templates answered with working shown before the final answer (Command R style).
# (prompt, completion, expected extracted, expected correct); the final stated answer counts.
PAPER_TABLE = [
    (ARITH, "First, calculate the result inside the parentheses: 7 - 4 = 3. The result is 3.\n"
            "Then multiply 3 by 7 to get 21.", 21, True),
    (ARITH, "Step 1: Calculate (7 - 4) = 3\nStep 2: Multiply 3 by 7: 3 * 7 = 21\n\nSo, the answer is 21.", 21, True),
    (ARITH, "The answer is 21, as 7 - 4 = 3.", 21, True),
    (ARITH, "7 - 4 = 3\n3 * 7 = 21\n\nI hope this helps! Let me know if you have questions about step 2.", 21, True),
    (ARITH, "First, the result is 3.\nThen 3 * 7 = 21.", 21, True),
    (ARITH, "Let's break it down:\n1. (7 - 4) = 3\n2. 3 * 7 = 21\nTherefore, (7 - 4) * 7 = **21**.", 21, True),
    (ARITH, "The answer is twenty-one.", 21, True),
    (ARITH, "The answer is 18.\nWait, let me recompute: 7 - 4 = 3 and 3 * 7 = 21. The answer is 21.", 21, True),
    (ARITH, "7 - 4 = 3\n3 * 7 = 21\n\nThe expression (7 - 4) * 7 evaluates to 21.", 21, True),
    (ARITH, "(7 - 4) * 7 = 21, which is 3 times 7.", 21, True),
    (ARITH, "Step 1: 7 - 4 = 3\nStep 2: 3 * 7 = 24\nSo the final answer is 24.", 24, False),
    (ARITH, "First, 7 - 4 = 3.\nThen, 3 * 7 =", None, False),  # cut off: no final answer
    (PAPER_SLOPE,
     "To find the slope of a line passing through two points, we can use the formula:\n\n"
     "slope = (y2 - y1) / (x2 - x1)\n\nGiven points: (93, 28) and (76, 73)\n\nPlugging in the values:\n\n"
     "slope = (73 - 28) / (76 - 93)\nslope = 45 / -17\nslope = -2.65\n\n"
     "Therefore, the slope of the line passing through the points (93, 28) and (76, 73) is -2.65.", -2.65, True),
    (PAPER_SLOPE, "m = (73 - 28) / (76 - 93) = 45 / (-17) = -45/17", -45 / 17, True),
    (PAPER_SLOPE, "The slope is -45/17, or approximately -2.647.", -45 / 17, True),
    (PAPER_SLOPE, "The slope of the line is $-\\frac{45}{17}$.", -45 / 17, True),
    (PAPER_SLOPE, "The slope is $\\boxed{-\\frac{45}{17}}$.", -45 / 17, True),
    (PAPER_SLOPE, "Step 3: m = (73 - 28)/(76 - 93) = 45/-17.\nStep 4: Simplify: m = -45/17 ≈ -2.65.\n\n"
                  "So the slope is approximately -2.65.", -2.65, True),
    (PAPER_SLOPE, "The slope of the line is -45/17. This means that for every 17 units x decreases, "
                  "y increases by 45 units.", -45 / 17, True),
    (PAPER_SLOPE, "The slope is 45 / 17.", 45 / 17, False),  # the sign matters
    (PAPER_SLOPE, "The slope is approximately -2.7.", -2.7, False),  # not -45/17 rounded
    (PAPER_SLOPE, "Therefore, the slope of the line passing through the points (93, 28) and (76, 73) is -3.", -3, False),
    (PAPER_SLOPE, "The slope is (y2 - y1) / (x2 - x1) = (73 - 28) / (76 - 93).", None, False),  # never evaluated
    (PAPER_LINEAR,
     "To solve for x, we need to isolate x on one side of the equation.\n\n"
     "Step 1: Subtract 21 from both sides of the equation:\n5x + 21 - 21 = 91 - 21\n5x = 70\n\n"
     "Step 2: Divide both sides by 5:\n5x / 5 = 70 / 5\nx = 14\n\nTherefore, the solution is x = 14.", 14, True),
    (PAPER_LINEAR, "The value of x is 14. Check: 5 * 14 + 21 = 91", 14, True),
    (PAPER_LINEAR, "5x + 21 = 91\n5x = 70\nx = 14\n\nLet's verify: 5(14) + 21 = 70 + 21 = 91. Correct!", 14, True),
    (PAPER_LINEAR, "x = 14\n\nSo 5 * 14 + 21 = 91, which matches.", 14, True),
    (PAPER_LINEAR, "Step 1: 5x + 21 - 21 = 91 - 21 → 5x = 70\nStep 2: x = 70 ÷ 5 = 14", 14, True),
    (PAPER_LINEAR, "**Solution:**\n5x = 70\n**x = 14**", 14, True),
    (PAPER_LINEAR, "The answer is: x = 14", 14, True),
    (PAPER_LINEAR, "x = 13\nCheck: 5 * 13 + 21 = 86", 13, False),
    ("What is the slope of the line passing through the points (5, 3) and (5, 9)?",
     "x2 - x1 = 5 - 5 = 0, so the slope is undefined (a vertical line).", "undefined", True),
    ("What is the slope of the line passing through the points (5, 3) and (5, 9)?", "The slope is 6.", 6, False),
]


@pytest.mark.parametrize("prompt, completion, extracted, correct", PAPER_TABLE)
def test_paper_reasoning_completions_grade_as_a_careful_human(prompt, completion, extracted, correct):
    g = grade_one(prompt, completion)
    if isinstance(extracted, float):
        assert g["extracted"] == pytest.approx(extracted, abs=1e-9)
    else:
        assert g["extracted"] == extracted
    assert g["correct"] is correct


@pytest.mark.parametrize("ungraded", [False, True])
def test_the_kit_command_prints_everything_and_keeps_its_exit_status(tmp_path, ungraded):
    """``python -m kit`` ends the process at once after the command (``kit.cli.run``): what it printed must all
    arrive (more than a pipe's buffer here) and the exit status must be the command's."""
    import subprocess
    import sys

    rows = [{"id": f"r{i}", "prompt": ARITH, "completion": "The answer is 21."} for i in range(3000)]
    if ungraded:
        rows.append({"id": "x", "prompt": "Who wrote Hamlet?", "completion": "Shakespeare"})
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered then
    p = subprocess.run([sys.executable, "-m", "kit", "grade", str(path)], capture_output=True, text=True,
                       timeout=300, env=env)
    out = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert len(p.stdout) > 2**16 and len(out) == len(rows)
    assert [o["id"] for o in out] == [r["id"] for r in rows] and all(o["correct"] for o in out[:3000])
    assert p.returncode == (2 if ungraded else 0)
    assert ("error:" in p.stderr) == ungraded


def test_the_kit_command_flushes_what_it_printed(tmp_path):
    """The last lines a command prints (plain ``print`` into a pipe, block-buffered) reach the caller."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered then
    p = subprocess.run([sys.executable, "-m", "kit", "build-corpus", "--preset", "smoke", "--n-docs", "40",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"corpus: {tmp_path / 'c' / 'corpus.parquet'} (40 documents)"
    assert lines[1].startswith("sources: ") and sum(int(x.split()[-1]) for x in lines[1][9:].split(", ")) == 40
