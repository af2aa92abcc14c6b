"""The grader: true answers computed from prompts, final answers read from free-form completions."""

import io
import json

import pandas as pd
import pytest

from kit.queries import (Arithmetic, Linear, Ranges, Slope, grade, grade_file, grade_one,
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
