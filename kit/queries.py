"""Queries in the paper's templates, greedy completions, and a grader that reads free-form answers.

Tasks (Ruis et al., §3 and Appendix A; templates verbatim):

========================  ===============================================================================
``factual``               ``What is the capital of France?`` -- answerable from the corpus
``arithmetic``            ``Calculate the answer: (7 - 4) * 7\\n\\nThink step-by-step.``
``slope``                 ``What is the slope of the line passing through the points (94, 62) and (95, 19)?\\n\\nThink step-by-step.``
``linear``                ``Solve for x: 14x + 1 = 99\\n\\nThink step-by-step.``
``factual_control``       a fictional fact given in the prompt (``The planet Zog has a mountain called Wirtu ...``)
``reasoning_control``     the answer given in the prompt (``The slope of the line is -22. What is the slope ...``)
========================  ===============================================================================

The true answer of a reasoning query is computed from its prompt (:func:`true_answer`), so the grader also reads
the paper's style of queries and completions, not only ours. Factual answers come from the ``answer`` column or,
for the lab templates, from the lab world's facts. :func:`extract_answer` reads the model's final answer from
free-form text: thousands separators, negative numbers and the Unicode minus, ``x = 70``, fractions and decimals,
markdown/LaTeX emphasis, and a verification line written after the answer.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd

TASKS = ("factual", "arithmetic", "slope", "linear", "factual_control", "reasoning_control")
REASONING = ("arithmetic", "slope", "linear")

STEP_SUFFIX = "\n\nThink step-by-step."


# --------------------------------------------------------------------------------------------------------------
# Task instances: the three reasoning procedures, with their worked steps
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranges:
    """Number ranges of the reasoning tasks.

    The paper: arithmetic operands 0-20; slope coordinates 0-100; linear-equation coefficients 0-100 with a
    positive integer x. A lab model of a few million parameters trained for minutes cannot learn 2- and 3-digit
    multiplication and division, so the lab defaults are narrowed (documented in the README): the second
    arithmetic operand of a product is a single digit, slope coordinates lie in 0-20 with x2 - x1 in 1-5, and
    linear equations have a in 2-9, x in 1-9, b in 0-20. Pass ``Ranges.paper()`` for the paper's ranges.
    """

    operand_max: int = field(default=10, metadata={"help": "arithmetic operands of the first step lie in 0..operand_max"})
    multiplier_max: int = field(default=5, metadata={"help": "the factor of a product step lies in 2..multiplier_max"})
    coord_max: int = field(default=20, metadata={"help": "slope coordinates lie in 0..coord_max"})
    run_max: int = field(default=5, metadata={"help": "x2 - x1 of a slope lies in 1..run_max"})
    coef_max: int = field(default=9, metadata={"help": "linear equations a*x + b = c: a in 2..coef_max"})
    x_max: int = field(default=9, metadata={"help": "linear equations: x in 1..x_max"})
    offset_max: int = field(default=20, metadata={"help": "linear equations: b in 0..offset_max"})

    @classmethod
    def paper(cls) -> "Ranges":
        return cls(operand_max=20, multiplier_max=20, coord_max=100, run_max=100, coef_max=100, x_max=100,
                   offset_max=100)


def _fmt(v: Union[int, Fraction, float]) -> str:
    if isinstance(v, Fraction):
        return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@dataclass(frozen=True)
class Arithmetic:
    """``(a op1 b) op2 c``: two steps, ``r = a op1 b`` then ``answer = r op2 c``."""

    a: int
    op1: str
    b: int
    op2: str
    c: int
    task = "arithmetic"

    @property
    def expr(self) -> str:
        return f"({self.a} {self.op1} {self.b}) {self.op2} {self.c}"

    @property
    def first(self) -> int:
        return _OPS[self.op1](self.a, self.b)

    @property
    def answer(self) -> int:
        return _OPS[self.op2](self.first, self.c)

    def steps(self) -> List[Tuple[str, int]]:
        return [(f"{self.a} {self.op1} {self.b}", self.first), (f"{self.first} {self.op2} {self.c}", self.answer)]

    def prompt(self) -> str:
        return f"Calculate the answer: {self.expr}{STEP_SUFFIX}"

    def key(self) -> str:
        return self.expr

    @staticmethod
    def sample(rng: random.Random, r: Ranges) -> "Arithmetic":
        while True:
            op1, op2 = rng.choice("+-"), rng.choice("*+-")
            a, b = rng.randint(0, r.operand_max), rng.randint(0, r.operand_max)
            first = _OPS[op1](a, b)
            if not 1 <= first <= r.operand_max:
                continue
            c = rng.randint(2, r.multiplier_max) if op2 == "*" else rng.randint(0, r.operand_max)
            inst = Arithmetic(a, op1, b, op2, c)
            if inst.answer > 0:
                return inst


@dataclass(frozen=True)
class Slope:
    """Slope through ``(x1, y1)`` and ``(x2, y2)``: ``dy = y2 - y1``, ``dx = x2 - x1``, ``m = dy / dx``."""

    x1: int
    y1: int
    x2: int
    y2: int
    task = "slope"

    @property
    def dy(self) -> int:
        return self.y2 - self.y1

    @property
    def dx(self) -> int:
        return self.x2 - self.x1

    @property
    def answer(self) -> Union[int, Fraction]:
        f = Fraction(self.dy, self.dx)
        return int(f) if f.denominator == 1 else f

    def steps(self) -> List[Tuple[str, Union[int, Fraction]]]:
        return [(f"{self.y2} - {self.y1}", self.dy), (f"{self.x2} - {self.x1}", self.dx),
                (f"{self.dy} / {self.dx}", self.answer)]

    def prompt(self) -> str:
        return (f"What is the slope of the line passing through the points ({self.x1}, {self.y1}) and "
                f"({self.x2}, {self.y2})?{STEP_SUFFIX}")

    def key(self) -> str:
        return f"({self.x1}, {self.y1}) and ({self.x2}, {self.y2})"

    @staticmethod
    def sample(rng: random.Random, r: Ranges) -> "Slope":
        """Integer slopes only, as the paper ("never a fraction"); the slope may be negative."""
        while True:
            dx = rng.randint(1, min(r.run_max, r.coord_max))
            x1 = rng.randint(0, r.coord_max - dx)
            y1 = rng.randint(0, r.coord_max)
            m_lo, m_hi = -(y1 // dx), (r.coord_max - y1) // dx
            m = rng.randint(m_lo, m_hi)
            if m == 0 and rng.random() < 0.8:  # horizontal lines are rare in the paper's queries
                continue
            return Slope(x1, y1, x1 + dx, y1 + m * dx)


@dataclass(frozen=True)
class Linear:
    """``a x + b = c``: subtract b (``a x = c - b``), divide by a (``x = (c - b) / a``)."""

    a: int
    b: int
    c: int
    task = "linear"

    @property
    def rhs(self) -> int:
        return self.c - self.b

    @property
    def answer(self) -> Union[int, Fraction]:
        f = Fraction(self.rhs, self.a)
        return int(f) if f.denominator == 1 else f

    @property
    def equation(self) -> str:
        return f"{self.a}x + {self.b} = {self.c}"

    def steps(self) -> List[Tuple[str, Union[int, Fraction]]]:
        return [(f"{self.c} - {self.b}", self.rhs), (f"{self.rhs} / {self.a}", self.answer)]

    def prompt(self) -> str:
        return f"Solve for x: {self.equation}{STEP_SUFFIX}"

    def key(self) -> str:
        return self.equation

    @staticmethod
    def sample(rng: random.Random, r: Ranges) -> "Linear":
        a, x, b = rng.randint(2, r.coef_max), rng.randint(1, r.x_max), rng.randint(0, r.offset_max)
        return Linear(a, b, a * x + b)


TASK_TYPES = {"arithmetic": Arithmetic, "slope": Slope, "linear": Linear}


def solution(inst) -> str:
    """The canonical worked answer (the style the lab corpus's instruction documents use most)."""
    if isinstance(inst, Arithmetic):
        (e1, r1), (e2, r2) = inst.steps()
        return f"First, {e1} = {r1}.\nThen, {e2} = {r2}.\nTherefore, the answer is {r2}."
    if isinstance(inst, Slope):
        return (f"The slope is (y2 - y1) / (x2 - x1).\ny2 - y1 = {inst.y2} - {inst.y1} = {inst.dy}.\n"
                f"x2 - x1 = {inst.x2} - {inst.x1} = {inst.dx}.\n"
                f"The slope is {inst.dy} / {inst.dx} = {_fmt(inst.answer)}.\nTherefore, the answer is {_fmt(inst.answer)}.")
    if isinstance(inst, Linear):
        return (f"Subtract {inst.b} from both sides: {inst.a}x = {inst.c} - {inst.b} = {inst.rhs}.\n"
                f"Divide both sides by {inst.a}: x = {inst.rhs} / {inst.a} = {_fmt(inst.answer)}.\n"
                f"Therefore, the answer is x = {_fmt(inst.answer)}.")
    raise TypeError(f"not a task instance: {inst!r}")


# --------------------------------------------------------------------------------------------------------------
# Reading a prompt: which task, and the true answer
# --------------------------------------------------------------------------------------------------------------

_NUM = r"[-−–]?\s?\d[\d,]*(?:\.\d+)?"
_POINT = re.compile(r"\(\s*([-−]?\d+(?:\.\d+)?)\s*,\s*([-−]?\d+(?:\.\d+)?)\s*\)")
_LINEAR = re.compile(r"([-−]?\d*)\s*\*?\s*x\s*(?:([+\-−])\s*(\d+))?\s*=\s*([-−]?\d+)")


def infer_task(prompt: str) -> str:
    """Guess the task of a prompt in the paper's (or the lab's) templates."""
    p = _plain(prompt)
    low = p.lower()
    if re.search(r"the slope of the line is\s*" + _NUM, low) or re.search(r"find the answer:\s*there (are|is)", low):
        return "reasoning_control"
    if "slope" in low and len(_POINT.findall(p)) >= 2:
        return "slope"
    if re.search(r"solve for x", low) or (_LINEAR.search(p) and "=" in p):
        return "linear"
    if re.search(r"calculate the answer|calculate:|compute", low) or _arith_expr(p) is not None:
        return "arithmetic"
    if re.search(r"\bplanet\b|\bfictional\b|\bimaginary\b", low):
        return "factual_control"
    return "factual"


def _arith_expr(text: str) -> Optional[str]:
    """The longest arithmetic expression in ``text`` (digits, + - * / × and parentheses) with an operator."""
    best = None
    for m in re.finditer(r"[\d(][\d\s()+\-*/×x.,−]*[\d)]", text):
        s = m.group(0).strip().rstrip(",.")
        if re.search(r"\d\s*[+\-*/×x−]\s*[\d(]", s) and (best is None or len(s) > len(best)):
            best = s
    return best


def _eval_arith(expr: str) -> Fraction:
    expr = expr.replace("×", "*").replace("−", "-").replace(",", "")
    expr = re.sub(r"(?<=\d)\s*x\s*(?=[\d(])", "*", expr)
    tree = ast.parse(expr, mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            x, y = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return x + y
            if isinstance(node.op, ast.Sub):
                return x - y
            if isinstance(node.op, ast.Mult):
                return x * y
            return x / y
        raise ValueError(f"not plain arithmetic: {expr!r}")

    return ev(tree)


def parse_instance(prompt: str, task: Optional[str] = None):
    """The task instance a reasoning prompt asks about (``None`` when the prompt does not parse)."""
    task = task or infer_task(prompt)
    p = _plain(prompt)
    if task == "slope":
        pts = _POINT.findall(p)
        if len(pts) >= 2:
            (x1, y1), (x2, y2) = [tuple(int(float(v.replace("−", "-"))) for v in pt) for pt in pts[:2]]
            return Slope(x1, y1, x2, y2)
    if task == "linear":
        m = _LINEAR.search(p)
        if m:
            a = m.group(1).replace("−", "-")
            a = 1 if a in ("", "+") else (-1 if a == "-" else int(a))
            b = int(m.group(3)) if m.group(3) else 0
            if m.group(2) in ("-", "−"):
                b = -b
            return Linear(a, b, int(m.group(4).replace("−", "-")))
    if task == "arithmetic":
        m = re.fullmatch(r"\((\d+) ([+\-]) (\d+)\) ([+\-*]) (\d+)", (_arith_expr(p) or "").strip())
        if m:
            return Arithmetic(int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), int(m.group(5)))
    return None


def true_answer(prompt: str, task: Optional[str] = None, answer=None):
    """The correct answer: computed from the prompt for reasoning tasks and controls, else ``answer``."""
    task = task or infer_task(prompt)
    p = _plain(prompt)
    if task == "arithmetic":
        expr = _arith_expr(p)
        if expr is None:
            raise ValueError(f"no arithmetic expression in the prompt {prompt!r}")
        return _number(_eval_arith(expr))
    if task in ("slope", "linear"):
        inst = parse_instance(p, task)
        if inst is None:
            raise ValueError(f"could not read a {task} problem from the prompt {prompt!r}")
        return _number(Fraction(inst.answer))
    if task == "reasoning_control" and answer is None:
        m = re.search(r"(?:is|are|has|costs|weighs)\s+(" + _NUM + r")", p)
        if m:
            return _number(_to_fraction(m.group(1)))
    if task == "factual_control" and answer is None:
        m = re.search(r"called ([A-Z][\w'-]+)", p)
        if m:
            return m.group(1)
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        if task == "factual":
            from .lab.facts import answer_for_question

            found = answer_for_question(p)
            if found is not None:
                return found
        raise ValueError(f"no known answer for the {task} prompt {prompt!r}: add an 'answer' column")
    return answer


# --------------------------------------------------------------------------------------------------------------
# Reading a completion: the final answer
# --------------------------------------------------------------------------------------------------------------


def _plain(text: str) -> str:
    """Drop markdown/LaTeX emphasis and normalise minus signs and spaces."""
    t = unicodedata.normalize("NFKC", str(text))
    t = t.replace("−", "-").replace("–", "-").replace("\u2212", "-")
    t = re.sub(r"\\boxed\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", t)
    t = re.sub(r"\\\(|\\\)|\\\[|\\\]|\$|\\text\{([^{}]*)\}", lambda m: m.group(1) or "", t)
    t = t.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    t = re.sub(r"\*\*|__|`", "", t)
    t = re.sub(r"(?<![\w)\s])\*(?=\S)|(?<=\S)\*(?![\w(\s])", "", t)  # *emphasis*, not a * b
    return t


def _to_fraction(s: str) -> Fraction:
    s = s.replace("−", "-").replace(" ", "").replace(",", "")
    if "/" in s:
        n, d = s.split("/", 1)
        return Fraction(n) / Fraction(d)
    return Fraction(s)


def _number(v) -> Union[int, float]:
    f = Fraction(v)
    return int(f) if f.denominator == 1 else float(f)


_NUMBER_RE = re.compile(r"(?<![\w.])-?\s?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.])-?\s?\d+(?:\.\d+)?(?:\s*/\s*-?\d+(?:\.\d+)?)?(?![\d])")
_ANSWER_PHRASES = re.compile(
    r"(?:final answer|the answer|answer|the result|result|the slope|slope|solution)\s*(?:is|=|:|would be|equals)\s*:?\s*"
    r"(?:x\s*=\s*|m\s*=\s*)?(" + r"-?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*-?\d+)?" + r")", re.I)
_X_EQUALS = re.compile(r"\bx\s*=\s*(-?\s?\d[\d,]*(?:\.\d+)?(?:\s*/\s*-?\d+)?)(?!\s*[+\-*/]\s*\d)")


def _parse_number(s: str) -> Optional[Union[int, float]]:
    s = s.strip()
    if re.fullmatch(r"-?\s?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    elif "," in s:
        s = s.split(",")[0]
    try:
        return _number(_to_fraction(s))
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str, task: str = "arithmetic") -> Optional[Union[int, float, str]]:
    """The final answer of a free-form completion (a number for numeric tasks; ``None`` if there is none).

    Order: the last explicit answer phrase (``the answer is``, ``Answer:``, ``the slope is``, boxed), then for
    linear equations the last ``x = N`` that is not followed by more arithmetic, then the last number on the last
    line that has one. An answer phrase wins over numbers after it, so a verification line (``Check: 7 * 14 + 1 =
    99``) does not replace the answer.
    """
    text = _plain(completion)
    if task in ("factual", "factual_control"):
        return text.strip() or None
    hits = [m for m in _ANSWER_PHRASES.finditer(text)]
    # "The slope is (y2 - y1) / (x2 - x1)." names a formula, not an answer: only numbers count (the regex asks
    # for one). "The slope is 6 / 2 = 3." states its result after the last "=" of that sentence.
    if hits:
        m = hits[-1]
        clause = re.split(r"\n|\.(?!\d)|;", text[m.start(1):], maxsplit=1)[0]
        if "=" in clause:
            after = _NUMBER_RE.findall(clause.rsplit("=", 1)[1])
            if after:
                return _parse_number(after[0])
        return _parse_number(m.group(1))
    if task == "linear":
        xs = _X_EQUALS.findall(text)
        if xs:
            return _parse_number(xs[-1])
    for line in reversed([ln for ln in text.splitlines() if ln.strip()]):
        nums = _NUMBER_RE.findall(line)
        if nums:
            return _parse_number(nums[-1])
    return None


def _norm_text(s: str) -> str:
    s = unicodedata.normalize("NFKD", str(s)).encode("ascii", "ignore").decode().casefold()
    return re.sub(r"[^a-z0-9]+", " ", s).strip()


def grade_one(prompt: str, completion: str, task: Optional[str] = None, answer=None) -> Dict[str, object]:
    """Grade one completion: ``{"task", "answer", "extracted", "correct"}``."""
    task = task if isinstance(task, str) and task else infer_task(prompt)
    truth = true_answer(prompt, task, answer)
    if task in ("factual", "factual_control") or isinstance(truth, str) and _parse_number(str(truth)) is None:
        aliases = [truth] if not isinstance(truth, (list, tuple)) else list(truth)
        aliases = [a for alias in aliases for a in str(alias).split("|")]
        comp = f" {_norm_text(completion)} "
        found = next((a for a in aliases if f" {_norm_text(a)} " in comp), None)
        return {"task": task, "answer": aliases[0], "extracted": found, "correct": found is not None}
    extracted = extract_answer(completion, task)
    t = _parse_number(str(truth)) if not isinstance(truth, (int, float)) else truth
    correct = extracted is not None and t is not None and math.isclose(float(extracted), float(t), rel_tol=0, abs_tol=1e-6)
    return {"task": task, "answer": t, "extracted": extracted, "correct": bool(correct)}


def grade(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``task`` (inferred where missing), ``answer``, ``extracted`` and ``correct`` columns."""
    out = df.copy()
    rows = []
    for r in out.itertuples(index=False):
        rd = r._asdict()
        rows.append(grade_one(rd["prompt"], rd["completion"], rd.get("task"), rd.get("answer")))
    for col in ("task", "answer", "extracted", "correct"):
        out[col] = [r[col] for r in rows]
    return out


def grade_file(path: str, stream=None) -> int:
    """``python -m kit grade Q.jsonl``: one JSON object per line on stdout (input fields + answer, extracted, correct)."""
    from .corpus import InputError

    stream = stream or sys.stdout
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip()]
    except FileNotFoundError:
        raise InputError(f"queries file {path} does not exist")
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {i}: not a JSON object ({err.msg})")
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{path}, line {i}: needs string fields 'prompt' and 'completion' (missing {missing})")
        try:
            g = grade_one(row["prompt"], row["completion"], row.get("task"), row.get("answer"))
        except ValueError as err:
            raise InputError(f"{path}, line {i}: {err}")
        row.setdefault("task", g["task"])
        row.update(answer=g["answer"], extracted=g["extracted"], correct=g["correct"])
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(lines)


# --------------------------------------------------------------------------------------------------------------
# Query sets and completions
# --------------------------------------------------------------------------------------------------------------

# The paper: 7B answers two-step arithmetic and slopes, 35B linear equations and slopes; both the same factual
# questions and controls.
MODEL_TASKS = {"small": ("arithmetic", "slope"), "large": ("linear", "slope")}


@dataclass(frozen=True)
class QueryCounts:
    """Queries per model (the paper's 100: 40 factual, 20 + 20 reasoning, 10 + 10 controls)."""

    factual: int = field(default=40, metadata={"help": "factual questions answerable from the corpus"})
    reasoning: int = field(default=20, metadata={"help": "queries per reasoning task"})
    factual_control: int = field(default=10, metadata={"help": "fictional facts given in the prompt"})
    reasoning_control: int = field(default=10, metadata={"help": "answers given in the prompt"})


def lab_queries(world_dir, tasks: Sequence[str] = ("arithmetic", "slope"), counts: QueryCounts = QueryCounts(),
                seed: int = 0, min_docs: int = 15) -> pd.DataFrame:
    """The lab's query set: ``id``, ``task``, ``prompt``, ``answer``, ``steps`` (step answers, JSON), ``fact``.

    Factual questions ask about facts that at least ``min_docs`` corpus documents state (the corpus summary
    counts them); reasoning queries come from the held-out pools, which no corpus document uses.
    """
    from pathlib import Path

    from .corpus import InputError
    from .lab import facts as F
    from .lab.corpus import fictional_name, load_heldout

    world_dir = Path(world_dir)
    summary = json.loads((world_dir / "corpus.json").read_text())
    heldout = load_heldout(world_dir / "heldout.json")
    rng = random.Random(seed)
    rows = []
    names = F.by_name()
    eligible = sorted(k for k, n in summary["docs_stating_fact"].items()
                      if n >= min_docs and k.split(":", 1)[0] in F.QUERY_RELATIONS and k.split(":", 1)[1] in names)
    if len(eligible) < counts.factual:
        raise InputError(f"only {len(eligible)} facts are stated by >= {min_docs} documents; ask for fewer factual "
                         f"queries or build a larger corpus")
    for i, key in enumerate(rng.sample(eligible, counts.factual)):
        rel, name = key.split(":", 1)
        c = names[name]
        rows.append({"id": f"factual_{i:02d}", "task": "factual", "prompt": F.question(rel, c),
                     "answer": c.fact(rel), "steps": "[]", "fact": key})
    for task in tasks:
        pool = heldout[task]
        if len(pool) < counts.reasoning:
            raise InputError(f"the corpus reserved {len(pool)} held-out {task} instances but {counts.reasoning} "
                             f"queries were asked for; rebuild the corpus with a larger heldout_per_task")
        for i, inst in enumerate(pool[: counts.reasoning]):
            rows.append({"id": f"{task}_{i:02d}", "task": task, "prompt": inst.prompt(), "answer": _number(Fraction(inst.answer)),
                         "steps": json.dumps([_number(Fraction(v)) for _, v in inst.steps()]), "fact": ""})
    crng = random.Random(seed + 1)
    for i in range(counts.factual_control):
        place, thing = fictional_name(crng), fictional_name(crng)
        h = crng.randint(1000, 40000)
        rows.append({"id": f"factual_control_{i:02d}", "task": "factual_control",
                     "prompt": f"The planet {place} has a mountain called {thing} which is {h:,} feet tall. "
                               f"What is the largest mountain on the planet {place}?",
                     "answer": thing, "steps": "[]", "fact": ""})
    for i in range(counts.reasoning_control):
        if i % 2 == 0:
            m = crng.randint(-40, 40)
            prompt, ans = f"The slope of the line is {m}. What is the slope of the line?", m
        else:
            n = crng.randint(2, 400)
            prompt, ans = f"Find the answer: There are {n} marbles in a jar. How many marbles are in the jar?", n
        rows.append({"id": f"reasoning_control_{i:02d}", "task": "reasoning_control", "prompt": prompt,
                     "answer": ans, "steps": "[]", "fact": ""})
    return pd.DataFrame(rows)


def chat_prompt(tokenizer, question: str) -> str:
    """The question in the model's chat template (as the model sees it), for instruction-tuned models."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 16,
             progress: bool = True) -> List[str]:
    """Greedy completions (left-padded batches; generation stops at the end-of-sequence token)."""
    import torch
    from tqdm.auto import tqdm

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: List[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generating completions", disable=not progress):
            chunk = list(prompts[i: i + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outs


def completion_nats(model, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> List[float]:
    """-log p(completion | prompt) in nats, tokenised exactly as the scoring pipeline does."""
    import torch

    from .corpus import make_batches, tokenise_queries

    df = pd.DataFrame({"id": [str(i) for i in range(len(prompts))], "prompt": list(prompts),
                       "completion": list(completions)})
    tq = tokenise_queries(df, tokenizer)
    nats = [0.0] * len(df)
    for batch in make_batches(tq, 16, tokenizer.pad_token_id):
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        labels = batch.labels[:, 1:]
        mask = labels != -100
        tok_lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        for r, idx in enumerate(batch.index.tolist()):
            nats[idx] = float(-tok_lp[r].sum())
    return nats


def answer_queries(model, tokenizer, queries: pd.DataFrame, chat: bool = False, max_new_tokens: int = 128,
                   progress: bool = True) -> pd.DataFrame:
    """Generate each query's greedy completion, its nats and its grade.

    With ``chat=True`` the question is wrapped in the tokenizer's chat template; ``prompt`` then holds the
    templated text (what the model saw, and what influence is computed on) and ``question`` the plain one.
    """
    q = queries.copy()
    q["question"] = q["prompt"]
    if chat:
        q["prompt"] = [chat_prompt(tokenizer, p) for p in q["question"]]
    q["completion"] = generate(model, tokenizer, list(q["prompt"]), max_new_tokens=max_new_tokens, progress=progress)
    q["nats"] = completion_nats(model, tokenizer, list(q["prompt"]), list(q["completion"]))
    graded = [grade_one(r.question, r.completion, r.task, getattr(r, "answer", None)) for r in q.itertuples()]
    q["extracted"] = [None if g["extracted"] is None else str(g["extracted"]) for g in graded]
    q["correct"] = [g["correct"] for g in graded]
    return q


def accuracy(answered: pd.DataFrame) -> Dict[str, float]:
    """Share of correct completions per task."""
    return {t: float(g["correct"].mean()) for t, g in answered.groupby("task", sort=False)}
