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
free-form text: thousands separators, negative numbers and the Unicode minus, ``x = 70``, fractions and decimals
(a decimal rounded from a fractional slope counts), number words, markdown/LaTeX emphasis, working shown before
the answer and a verification line written after it.

Task names may be spelled as users write them (``slopes``, ``Linear equations``, ``two-step arithmetic``:
:func:`canonical_task`); an unknown name is inferred from the prompt. A row whose true answer cannot be known is
graded ``correct=None`` with a ``reason`` (:func:`grade`, :func:`grade_rows`) instead of stopping the file.
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
# Task names as users write them
# --------------------------------------------------------------------------------------------------------------

# Spellings of the six task names (compared after lower-casing, joining words with "_" and dropping plural "s").
TASK_ALIASES = {
    "factual": ("factual", "fact", "factual_question", "factual_query", "factual_recall", "fact_retrieval",
                "factual_knowledge"),
    "arithmetic": ("arithmetic", "two_step_arithmetic", "2_step_arithmetic", "twostep_arithmetic",
                   "two_step_arithmetic_problem", "arithmetic_problem", "arith", "two_step"),
    "slope": ("slope", "slope_of_a_line", "slope_of_line", "slope_of_the_line", "line_slope", "slope_calculation",
              "calculating_slope", "slope_problem"),
    "linear": ("linear", "linear_equation", "linear_eq", "solve_for_x", "linear_equation_problem",
               "solving_linear_equation"),
    "factual_control": ("factual_control", "fact_control", "control_factual", "factual_ctrl",
                        "factual_control_query"),
    "reasoning_control": ("reasoning_control", "control_reasoning", "reasoning_ctrl", "reasoning_control_query"),
}


def _task_key(name: str) -> str:
    words = re.split(r"[\s_\-]+", unicodedata.normalize("NFKC", name).strip().casefold())
    return "_".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words if w)


_TASK_BY_KEY = {_task_key(alias): task for task, aliases in TASK_ALIASES.items() for alias in aliases}


def canonical_task(name) -> Optional[str]:
    """The kit's name for a task as a user spelled it (``"Slopes"``, ``"linear equations"``, ``"two-step
    arithmetic"``, ...), or ``None`` for a missing or unknown name (then the task is inferred from the prompt)."""
    if not isinstance(name, str) or not name.strip():
        return None
    return _TASK_BY_KEY.get(_task_key(name))


def _missing(value) -> bool:
    """No answer given: ``None``, NaN (pandas) or an empty string."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# Reading a prompt: which task, and the true answer
# --------------------------------------------------------------------------------------------------------------

_NUM = r"[-−–]?\s?\d[\d,]*(?:\.\d+)?"
_POINT = re.compile(r"\(\s*([-−]?\d+(?:\.\d+)?)\s*,\s*([-−]?\d+(?:\.\d+)?)\s*\)")
_LINEAR = re.compile(r"([-−]?\d*)\s*\*?\s*x\s*(?:([+\-−])\s*(\d+))?\s*=\s*([-−]?\d+)")
_FIND_THE_ANSWER = re.compile(r"^\s*find the answer\s*:\s*", re.I)


def infer_task(prompt: str) -> str:
    """Guess the task of a prompt in the paper's (or the lab's) templates.

    Reasoning controls state a number and ask for it back (``The slope of the line is -22. What is the slope of the
    line?``, ``Find the answer: 90 beagles were bought by a dog breeder. How many beagles were bought?``).
    """
    p = _plain(prompt)
    low = p.lower()
    if re.search(r"the slope of the line is\s*" + _NUM, low) or re.search(r"find the answer:\s*there (are|is)", low):
        return "reasoning_control"
    find = bool(_FIND_THE_ANSWER.match(p))
    if find and _control_answer(p) is not None:
        return "reasoning_control"
    if "slope" in low and len(_POINT.findall(p)) >= 2:
        return "slope"
    if re.search(r"solve for x", low) or (_LINEAR.search(p) and "=" in p):
        return "linear"
    if re.search(r"calculate the answer|calculate:|compute", low) or _arith_expr(p) is not None:
        return "arithmetic"
    if find:
        return "reasoning_control"
    if re.search(r"\bplanet\b|\bfictional\b|\bimaginary\b", low):
        return "factual_control"
    if _control_answer(p) is not None:
        return "reasoning_control"
    return "factual"


_CTRL_NUM = re.compile(r"(?<![\w.])[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.,])[-+]?\d+(?:\.\d+)?(?![\d])")
_STOP = frozenset("the a an of in on at to for by with from and or is are was were be been be has have had does do "
                  "did how many much what which who whom whose there this that these those it its their his her "
                  "find answer total number".split())
_HOW_ADJ = ("tall", "long", "old", "far", "high", "big", "large", "heavy", "wide", "deep", "fast", "short")


def _stem(word: str) -> str:
    w = word.casefold().strip("'")
    for suf in ("ies", "es", "s"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: -len(suf)] + ("y" if suf == "ies" else "")
    return w


def _content_stems(text: str) -> set:
    return {_stem(w) for w in re.findall(r"[a-z][a-z'-]+", text.casefold()) if w not in _STOP and len(w) >= 3}


def _control_answer(prompt: str) -> Optional[Fraction]:
    """The number a reasoning control states and asks back (``None`` if the prompt is not one, or is ambiguous).

    The prompt is a context and a final question. ``How many beagles ...`` takes the number written before
    "beagles"; ``How tall ...`` the number before "tall"; ``What is the slope ...`` the number after "slope ... is";
    otherwise a context with a single number whose sentence shares a word with the question. Without the paper's
    ``Find the answer:`` prefix the context must state a single number (``Tom has 3 apples and buys 4 more`` is a
    word problem); with it, a single number in the context is read as the answer.
    """
    p = _plain(prompt).strip()
    find = bool(_FIND_THE_ANSWER.match(p))
    p = _FIND_THE_ANSWER.sub("", p)
    m = re.search(r"([^.?!\n]*\?)\s*$", p)
    if not m:
        return None
    question, context = m.group(1), p[: m.start(1)]
    nums = [(n.start(), n.end(), n.group(0)) for n in _CTRL_NUM.finditer(context)]
    if not nums:
        return None
    if not find and len({_to_fraction(s) for _, _, s in nums}) > 1:
        return None  # several numbers and no "Find the answer:": a word problem, not a control
    q = question.casefold()
    ctx = context.casefold()
    found = []

    def words_after(end: int, k: int) -> List[str]:  # the words that follow a number, up to the next number
        return re.findall(r"[a-z][a-z'-]*", re.split(r"\d", ctx[end:end + 60], maxsplit=1)[0])[:k]

    hm = re.search(r"\bhow (?:many|much)\s+([a-z][a-z'-]*)", q)
    ha = re.search(r"\bhow (" + "|".join(_HOW_ADJ) + r")\b", q)
    wm = re.search(r"\b(?:what|which)(?:'s| is| was| are| were)\s+(?:the|its|their|his|her)\s+([a-z][a-z' -]*)", q)
    if hm:
        want = _stem(hm.group(1))
        found = [s for a, e, s in nums if want in {_stem(w) for w in words_after(e, 3)}]
    elif ha:
        found = [s for a, e, s in nums if ha.group(1) in words_after(e, 3)]
    elif wm:
        subject = [w for w in re.findall(r"[a-z][a-z'-]*", wm.group(1)) if w not in _STOP]
        if subject:
            head = re.escape(subject[0])
            for mm in re.finditer(rf"\b{head}\w*\b[^.?!\n]{{0,60}}?\b(?:is|are|was|were|equals|of)\s*[:=]?\s*"
                                  rf"({_CTRL_NUM.pattern})", ctx):
                found.append(mm.group(1))
    if not found:
        distinct = {_to_fraction(s) for _, _, s in nums}
        if len(distinct) == 1:
            a = nums[0][0]
            sentence = context[context.rfind(".", 0, a) + 1: a + 200]
            if find or (_content_stems(sentence) & _content_stems(question)):
                found = [nums[0][2]]
    values = {_to_fraction(s) for s in found}
    return values.pop() if len(values) == 1 else None


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
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ValueError(f"not plain arithmetic: {expr!r}")

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
            if y == 0:
                raise ValueError(f"the expression {expr!r} divides by zero")
            return x / y
        raise ValueError(f"not plain arithmetic: {expr!r}")

    return ev(tree)


def parse_instance(prompt: str, task: Optional[str] = None):
    """The task instance a reasoning prompt asks about (``None`` when the prompt does not parse)."""
    task = canonical_task(task) or infer_task(prompt)
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


UNDEFINED = "undefined"  # the slope of a vertical line


def true_answer(prompt: str, task: Optional[str] = None, answer=None):
    """The correct answer: computed from the prompt for reasoning tasks and controls, else ``answer``.

    A reasoning prompt that cannot be read falls back to ``answer``; without one this raises ``ValueError``
    (the message says to add an ``answer`` column). The slope through two points with the same x is
    :data:`UNDEFINED`.
    """
    task = canonical_task(task) or infer_task(prompt)
    p = _plain(prompt)
    have = not _missing(answer)
    if task == "arithmetic":
        expr = _arith_expr(p)
        if expr is not None:
            try:
                return _number(_eval_arith(expr))
            except ValueError:
                if not have:
                    raise
        elif not have:
            raise ValueError(f"no arithmetic expression in the prompt {prompt!r}: add an 'answer' column")
    if task in ("slope", "linear"):
        inst = parse_instance(p, task)
        if inst is not None:
            if task == "slope" and inst.dx == 0:
                return UNDEFINED
            if task == "linear" and inst.a == 0:
                if not have:
                    raise ValueError(f"the equation in {prompt!r} has no single solution: add an 'answer' column")
            else:
                return _number(Fraction(inst.answer))
        elif not have:
            raise ValueError(f"could not read a {task} problem from the prompt {prompt!r}: add an 'answer' column")
    if task == "reasoning_control" and not have:
        v = _control_answer(p)
        if v is None:
            m = re.search(r"(?:is|are|has|costs|weighs)\s+(" + _NUM + r")", p)
            v = _to_fraction(m.group(1)) if m else None
        if v is not None:
            return _number(v)
        raise ValueError(f"could not read which number the reasoning control {prompt!r} asks for: add an 'answer' "
                         f"column")
    if task == "factual_control" and not have:
        m = re.search(r"called ([A-Z][\w'-]+)", p)
        if m:
            return m.group(1)
    if not have:
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
    """Drop markdown/LaTeX emphasis and normalise minus, division signs and spaces."""
    t = unicodedata.normalize("NFKC", str(text))
    t = t.replace("−", "-").replace("–", "-").replace("\u2212", "-").replace("÷", "/")
    t = re.sub(r"\\[dt]?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}", r"\1/\2", t)
    t = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", t)
    t = re.sub(r"\\boxed\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\\left|\\right|\\,|\\!|\\;", "", t)
    t = re.sub(r"\\\(|\\\)|\\\[|\\\]|\$|\\text\{([^{}]*)\}", lambda m: m.group(1) or "", t)
    t = t.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("\\approx", "≈")
    t = re.sub(r"\*\*|__|`", "", t)
    t = re.sub(r"(?<![\w)\s])\*(?=\S)|(?<=\S)\*(?![\w(\s])", "", t)  # *emphasis*, not a * b
    return t


def _to_fraction(s: str) -> Fraction:
    s = s.replace("−", "-").replace(" ", "").replace(",", "").replace("(", "").replace(")", "")
    if s.startswith("+"):
        s = s[1:]
    if "/" in s:
        n, d = s.split("/", 1)
        return Fraction(n) / Fraction(d)
    return Fraction(s)


def _number(v) -> Union[int, float]:
    f = Fraction(v)
    return int(f) if f.denominator == 1 else float(f)


_NUMBER_RE = re.compile(r"(?<![\w.])-?\s?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|(?<![\w.])-?\s?\d+(?:\.\d+)?(?:\s*/\s*-?\d+(?:\.\d+)?)?(?![\d])")


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


# A value: a number (thousands separators, decimals), or a fraction of two, with signs and parentheses.
_N = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SIMPLE_VALUE = re.compile(rf"([-+]?)\s*\(?\s*([-+]?\s?(?:{_N}))\s*\)?(?:\s*/\s*\(?\s*([-+]?\s?(?:{_N}))\s*\)?)?")
_CHAIN_CHARS = set("0123456789 \t.,+-*/()=≈×")
_APPROX = r"(?:approximately|approx\.?|about|roughly|around|nearly|~|≈)?[ \t]*"
_VERB = r"(?:is|was|=|≈|:|equals|equal\s+to|would\s+be|will\s+be|comes\s+to|becomes|of)"
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORD_NUM = re.compile(r"(?:(?:minus|negative)\s+)?(?:%s)(?:(?:\s+|-)(?:%s|hundred|thousand|and(?=\s)))*\b"
                       % ("|".join(_WORDS + _TENS), "|".join(_WORDS + _TENS)), re.I)
# "the answer is", "Answer:", "the final answer to (7 - 4) * 7 is", "the solution is x =": the completion's own
# statement of its answer. A newline may follow "Answer:" only.
_STRONG = re.compile(
    r"\b(?P<noun>final\s+answer|answer|solution|final\s+(?:result|value))\b"
    r"(?:\s+(?:to|of|for)\b[^\n=:]{0,60}?)?"
    r"[ \t]*(?P<verb>is|was|=|:|equals|would\s+be|will\s+be|comes\s+to|becomes)[ \t]*:?[ \t]*(?P<nl>\n[ \t]*)?"
    + _APPROX +
    r"(?:(?:x|m|slope)\s*=\s*)?", re.I)
# The task's own quantity stated: "the slope (of the line through ...) is", "m =", "x =", "the value of x is".
_PRIMARY = {
    "slope": re.compile(
        r"(?:\bslope\b(?:\s+of\s+(?:the|this|that|our|a)\s+(?:given\s+|straight\s+)?line\b"
        r"(?:[^\n=:,.;?!]|,(?=\s*-?\d)|\.(?=\d)){0,90}?)?|(?<![\w.])m)"
        r"[ \t]*" + _VERB + r"[ \t]*:?[ \t]*" + _APPROX + r"(?:m\s*=\s*)?", re.I),
    "linear": re.compile(r"(?:\bvalue\s+of\s+x|(?<![\w.])x)[ \t]*(?:is|=|≈|equals|is\s+equal\s+to|would\s+be|:)"
                         r"[ \t]*:?[ \t]*" + _APPROX, re.I),
}
# Any result: "= 21", "is 21", "to get 21", "evaluates to 21" (not "which is 3 times 7", an explanation).
_GENERIC = re.compile(
    r"(?:[=≈]|(?<!which )(?<!that )\b(?:is|are|was|were|equals?|gets?|got|gives?|yields?|makes?|results\s+in|"
    r"becomes?|obtain|leaves?|leaving|(?:evaluates|simplifies|reduces|comes(?:\s+out)?|equal)\s+to)\b"
    r"(?:\s+(?:us|you|me))?)[ \t]*" + _APPROX + r"(?=[-+(]?\s?\d)", re.I)
_VERIFY = re.compile(r"\b(?:check(?:ing)?|verif(?:y|ying|ication|ied)|double[- ]check\w*|confirm(?:ing)?|sanity|"
                     r"plug(?:ging)?\b[^.\n]{0,30}\bback|substitut\w*\b[^.\n]{0,30}\bback|proof)\b", re.I)
_ENUMERATOR = re.compile(r"^\s*(?:step\s*)?\d+\s*[.):]\s+|\bstep\s*\d+\s*[:.)]?", re.I | re.M)
_UNDEFINED_RE = re.compile(r"\b(?:undefined|not\s+defined|infinite|infinity|does\s+not\s+exist)\b", re.I)


def _word_number(s: str) -> Optional[int]:
    words = re.findall(r"[a-z]+", s.casefold())
    sign, total, cur = 1, 0, 0
    for w in words:
        if w in ("minus", "negative"):
            sign = -1
        elif w in _WORDS:
            cur += _WORDS.index(w)
        elif w in _TENS:
            cur += 20 + 10 * _TENS.index(w)
        elif w == "hundred":
            cur = max(cur, 1) * 100
        elif w == "thousand":
            total, cur = total + max(cur, 1) * 1000, 0
    return sign * (total + cur) if words else None


def _value_at(text: str, start: int, words: bool = False) -> Optional[Tuple[Fraction, str, int]]:
    """The value stated at ``text[start:]``: ``(value, as written, end)``.

    Reads an equation chain (``6 / 2 = 3``, ``45 / -17 ≈ -2.65``) on one line and takes its last member, which must
    be a number or a fraction; an unevaluated expression (``(73 - 28) / (76 - 93)``) states no value.
    """
    if words:
        w = _WORD_NUM.match(text, start)
        if w:
            v = _word_number(w.group(0))
            if v is not None:
                return Fraction(v), str(v), w.end()
    i = start
    while i < len(text) and text[i] in _CHAIN_CHARS:
        c = text[i]
        if c == "." and not (i + 1 < len(text) and text[i + 1].isdigit()):
            break  # a full stop, not a decimal point
        if c == "," and not (i + 1 < len(text) and text[i + 1].isdigit()):
            break
        i += 1
    parts = [x.strip() for x in re.split(r"[=≈]", text[start:i])]
    while len(parts) > 1 and not parts[-1]:
        parts.pop()  # "x = 355 / 5 =" (cut off): the last member written
    seg = parts[-1]
    while seg and (seg[-1] in "(+-*/×,." or (seg[-1] == ")" and seg.count(")") > seg.count("("))):
        seg = seg[:-1].rstrip()
    while seg.startswith("(") and seg.count("(") > seg.count(")"):
        seg = seg[1:].lstrip()
    if not seg or not re.search(r"\d", seg):
        return None
    m = _SIMPLE_VALUE.fullmatch(seg)
    if m:
        sign, num, den = m.groups()
        try:
            v = _to_fraction(num) / (_to_fraction(den) if den else 1)
        except (ValueError, ZeroDivisionError):
            return None
        return (-v if sign == "-" else v), seg, i
    if re.search(r"[\d)]\s*[-+*/×]\s*[-+]?\s*[\d(]", seg):
        return None  # an expression the completion did not evaluate
    n = _NUMBER_RE.search(seg)  # stray numbers ("2 1"): the first, as written
    if n is None:
        return None
    v = _parse_number(n.group(0))
    return (Fraction(v), n.group(0).strip(), i) if v is not None else None


def _candidates(text: str, task: str) -> List[Tuple[int, int, Fraction, str]]:
    """Every value the completion states: ``(rank, end, value, as written)``; rank 2 = an answer statement,
    1 = the task's quantity (slope, x), 0 = the result of any equation or "is"."""
    out = []
    for m in _STRONG.finditer(text):
        if m.group("noun").lower() == "solution" and (m.group("nl") or m.group("verb") == ":"):
            continue  # "Solution:" heads a block of working, it states no value
        if m.group("nl") and not m.group("noun").lower().endswith("answer"):
            continue
        v = _value_at(text, m.end(), words=True)
        if v is not None:
            out.append((2, v[2], v[0], v[1]))
    if task in _PRIMARY:
        for m in _PRIMARY[task].finditer(text):
            v = _value_at(text, m.end(), words=True)
            if v is not None:
                out.append((1, v[2], v[0], v[1]))
    for m in _GENERIC.finditer(text):
        v = _value_at(text, m.end())
        if v is not None:
            out.append((0, v[2], v[0], v[1]))
    return out


def _final_answer(completion: str, task: str) -> Optional[Tuple[Union[Fraction, str], str]]:
    """The completion's final answer: ``(value, as written)``, or ``None``.

    The last answer statement (``the answer is``, ``Answer:``, boxed) wins; else the last statement of the task's
    quantity (``the slope ... is``, ``m =``, ``x =``); else the result of the last equation or "is"; else the last
    number of the last line that has one. A check written after the answer (``Check: 14(7) + 1 = 99``,
    ``Let's verify``, ``Plugging back in``) is not read, unless an answer statement follows it.
    """
    raw = re.sub(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}", r" answer: \1 ", str(completion))
    text = _plain(raw).replace("✓", " ").replace("✔", " ").replace("✅", " ")
    cands = _candidates(text, task)
    for mv in _VERIFY.finditer(text):
        cut = max(text.rfind("\n", 0, mv.start()), text.rfind(". ", 0, mv.start()) + 1, 0)
        if any(end <= cut for _, end, _, _ in cands):
            if not any(rank == 2 and end > cut for rank, end, _, _ in cands):
                text = text[:cut]
                cands = [c for c in cands if c[1] <= cut]
            break
    if task == "slope":
        und = list(_UNDEFINED_RE.finditer(text))
        if und and not any(rank >= 1 and end > und[-1].start() for rank, end, _, _ in cands):
            return UNDEFINED, und[-1].group(0)
    if cands:
        top = max(rank for rank, _, _, _ in cands)
        _, end, v, written = max((c for c in cands if c[0] == top), key=lambda c: c[1])
        stop = re.compile(r"\.(?!\d)|[\n;!?]").search(text, end)
        rest = _ENUMERATOR.sub(" ", text[stop.end():] if stop else "")
        if top > 0 or not re.search(r"\d", rest):
            return v, written
        # no statement, and the text goes on past the sentence of its last result: read as before (the last number
        # of the last line), unless that line is an unfinished computation
    for line in reversed([ln for ln in text.splitlines() if ln.strip()]):
        line = _ENUMERATOR.sub(" ", line)
        nums = _NUMBER_RE.findall(line)
        if nums:
            if re.search(r"[=≈]\s*$", line):
                return None  # "Then, 3 * 7 =" (cut off)
            trail = re.search(r"[\d\s.,+\-*/()=≈×]*$", line.rstrip(" .!?:"))
            unevaluated = re.search(r"[\d)]\s*[-+*/×]\s*[-+]?\s*[\d(]", trail.group(0))
            if unevaluated and _value_at(line, trail.start()) is None:
                return None  # it ends in an expression it never evaluates
            v = _parse_number(nums[-1])
            if v is not None:
                return Fraction(v), nums[-1].strip()
    return None


def extract_answer(completion: str, task: str = "arithmetic") -> Optional[Union[int, float, str]]:
    """The final answer of a free-form completion (a number for numeric tasks; ``None`` if there is none).

    Order: the last explicit answer statement (``the answer is``, ``Answer:``, ``the final answer to ... is``,
    boxed), then the last statement of the task's quantity (``the slope of the line ... is``, ``m =``, ``x =``,
    ``the value of x is``), then the result of the last equation (``3 * 7 = 21``) or "is"/"gives"/"to get" clause,
    then the last number on the last line that has one. A statement's value is the end of its equation chain
    (``The slope is 6 / 2 = 3.`` states 3). A check after the answer (``Check: 7 * 14 + 1 = 99``, ``Let me
    verify``) does not replace the answer. Number words after an answer statement (``twenty-one``) are read.
    For a slope, ``undefined`` (or ``infinite``) as the last statement is returned as :data:`UNDEFINED`.
    """
    task = canonical_task(task) or task
    if task in ("factual", "factual_control"):
        return _plain(completion).strip() or None
    found = _final_answer(completion, task)
    if found is None:
        return None
    return found[0] if isinstance(found[0], str) else _number(found[0])


def _norm_text(s: str) -> str:
    s = unicodedata.normalize("NFKD", str(s)).encode("ascii", "ignore").decode().casefold()
    return re.sub(r"[^a-z0-9]+", " ", s).strip()


def _matches(written: str, truth: float) -> bool:
    """A decimal written with d places that is the true value rounded (or cut) to d places, within 2 %."""
    from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation

    m = re.fullmatch(r"[-+]?\s?[\d,]*\.(\d+)", written.replace(" ", ""))
    if not m or truth == 0:
        return False
    try:
        x = Decimal(written.replace(" ", "").replace(",", ""))
        t = Decimal(repr(float(truth)))
    except InvalidOperation:
        return False
    q = Decimal(1).scaleb(-len(m.group(1)))
    close = abs(x - t) <= abs(t) * Decimal("0.02")
    return close and x in (t.quantize(q, rounding=ROUND_HALF_UP), t.quantize(q, rounding=ROUND_DOWN))


def grade_one(prompt: str, completion: str, task: Optional[str] = None, answer=None,
              strict: bool = True) -> Dict[str, object]:
    """Grade one completion: ``{"task", "answer", "extracted", "correct", "reason"}``.

    ``task`` may be any spelling of a task name (:func:`canonical_task`); a missing or unknown name, or one whose
    template the prompt does not follow, is inferred from the prompt. When the true answer cannot be known (a
    question the kit cannot answer and no ``answer``), ``strict=True`` raises ``ValueError``; ``strict=False``
    returns ``correct=None`` with the reason.
    """
    declared = canonical_task(task)
    task = declared or infer_task(prompt)
    try:
        truth = true_answer(prompt, task, answer)
    except ValueError as err:
        alt = infer_task(prompt)
        truth = None
        if declared is not None and alt != task:
            try:
                truth, task = true_answer(prompt, alt, answer), alt
            except ValueError:
                pass
        if truth is None:
            if strict:
                raise
            extracted = None if task in ("factual", "factual_control") else extract_answer(completion, task)
            return {"task": task, "answer": None, "extracted": extracted, "correct": None, "reason": str(err)}
    if task in ("factual", "factual_control") or (isinstance(truth, str) and truth != UNDEFINED
                                                  and _parse_number(str(truth)) is None):
        aliases = [truth] if not isinstance(truth, (list, tuple)) else list(truth)
        aliases = [a for alias in aliases for a in str(alias).split("|")]
        comp = f" {_norm_text(completion)} "
        found = next((a for a in aliases if f" {_norm_text(a)} " in comp), None)
        return {"task": task, "answer": aliases[0], "extracted": found, "correct": found is not None, "reason": None}
    final = _final_answer(completion, task)
    extracted = None if final is None else (final[0] if isinstance(final[0], str) else _number(final[0]))
    if truth == UNDEFINED:
        return {"task": task, "answer": UNDEFINED, "extracted": extracted, "correct": extracted == UNDEFINED,
                "reason": None}
    t = _parse_number(str(truth)) if not isinstance(truth, (int, float)) else truth
    correct = (extracted is not None and not isinstance(extracted, str) and t is not None
               and (math.isclose(float(extracted), float(t), rel_tol=0, abs_tol=1e-6) or _matches(final[1], t)))
    return {"task": task, "answer": t, "extracted": extracted, "correct": bool(correct), "reason": None}


def grade(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``task`` (the kit's name; inferred where missing or unknown), ``answer``, ``extracted``, ``correct`` and
    ``reason`` columns. A row whose true answer cannot be known gets ``correct=None`` and the reason."""
    out = df.copy()
    rows = []
    for r in out.to_dict("records"):
        rows.append(grade_one(r["prompt"], r["completion"], r.get("task"), r.get("answer"), strict=False))
    for col in ("task", "answer", "extracted", "correct", "reason"):
        out[col] = [r[col] for r in rows]
    return out


def _read_rows(path: str) -> List[Tuple[str, dict]]:
    """``[(where, row)]`` of a query file (JSON lines, a JSON array or one object), all checked before any row is
    graded; ``where`` is ``"line 3"`` (or ``"item 3"`` of an array)."""
    from pathlib import Path

    from .errors import InputError

    fix = "pass a JSON-lines file: one object per line with string fields 'prompt' and 'completion'"
    p = Path(path)
    if not p.exists():
        raise InputError(f"queries file {path} does not exist")
    if p.is_dir():
        raise InputError(f"{path} is a directory, not a queries file; {fix}")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path} ({err.strerror or err}); {fix}")
    try:
        text = data.decode("utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8 "
                         f"(e.g. `iconv -f latin1 -t utf-8 {path} > fixed.jsonl`) and grade that")
    if not text.strip():
        raise InputError(f"{path} is empty; {fix}")
    items: List[Tuple[int, object]] = []
    problems: List[str] = []
    whole = None
    if text.lstrip()[:1] in ("[", "{"):  # one JSON array of rows, or one (pretty-printed) object
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise InputError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                                 f"nothing was graded; {fix}")
    if isinstance(whole, (list, dict)):
        items = list(enumerate(whole if isinstance(whole, list) else [whole], 1))
        where = "item"
    else:
        where = "line"
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((i, json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(f"line {i}: not a JSON object ({err.msg} at column {err.colno})")
    rows = []
    for i, row in items:
        if not isinstance(row, dict):
            problems.append(f"{where} {i}: expected a JSON object, got {type(row).__name__}")
            continue
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
        if missing:
            problems.append(f"{where} {i}: needs string fields 'prompt' and 'completion' (missing {missing})")
            continue
        rows.append((f"{where} {i}", row))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{path}: " + "; ".join(problems[:5]) + more + f" -- nothing was graded; {fix}")
    if not rows:
        raise InputError(f"{path} has no rows; {fix}")
    return rows


def grade_rows(path: str) -> List[dict]:
    """Read, check and grade a query file: each input row plus ``graded_as`` (the task the grader used),
    ``answer``, ``extracted``, ``correct`` and ``reason``; ``correct`` is ``None`` (and ``reason`` says why) for a
    row whose true answer cannot be known. Raises ``InputError`` before grading if any row is malformed."""
    out = []
    for where, row in _read_rows(path):
        g = grade_one(row["prompt"], row["completion"], row.get("task"), row.get("answer"), strict=False)
        row = dict(row)
        if _missing(row.get("task")):
            row["task"] = g["task"]
        row.update(graded_as=g["task"], answer=g["answer"] if g["answer"] is not None else row.get("answer"),
                   extracted=g["extracted"], correct=g["correct"],
                   reason=None if g["reason"] is None else f"{where}: {g['reason']}")
        out.append(row)
    return out


def ungraded_message(path: str, rows: Sequence[dict]) -> Optional[str]:
    """One line naming the rows that could not be graded (``None`` if all were)."""
    bad = [r["reason"] for r in rows if r.get("correct") is None]
    if not bad:
        return None
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return (f"{path}: {len(bad)} of {len(rows)} rows could not be graded (written with correct: null and a "
            f"'reason'): " + "; ".join(bad[:3]) + more)


def grade_file(path: str, stream=None) -> int:
    """``python -m kit grade Q.jsonl``: one JSON object per line on ``stream`` (input fields + graded_as, answer,
    extracted, correct, reason). The whole file is checked first; returns the number of rows written."""
    stream = stream or sys.stdout
    rows = grade_rows(path)
    for row in rows:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


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
    graded = [grade_one(r["question"], r["completion"], r.get("task"), r.get("answer"), strict=False)
              for r in q.to_dict("records")]
    q["extracted"] = [None if g["extracted"] is None else str(g["extracted"]) for g in graded]
    q["correct"] = [g["correct"] for g in graded]
    if any(g["reason"] for g in graded):  # a query whose true answer cannot be known: correct stays None
        q["reason"] = [g["reason"] for g in graded]
    return q


def accuracy(answered: pd.DataFrame) -> Dict[str, float]:
    """Share of correct completions per task (rows that could not be graded, ``correct`` None, left out)."""
    out = {}
    for t, g in answered.groupby("task", sort=False):
        known = [bool(v) for v in g["correct"] if not _missing(v)]
        out[t] = float(sum(known) / len(known)) if known else float("nan")
    return out
