"""The explorer's view of one query: its most and least influential documents, token by token (notebook 08).

:class:`Explorer` serves any scored run directory, not only the lab's. It reads each query's ranking from the
run's top-k table (``topk.parquet``, written by ``kit score``), never the whole score matrix, so a view of a
20,000-document run costs one small table read plus one scoring pass over the shown documents; the model of each
run is loaded once and kept. A view shows:

* the prompt and completion (and whether the grader found it correct, when known);
* the top and bottom ``n`` documents with rank, source and score (raw, per nat and normalised);
* every shown document's tokens highlighted by their share of the score, ``g_tᵀ P a_t`` (green raises the
  completion's probability, red lowers it; the shares sum to the document's raw score; hover for the value);
* a per-layer bar chart of each shown document's score (which MLP layers carry it);
* where the documents carry the lab world's labels, whether a document states the query's fact or demonstrates
  its procedure (:func:`kit.groundtruth.relevant_documents`); elsewhere that column is left out.

Document text is escaped so that nothing in it is taken for markup or typeset as maths (``$…$`` stays text).

As an app (``make explore``: Voilà serves notebook 08), the runs come from the environment (:func:`runs_from_env`,
``KIT_EXPLORE_RUNS``) and :func:`open_explorer` turns a missing or unscored run into one readable message.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import pandas as pd

from .errors import InputError

KINDS = ("raw", "per_nat", "normalized")
DEFAULT_RUNS = {"small": "data/runs/lab-small", "large": "data/runs/lab-large"}  # what `make figures` builds
ENV_RUNS = "KIT_EXPLORE_RUNS"  # the runs to explore (`make explore RUNS=...`)
ENV_APP = "KIT_EXPLORE_APP"  # set by `make explore`: the notebook shows only the interactive view, writes nothing
# (!important: notebook front ends, Voilà's included, right-align table cells with more specific rules)
STYLE = ("<style>.kit-explorer td,.kit-explorer th{text-align:left !important;vertical-align:top;padding:2px 6px}"
         ".kit-explorer .doc{white-space:pre-wrap;font-family:monospace;font-size:90%;text-align:left}"
         ".kit-explorer .layer{white-space:nowrap}.kit-explorer .bar{display:inline-block;height:9px}</style>")


def _text(s: str) -> str:
    """Escaped for HTML, with ``$`` as an entity so that notebook front ends do not typeset it as maths."""
    return html.escape(str(s)).replace("$", "&#36;")


def token_html(tokens: pd.DataFrame) -> str:
    """Each token as a span shaded by its share of the score (``tokens``: columns ``text``, ``score``)."""
    top = float(tokens["score"].abs().max()) or 1.0
    spans = []
    for t, s in zip(tokens["text"], tokens["score"]):
        alpha = min(abs(s) / top, 1.0) * 0.8
        colour = f"rgba(0,160,0,{alpha:.2f})" if s > 0 else f"rgba(220,0,0,{alpha:.2f})"
        shown = str(t).replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " ")
        spans.append(f'<span title="{s:.3g}" style="background:{colour}">{_text(shown)}</span>')
    return "".join(spans)


def layer_bars(per_layer: pd.DataFrame) -> str:
    """A horizontal bar per layer (``per_layer``: columns ``layer``, ``score``), green positive, red negative."""
    top = float(per_layer["score"].abs().max()) or 1.0
    rows = []
    for name, s in zip(per_layer["layer"], per_layer["score"]):
        width = int(round(80 * abs(s) / top))
        colour = "#2a9d3a" if s > 0 else "#d03030"
        short = str(name).replace("model.", "").replace("layers.", "L").replace(".mlp", "")
        rows.append(f'<div class="layer" title="{s:.4g}">'
                    f'<span style="display:inline-block;width:9em">{_text(short)}</span>'
                    f'<span class="bar" style="width:{width}px;background:{colour}"></span></div>')
    return "".join(rows)


class Explorer:
    """Views of the queries of one or more scored runs: ``Explorer({"large": "data/runs/lab-large"}).view(...)``."""

    def __init__(self, runs: Dict[str, Union[str, Path]]):
        from .pipeline import load_top_k, scored_documents, scores_dir

        if not runs:
            raise InputError("give at least one scored run directory")
        self.paths = {m: Path(p) for m, p in runs.items()}
        self.queries: Dict[str, pd.DataFrame] = {}
        self.documents: Dict[str, pd.DataFrame] = {}
        self.top: Dict[str, pd.DataFrame] = {}
        self._runs: Dict[str, object] = {}
        for m, p in self.paths.items():
            if not (p / "config.json").exists():
                raise InputError(f"{p} is not a run directory (no config.json); fit and score one with "
                                 "`python -m kit fit` and `python -m kit score`")
            self.queries[m] = pd.read_parquet(scores_dir(p) / "queries.parquet")
            docs = scored_documents(p)
            self.documents[m] = docs.set_index("id", drop=False)
            self.top[m] = load_top_k(p)

    def query_ids(self, model: str) -> List[str]:
        return self.queries[model]["id"].tolist()

    def default_query(self, model: str) -> str:
        """The first reasoning query (the paper's interest), else the first query."""
        q = self.queries[model]
        reasoning = q[q["task"].isin(["arithmetic", "slope", "linear"])] if "task" in q else q.iloc[:0]
        return str((reasoning if len(reasoning) else q)["id"].iloc[0])

    def _run(self, model: str):
        if model not in self._runs:
            from .pipeline import open_run

            self._runs[model] = open_run(self.paths[model], quiet=True)
        return self._runs[model]

    def picks(self, model: str, qid: str, n: int = 5, kind: str = "per_nat") -> pd.DataFrame:
        """The query's top and bottom ``n`` documents from the top-k table: side, rank, document, scores."""
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        t = self.top[model]
        ranking = "normalized" if kind == "normalized" else "raw"  # per nat ranks as raw: one constant per query
        part = t[(t["query"] == qid) & (t["ranking"] == ranking)]
        if part.empty:
            raise InputError(f"query {qid!r} is not in the scores of {self.paths[model]}; choose one of "
                             f"{', '.join(self.query_ids(model)[:5])}, …")
        return pd.concat([part[part["side"] == s].sort_values("rank").head(n) for s in ("top", "bottom")],
                         ignore_index=True)

    def relevant(self, model: str, qid: str, doc_ids: List[str]) -> Optional[Dict[str, bool]]:
        """``{document: states the query's fact / demonstrates its procedure}`` where the corpus is labelled."""
        docs = self.documents[model]
        if not any(c in docs.columns for c in ("facts", "procedure")):
            return None
        from .groundtruth import relevant_documents

        q = self.queries[model]
        sub = docs.loc[doc_ids].reset_index(drop=True)
        mask = relevant_documents(q[q["id"] == qid].reset_index(drop=True), sub)[0]
        return None if mask is None else dict(zip(doc_ids, map(bool, mask)))

    def view(self, model: str, qid: Optional[str] = None, n: int = 5, kind: str = "per_nat",
             detail: bool = True) -> str:
        """The HTML of one query's view (see the module docstring); ``detail=False`` skips the scoring pass that
        gives the token highlighting and per-layer bars."""
        from .pipeline import detailed_scores

        if model not in self.paths:
            raise InputError(f"unknown model {model!r}; choose one of {', '.join(self.paths)}")
        qid = qid or self.default_query(model)
        picks = self.picks(model, qid, n, kind)
        ids = picks["document"].tolist()
        q = self.queries[model].set_index("id").loc[qid]
        extra = detailed_scores(self.paths[model], [qid], ids, run=self._run(model)) if detail else None
        truth = self.relevant(model, qid, ids)
        label = {"factual": "states the fact", "arithmetic": "shows the procedure", "slope": "shows the procedure",
                 "linear": "shows the procedure"}.get(str(q.get("task", "")), "relevant")
        others = [k for k in KINDS if k != kind and k in picks.columns]  # the other score kinds, for comparison
        head = (["", "rank", f"<u>{kind}</u>"] + others + ["source"] + ([label] if truth is not None else [])
                + ["layers", "document"])
        rows = []
        for _, p in picks.iterrows():
            d = self.documents[model].loc[p["document"]]
            text = token_html(extra["per_token"][(qid, p["document"])]) if extra else _text(str(d.get("text", "")))
            bars = ""
            if extra:
                pl = extra["per_layer"]
                bars = layer_bars(pl[(pl["query"] == qid) & (pl["document"] == p["document"])])
            cells = ([p["side"], str(int(p["rank"])), f"<b>{p[kind]:.4g}</b>"] + [f"{p[k]:.4g}" for k in others]
                     + [_text(d.get("source", ""))])
            if truth is not None:
                cells.append("yes" if truth[p["document"]] else "")
            cells += [bars, f'<div class="doc">{text}</div>']
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        correct = q.get("correct")
        status = "" if correct is None or (isinstance(correct, float) and np.isnan(correct)) else \
            f", {'correct' if bool(correct) else 'wrong'}"
        note = (f"Top and bottom {n} of {len(self.documents[model]):,} documents by {kind} score (the other score "
                f"kinds beside it). "
                + ("Every shown document's tokens are highlighted by their share of its raw score (green raises "
                   "the completion's probability, red lowers it; hover for the value); the bars split the score "
                   "by layer." if extra else "No token highlighting (detail off)."))
        return (STYLE + f'<div class="kit-explorer"><h4>{_text(model)} · {_text(qid)} ({_text(q.get("task", ""))}'
                f'{status})</h4><p><b>prompt</b> <span class="doc">{_text(q["prompt"])}</span><br><b>completion</b> '
                f'<span class="doc">{_text(q["completion"])}</span></p><p><i>{note}</i></p><table><tr>'
                + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table></div>")


class SetupError(InputError):
    """An explorer that cannot start, shown as its message alone: Jupyter, Voilà and papermill print no traceback."""

    def _render_traceback_(self) -> List[str]:  # IPython shows these lines instead of a traceback
        return [f"\033[1;31m{self}\033[0m"]


def runs_from_env(default: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The runs to explore: ``KIT_EXPLORE_RUNS`` when set and not empty, else ``default``.

    It is a JSON object ``{"name": "run dir", ...}``, or run directories separated by spaces or commas, each either
    ``name=dir`` or a bare ``dir`` (named after its last path component)."""
    value = (os.environ if environ is None else environ).get(ENV_RUNS, "").strip()
    if not value:
        return dict(default)
    if value.startswith("{"):
        try:
            runs = json.loads(value)
        except json.JSONDecodeError as e:
            raise SetupError(f"{ENV_RUNS} is not valid JSON ({e}): {value!r}; write e.g. "
                             '{"small": "data/runs/lab-small"} or just data/runs/lab-small') from None
        if not isinstance(runs, dict) or not all(isinstance(v, str) for v in runs.values()):
            raise SetupError(f'{ENV_RUNS} must map names to run directories, e.g. {{"small": "data/runs/lab-small"}}')
        return {str(k): v for k, v in runs.items()}
    runs = {}
    for item in re.split(r"[\s,]+", value):
        name, _, path = item.rpartition("=")
        runs[name or Path(path).name] = path
    return runs


def app_mode(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether the notebook runs as the app (``make explore`` sets ``KIT_EXPLORE_APP=1``)."""
    return (os.environ if environ is None else environ).get(ENV_APP, "") not in ("", "0")


def open_explorer(runs: Mapping[str, Union[str, Path]]) -> Explorer:
    """:class:`Explorer` over ``runs``, or one :class:`SetupError` that says what to run when a run is missing."""
    how = ("point the explorer at scored runs of your own: make explore RUNS='{\"name\": \"path/to/run\"}' "
           f"(or set {ENV_RUNS})")
    missing = [str(p) for p in runs.values() if not (Path(p) / "config.json").exists()]
    if missing:
        default = {k: str(v) for k, v in runs.items()} == DEFAULT_RUNS
        first = ("run `make figures` first (it builds them), or " if default
                 else "fit and score them (`python -m kit fit`, `python -m kit score`), or ")
        raise SetupError(f"No scored run at {', '.join(missing)}: {first}{how}.")
    try:
        return Explorer(dict(runs))
    except (InputError, FileNotFoundError) as e:
        raise SetupError(f"The explorer cannot read its runs: {e}. Score them (`python -m kit score`), or {how}.") \
            from None
