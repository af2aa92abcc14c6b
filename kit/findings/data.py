"""What every finding reads from a run directory: scores, queries and documents, aligned.

A run directory (``kit fit`` + ``kit score``) is enough; the lab world's ground-truth columns (``kind``,
``facts``, ``procedure``) are used when the documents carry them and skipped otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..corpus import InputError
from ..queries import REASONING

#: The paper's order of query groups in its figures (factual | arithmetic, linear | slopes | controls).
TASK_ORDER = ("factual", "arithmetic", "linear", "slope", "factual_control", "reasoning_control")
#: The eight sources of the paper's pretraining sample, in its figure order.
SOURCES = ("arxiv_markdown", "code", "general_knowledge", "math_and_trivia", "multilingual", "stackexchange",
           "webdata", "wiki")


def group_of(task: str) -> str:
    """``factual`` | ``reasoning`` (arithmetic, slopes, linear equations) | ``control`` | ``other``."""
    if task == "factual":
        return "factual"
    if task in REASONING:
        return "reasoning"
    if task.endswith("control"):
        return "control"
    return "other"


@dataclass
class RunData:
    """One model's scores with its queries and documents, rows and columns aligned.

    ``scores``: ``(n_queries, n_documents)`` float64, of the kind named in ``kind``.
    """

    name: str
    path: str
    kind: str
    scores: np.ndarray
    queries: pd.DataFrame
    documents: pd.DataFrame
    config_hash: str

    @property
    def tasks(self) -> np.ndarray:
        return self.queries["task"].to_numpy()

    def order(self) -> np.ndarray:
        """Row order of the paper's figures: by task group (:data:`TASK_ORDER`), then query id."""
        rank = {t: i for i, t in enumerate(TASK_ORDER)}
        key = self.queries["task"].map(lambda t: rank.get(t, len(rank)))
        return np.lexsort((self.queries["id"].to_numpy(), key.to_numpy()))


def load_run(run: Union[str, Path], name: Optional[str] = None, kind: str = "per_nat") -> RunData:
    """Read a scored run directory. ``kind``: ``per_nat`` (the paper's default), ``raw`` or ``normalized``."""
    from ..pipeline import load_scores, scored_documents, scores_dir

    run = Path(run)
    if not (run / "config.json").exists():
        raise InputError(f"{run} is not a run directory (no config.json); create one with `python -m kit fit`")
    sdir = scores_dir(run)
    df = load_scores(run, kind=kind)
    queries = pd.read_parquet(sdir / "queries.parquet")
    docs = scored_documents(run)
    if "correct" not in queries.columns:  # grade what can be graded from the prompt alone
        from ..queries import grade

        try:
            queries["correct"] = grade(queries)["correct"].to_numpy()
        except Exception:  # noqa: BLE001 - an ungradable user query set keeps correct unknown
            queries["correct"] = np.nan
    conf = json.loads((run / "config.json").read_text())
    key = conf.get("latest_scores", "")
    return RunData(name=name or run.name, path=str(run), kind=kind, scores=df.to_numpy(dtype=np.float64),
                   queries=queries.reset_index(drop=True), documents=docs.reset_index(drop=True),
                   config_hash=f"{conf.get('factor_key', '')}/{key}")


def from_arrays(scores: np.ndarray, tasks: Sequence[str], sources: Optional[Sequence[str]] = None,
                texts: Optional[Sequence[str]] = None, name: str = "planted", **query_cols) -> RunData:
    """A :class:`RunData` built from arrays (tests with planted structure, users' own matrices)."""
    scores = np.asarray(scores, dtype=np.float64)
    Q, D = scores.shape
    if len(tasks) != Q:
        raise InputError(f"{len(tasks)} tasks for {Q} score rows")
    queries = pd.DataFrame({"id": [f"q{i:03d}" for i in range(Q)], "task": list(tasks), **query_cols})
    docs = pd.DataFrame({"id": [f"d{j:05d}" for j in range(D)]})
    docs["source"] = list(sources) if sources is not None else "unknown"
    if texts is not None:
        docs["text"] = list(texts)
    return RunData(name=name, path="", kind="planted", scores=scores, queries=queries, documents=docs,
                   config_hash="planted")


def pair_runs(a: RunData, b: RunData) -> tuple[List[int], List[int], np.ndarray, np.ndarray]:
    """Queries two runs share (same prompt) and the column indices of the documents they share."""
    pa = {p: i for i, p in enumerate(a.queries["prompt"])} if "prompt" in a.queries else {}
    rows_a, rows_b = [], []
    for j, p in enumerate(b.queries.get("prompt", pd.Series(dtype=str))):
        if p in pa:
            rows_a.append(pa[p])
            rows_b.append(j)
    ids_b = {d: j for j, d in enumerate(b.documents["id"])}
    cols = [(i, ids_b[d]) for i, d in enumerate(a.documents["id"]) if d in ids_b]
    ca = np.array([c[0] for c in cols], dtype=int)
    cb = np.array([c[1] for c in cols], dtype=int)
    return rows_a, rows_b, ca, cb


#: Results that are pure functions of a corpus's texts, for the last corpus seen (both lab models score the same
#: corpus, and several views of one finding search or characterise the same documents).
_CORPUS: Dict[str, object] = {"key": None, "memo": {}}


def text_of(x) -> str:
    """A document's text as a string (``""`` for a missing one)."""
    return "" if x is None or (isinstance(x, float) and x != x) else str(x)


def per_corpus(texts: Sequence[str], kind: str, compute: Callable[[], object]):
    """``compute()``, remembered under ``kind`` until texts other than ``texts`` are seen (keyed by their hash)."""
    key = hashlib.blake2b("\x00".join(texts).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    if _CORPUS["key"] != key:
        _CORPUS.update(key=key, memo={})
    memo = _CORPUS["memo"]
    if kind not in memo:
        memo[kind] = compute()
    return memo[kind]


def k_from_fraction(fraction: float, n: int) -> int:
    """``max(1, round(fraction × n))``: the paper's cuts are fractions of its 5M-document sample."""
    return max(1, int(round(fraction * n)))


def as_list(x) -> list:
    """A ground-truth cell (list, numpy array, JSON string or None) as a Python list."""
    if x is None:
        return []
    if isinstance(x, float) and np.isnan(x):
        return []
    if isinstance(x, str):
        x = x.strip()
        if not x:
            return []
        try:
            v = json.loads(x)
            return v if isinstance(v, list) else [v]
        except json.JSONDecodeError:
            return [x]
    return list(x)


def jsonable(x, keep_nan: bool = False):
    """Python scalars, lists and dicts only (numpy scalars and arrays converted, recursively), so that ``json.dumps``
    takes the result; NaN and ±inf become ``None`` unless ``keep_nan``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v, keep_nan) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, keep_nan) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist(), keep_nan)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if keep_nan or np.isfinite(x) else None
    return x


__all__ = ["TASK_ORDER", "SOURCES", "group_of", "RunData", "load_run", "from_arrays", "pair_runs",
           "k_from_fraction", "as_list", "jsonable"]
