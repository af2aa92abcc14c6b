"""The paper's five findings as pure functions of scored run directories.

=====  ==========================  =====================================================================
F1     :mod:`.correlations`        scores correlate between queries of the same reasoning task
F2     :mod:`.magnitude`           reasoning relies less on individual documents (influence per nat, power laws)
F3     :mod:`.answers`             factual answers sit in the top documents, reasoning answers almost never
F4     :mod:`.procedures`          top documents for reasoning demonstrate the procedure (code, worked maths)
F5     :mod:`.sources`             code / StackExchange / maths over-represented (multiplier vs the data)
=====  ==========================  =====================================================================

:func:`compute` runs all of them on one or more runs (one per model) and returns a JSON-able dict;
:func:`write` stores it as ``findings.json`` plus a plain-language ``findings.md`` that says, per finding and
model, whether it holds on this run, with the numbers and their uncertainty. Nothing here is tuned towards the
paper's figures: a finding that does not hold is reported as such.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..config import FindingsConfig
from . import answers, correlations, magnitude, paper, procedures, sources
from .data import SOURCES, TASK_ORDER, RunData, from_arrays, group_of, jsonable as _jsonable, load_run

FINDINGS = {
    "F1_correlations": ("Influence scores correlate between queries of the same reasoning task", correlations),
    "F2_magnitude": ("Reasoning relies less on individual documents than factual recall", magnitude),
    "F3_answers": ("Answers to factual questions sit in the top documents; answers to reasoning questions do not",
                   answers),
    "F4_procedures": ("Top documents for reasoning demonstrate the query's procedure", procedures),
    "F5_sources": ("Code, StackExchange and maths are over-represented among the top documents for reasoning",
                   sources),
}


def compute(runs: Sequence[RunData], cfg: FindingsConfig = FindingsConfig(), only: Optional[Sequence[str]] = None
            ) -> dict:
    """Every finding for every run; with two runs, the second model enters F1 (cross-model) and F2 (multiplier)."""
    runs = list(runs)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs need distinct names, got {names}")
    out: Dict[str, dict] = {"config": asdict(cfg), "config_hash": run_hash(runs, cfg),
                            "runs": {r.name: {"path": r.path, "config_hash": r.config_hash,
                                              "n_queries": int(r.scores.shape[0]),
                                              "n_documents": int(r.scores.shape[1])} for r in runs}}
    want = set(only or FINDINGS)
    for i, r in enumerate(runs):
        other = runs[i + 1] if i + 1 < len(runs) else None
        if "F1_correlations" in want:
            out.setdefault("F1_correlations", {})[r.name] = correlations.summarise(r, cfg.n_boot, cfg.seed, other)
        if "F2_magnitude" in want:
            out.setdefault("F2_magnitude", {})[r.name] = magnitude.summarise(r, cfg.powerlaw_top,
                                                                           cfg.magnitude_fraction, other)
        if "F3_answers" in want:
            out.setdefault("F3_answers", {})[r.name] = answers.summarise(r, cfg.answer_k)
        if "F4_procedures" in want:
            out.setdefault("F4_procedures", {})[r.name] = procedures.summarise(r, cfg.procedure_k)
        if "F5_sources" in want:
            out.setdefault("F5_sources", {})[r.name] = sources.summarise(r, cfg.source_fractions, cfg.n_boot // 2,
                                                                       cfg.seed)
    out["paper"] = paper.summaries(runs, cfg, only=[k for k in FINDINGS if k in want])  # as the paper defines them
    out["verdicts"] = verdicts(out)
    return out


def run_hash(runs: Sequence[RunData], cfg: FindingsConfig) -> str:
    key = json.dumps({"runs": [[r.name, r.config_hash, r.kind] for r in runs], "cfg": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def verdicts(results: dict) -> Dict[str, Dict[str, dict]]:
    """``{finding: {model: {"holds": True/False/None, "text": ...}}}`` from the summaries present."""
    out: Dict[str, Dict[str, dict]] = {}
    for key, (_, module) in FINDINGS.items():
        for model, summary in results.get(key, {}).items():
            holds, text = module.verdict(summary)
            out.setdefault(key, {})[model] = {"holds": holds, "text": text}
    return out


def merge(path: Union[str, Path], update: dict) -> dict:
    """Merge ``update`` into the JSON file at ``path`` (per finding and model) and refresh its verdicts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):  # notebooks run side by side: one read-modify-write at a time
        data = json.loads(path.read_text()) if path.exists() else {}
        for k, v in update.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict) and k not in ("config",):
                data[k].update(v)
            else:
                data[k] = v
        data["verdicts"] = verdicts(data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=True))
        os.replace(tmp, path)  # a reader never sees half a file
    return data


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive ``flock`` on ``directory`` (no lock file left behind); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def report(results: dict) -> str:
    """``findings.md``: per finding and model, whether it holds on this run, with the numbers."""
    lines = ["# Findings on this run", "",
             f"Configuration hash `{results.get('config_hash', '?')}`; runs: "
             + ", ".join(f"`{n}` ({v['n_queries']} queries × {v['n_documents']} documents, {v['path']})"
                         if isinstance(v, dict) else f"`{n}` ({v})" for n, v in results.get("runs", {}).items()), "",
             "Each finding is tested as stated in the paper; *holds* / *does not hold* is decided by the test named "
             "in the line, never by closeness to the paper's figures.", ""]
    word = {True: "**holds**", False: "**does not hold**", None: "not testable"}
    for key, (title, module) in FINDINGS.items():
        lines += [f"## {key.split('_')[0]}: {title}", ""]
        per_model = results.get("verdicts", {}).get(key)
        if not per_model:
            lines += ["not computed on this run", ""]
            continue
        lines.append(f"Test: {' '.join((module.verdict.__doc__ or '').split())}")
        lines.append("")
        for model, v in per_model.items():
            lines.append(f"- `{model}`: {word[v['holds']]} — {v['text']}")
        lines.append("")
        beside = paper.markdown(results.get("paper") or {}, key)
        if beside:
            lines += ["**The paper beside the kit, by the paper's definitions** (the kit's CI in brackets; "
                      "verdicts compare like with like, see `kit/findings/paper.py`):", ""] + beside + [""]
    if results.get("validation"):
        from ..validate import markdown as validation_markdown

        lines += ["## Validation: does EK-FAC find the documents that matter? (`make validate`, notebook 09)", "",
                  *validation_markdown(results["validation"]), ""]
    return "\n".join(lines)


def write(results: dict, out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """Write ``findings.json`` and ``findings.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "findings.json", out_dir / "findings.md"
    j.write_text(json.dumps(_jsonable(results), indent=1))
    m.write_text(report(results))
    return j, m


def from_runs(paths: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None, cfg: FindingsConfig = FindingsConfig()
              ) -> List[RunData]:
    names = list(names) if names else [Path(p).name for p in paths]
    return [load_run(p, n, cfg.kind) for p, n in zip(paths, names)]


__all__ = ["FINDINGS", "FindingsConfig", "compute", "verdicts", "merge", "report", "write", "from_runs", "load_run",
           "from_arrays", "RunData", "group_of", "TASK_ORDER", "SOURCES", "correlations", "magnitude", "answers",
           "procedures", "sources", "paper"]
