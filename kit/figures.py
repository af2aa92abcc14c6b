"""``python -m kit figures``: the main job. World → models → fit + score → notebooks → figures/.

Presets (``--preset``, ``make figures PRESET=…``):

``lab``      (default) the offline lab world: 20k-document corpus, the ``small`` and ``large`` lab models
             pretrained on it, each answering its paper-style query set; EK-FAC (sampled Fisher, heuristic
             damping, every MLP projection) fitted on a seeded sample of 4,000 documents and every one of the
             20,000 training documents scored with it (the paper fits and scores a sample of the pretraining data;
             here the whole pretraining corpus is scored, so every cut is as fine as the corpus allows).
``smoke``    the same pipeline on a tiny world (800 documents, two tiny models, a few queries): every stage end
             to end in about two minutes. The test suite runs the notebooks on it.
``smollm2``  SmolLM2-135M-Instruct (``make smollm2``) on the lab corpus, chat template, a small document sample.

Every stage is cached under ``data/`` by configuration: a second run reuses what is done, a killed run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Union

from .config import FitConfig, ScoreConfig
from .corpus import InputError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_world_and_queries.ipynb", "02_fit_and_score.ipynb", "03_f1_correlations.ipynb",
             "04_f2_magnitude.ipynb", "05_f3_answers.ipynb", "06_f4_procedures.ipynb", "07_f5_sources.ipynb",
             "08_explorer.ipynb"]


@dataclass
class Preset:
    """What ``make figures`` builds and analyses."""

    corpus: str = field(default="lab", metadata={"help": "lab corpus preset (kit.lab.corpus.PRESETS)"})
    world: str = field(default="lab", metadata={"help": "world directory under the data directory"})
    models: Dict[str, Optional[str]] = field(default_factory=lambda: {"small": None, "large": None}, metadata={
        "help": "model name -> model spec (None: pretrain the lab size of that name)"})
    pretrain_sizes: Optional[Dict[str, str]] = field(default=None, metadata={
        "help": "model name -> kit.lab.pretrain.SIZES entry (default: the same name)"})
    factual: int = field(default=40, metadata={"help": "factual queries per model"})
    reasoning: int = field(default=20, metadata={"help": "queries per reasoning task per model"})
    controls: int = field(default=10, metadata={"help": "factual and reasoning controls per model (each)"})
    min_docs: int = field(default=15, metadata={"help": "factual queries only about facts this many documents state "
                                                                "(benchmarks/fact_recall.py: recall by frequency)"})
    chat: bool = field(default=False, metadata={"help": "wrap prompts in the model's chat template"})
    n_docs: Optional[int] = field(default=4000, metadata={"help": "documents the factors are fitted on (seeded sample)"})
    score_all: bool = field(default=True, metadata={
        "help": "score every document of the corpus with the fitted factors (False: only the fitted sample)"})
    fisher: str = field(default="sampled", metadata={"help": "sampled (true Fisher, the paper) or empirical"})
    query_rank: Union[str, int] = field(default="full", metadata={"help": "full or a rank r for query gradients"})
    batch_size: int = field(default=16, metadata={"help": "documents per forward/backward pass"})
    max_batch_tokens: int = field(default=0, metadata={
        "help": "padded tokens per batch, at most (0: no cap; the lab corpus's documents are short, and scoring 100 "
                "full-rank queries runs about 5 % faster in uncapped batches of 16)"})


PRESETS: Dict[str, Preset] = {
    "lab": Preset(),
    "smoke": Preset(corpus="smoke", world="smoke-lab", pretrain_sizes={"small": "smoke_small", "large": "smoke_large"},
                    factual=6, reasoning=4, controls=2, min_docs=2, n_docs=None, score_all=False),
    "smollm2": Preset(models={"smollm2": "smollm2"}, chat=True, n_docs=64, score_all=False, query_rank=32,
                      batch_size=4, factual=20, reasoning=10, controls=5),
}


def prepare(preset: Preset, data_dir: Path, progress: bool = True) -> Dict[str, object]:
    """Build the preset's world and return ``{"world": dir, "runs": {model: run dir}, "timings": …}``."""
    from .lab import answer_model_queries, pretrain_models
    from .lab.corpus import PRESETS as CORPORA, write_corpus
    from .lab.pretrain import SIZES
    from .pipeline import fit, score
    from .queries import QueryCounts

    world = data_dir / preset.world
    t = {}
    t0 = time.time()
    if preset.corpus not in CORPORA:
        raise InputError(f"unknown corpus preset {preset.corpus!r}; choose from {sorted(CORPORA)}")
    write_corpus(world, CORPORA[preset.corpus], progress=progress)
    t["corpus"] = time.time() - t0
    lab = [m for m, spec in preset.models.items() if spec is None]
    if lab:
        t0 = time.time()
        sizes = preset.pretrain_sizes or {m: m for m in lab}
        pretrain_models(world, lab, progress=progress, configs={m: SIZES[sizes[m]] for m in lab})
        t["pretrain"] = time.time() - t0
    counts = QueryCounts(preset.factual, preset.reasoning, preset.controls, preset.controls)
    runs, dropped = {}, {}
    for name, spec in preset.models.items():
        t0 = time.time()
        answer_model_queries(world, name, model_dir=spec, counts=counts, chat=preset.chat, min_docs=preset.min_docs,
                             progress=progress)
        t[f"queries_{name}"] = time.time() - t0
        model = spec or str(world / "models" / name)
        run = data_dir / "runs" / f"{preset.world}-{name}"
        queries = _scorable(world / f"queries-{name}.jsonl", dropped.setdefault(name, []))
        t0 = time.time()
        fit(FitConfig(model=model, corpus=str(world / "corpus.parquet"), fisher=preset.fisher, n_docs=preset.n_docs,
                      batch_size=preset.batch_size, max_batch_tokens=preset.max_batch_tokens), run, quiet=not progress)
        every = str(world / "corpus.parquet") if preset.score_all else None
        score(run, ScoreConfig(queries=queries, query_rank=preset.query_rank, corpus=every), quiet=not progress)
        t[f"fit_score_{name}"] = time.time() - t0
        runs[name] = str(run)
    return {"world": str(world), "runs": runs, "timings": {k: round(v, 1) for k, v in t.items()},
            "dropped_queries": dropped}


def _scorable(path: Path, dropped: list) -> str:
    """The answered queries minus those whose completion is empty (influence needs completion tokens).

    A model may end its answer at once; such queries are listed in ``dropped`` and reported, not scored.
    """
    from .corpus import read_table

    q = read_table(path, "queries")
    empty = q["completion"].fillna("").astype(str).str.strip() == ""
    if not empty.any():
        return str(path)
    dropped.extend(q.loc[empty, "id"].tolist())
    print(f"[kit] {path.name}: {int(empty.sum())} queries with an empty completion are not scored: "
          f"{', '.join(dropped)}", flush=True)
    out = path.with_name(path.stem + ".scored.jsonl")
    q[~empty].to_json(out, orient="records", lines=True, force_ascii=False)
    return str(out)


#: Seconds each notebook took on the lab preset (one run): the longest start first when they run side by side.
NOTEBOOK_SECONDS = {"07_f5_sources.ipynb": 28, "03_f1_correlations.ipynb": 25, "04_f2_magnitude.ipynb": 20,
                    "06_f4_procedures.ipynb": 20, "05_f3_answers.ipynb": 17, "02_fit_and_score.ipynb": 16,
                    "08_explorer.ipynb": 13, "01_world_and_queries.ipynb": 9}


def run_notebooks(ctx: Dict[str, object], figures_dir: Path, preset: str, notebooks: List[str] = NOTEBOOKS,
                  findings_json: Optional[Path] = None, extra: Optional[dict] = None,
                  jobs: Optional[int] = None) -> List[Path]:
    """Execute the notebooks with papermill; each writes its figures and its keys of ``findings.json``.

    ``jobs`` notebooks run side by side (default: one per CPU core, at most 4), each in its own papermill process
    with one BLAS/OpenMP thread (two multithreaded kernels on two cores slow each other down many times over);
    they share nothing but ``findings.json``, whose merges are locked (:func:`kit.findings.merge`). A failing
    notebook stops the run with its papermill error once the others have finished.
    """
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    figures_dir = Path(figures_dir)
    executed = figures_dir / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    findings_json = findings_json or figures_dir / "findings.json"
    jobs = jobs or min(4, os.cpu_count() or 1)
    env = {**os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
                            if jobs > 1 else {})}
    params = {"runs": dict(ctx["runs"]), "world_dir": str(ctx["world"]), "figures_dir": str(figures_dir),
              "findings_json": str(findings_json), "preset": preset, **(extra or {})}

    def execute(nb: str) -> Optional[str]:
        target = executed / nb
        print(f"[kit] executing notebooks/{nb} → {target}", flush=True)
        t0 = time.time()
        cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / nb), str(target), "--cwd", str(ROOT),
               "--no-progress-bar", "-y", json.dumps(params)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            return f"notebooks/{nb} failed (executed copy with the error: {target}):\n{out.stderr[-3000:]}"
        print(f"[kit] notebooks/{nb} done in {time.time() - t0:.0f} s", flush=True)
        return None

    order = sorted(notebooks, key=lambda nb: -NOTEBOOK_SECONDS.get(nb, 30))
    with ThreadPoolExecutor(jobs) as pool:
        errors = [e for e in pool.map(execute, order) if e]
    if errors:
        raise RuntimeError("\n\n".join(errors))
    return [executed / nb for nb in notebooks]


def run_sizes(findings: dict) -> Dict[str, dict]:
    """``{model: {"n_queries", "n_documents"}}`` of the runs the notebooks analysed (from ``findings.json``)."""
    f1 = (findings.get("paper") or {}).get("F1_correlations") or {}
    return {m: {"n_queries": s["n_queries"], "n_documents": s["n_documents"]} for m, s in f1.items()}


def config_hash(p: Preset, runs: Dict[str, str]) -> str:
    """One hash for the preset and every run's factors and scores (what the figures were made from)."""
    import hashlib

    keys = {}
    for name, run in runs.items():
        c = json.loads((Path(run) / "config.json").read_text())
        keys[name] = [c.get("factor_key"), c.get("latest_scores")]
    return hashlib.sha256(json.dumps([asdict(p), keys], sort_keys=True, default=str).encode()).hexdigest()[:12]


def main(preset: str = "lab", data_dir: str = "data", figures_dir: str = "figures", overrides: Optional[dict] = None,
         notebook_params: Optional[dict] = None) -> int:
    """``make figures``: every stage, then the notebooks, then ``findings.md``; prints where everything is."""
    from . import findings as FD

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = replace(PRESETS[preset], **(overrides or {}))
    t0 = time.time()
    data, figs = (ROOT / data_dir).resolve(), (ROOT / figures_dir).resolve()
    print(f"[kit] preset {preset}: {json.dumps(asdict(p))}", flush=True)
    ctx = prepare(p, data)
    t_prep = time.time() - t0
    figs.mkdir(parents=True, exist_ok=True)
    fj = figs / "findings.json"
    # every key is rewritten by this run's notebooks, except `make validate`'s (notebook 09), which is kept
    kept = {k: v for k, v in (json.loads(fj.read_text()) if fj.exists() else {}).items() if k == "validation"}
    fj.unlink(missing_ok=True)
    FD.merge(fj, {**kept, "preset": {"name": preset, **asdict(p)}, "runs": ctx["runs"], "world": ctx["world"],
                  "timings": ctx["timings"], "config_hash": config_hash(p, ctx["runs"]),
                  "dropped_queries": ctx["dropped_queries"]})
    run_notebooks(ctx, figs, preset, findings_json=fj, extra=notebook_params)
    data_json = json.loads(fj.read_text())
    data_json["timings"]["total_seconds"] = round(time.time() - t0, 1)
    data_json["timings"]["prepare_seconds"] = round(t_prep, 1)
    fj.write_text(json.dumps(data_json, indent=1))
    (figs / "findings.md").write_text(FD.report(data_json))
    (figs / "index.md").write_text(FD.paper.index_markdown(run_sizes(data_json), figs))
    made = sorted(x.name for x in figs.glob("*.png"))
    print(f"[kit] {len(made)} figures (PNG + PDF) in {figs}: {', '.join(made)}")
    print(f"[kit] numbers: {fj}; verdicts: {figs / 'findings.md'}; paper figure → file: {figs / 'index.md'}; "
          f"executed notebooks: {figs / 'executed'}")
    print(f"[kit] runs: {', '.join(ctx['runs'].values())}; {time.time() - t0:.0f} s in all")
    return 0


# Notebooks that need no world or runs (a tiny model built in the notebook): `make html` executes them itself
STANDALONE = ["00_ekfac_step_by_step.ipynb"]


def execute_standalone(executed_dir: Union[str, Path], notebooks: List[str] = STANDALONE) -> List[Path]:
    """Execute each standalone notebook into ``executed_dir`` (papermill, from the repository root) when its
    executed copy is missing or older than the notebook; returns the notebooks executed."""
    import papermill as pm

    executed_dir = Path(executed_dir)
    executed_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for nb in notebooks:
        source, target = ROOT / "notebooks" / nb, executed_dir / nb
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        print(f"[kit] executing notebooks/{nb} → {target}", flush=True)
        pm.execute_notebook(str(source), str(target), cwd=str(ROOT), progress_bar=False)
        done.append(target)
    return done


def export_html(executed_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None,
                standalone: bool = True) -> List[Path]:
    """``make html``: every executed notebook as one standalone HTML file, readable offline without Python.

    The :data:`STANDALONE` notebooks (no world needed) are executed into ``executed_dir`` first when their
    executed copy is missing or older than the notebook (``standalone=False``: not), so they are part of it
    without ``make figures``.
    nbconvert's ``lab`` template with the figures embedded; every ``<script>`` is left out (MathJax, require.js
    and mermaid would load from a CDN, and nothing in these notebooks needs them to be read), so the files open
    with no network. Returns the files written (``<notebook>.html`` beside the notebooks unless ``out_dir``)."""
    import re

    import nbformat
    from nbconvert import HTMLExporter

    executed_dir = Path(executed_dir)
    if standalone:
        execute_standalone(executed_dir)
    notebooks = sorted(executed_dir.glob("*.ipynb"))
    if not notebooks:
        raise InputError(f"no executed notebooks in {executed_dir}: run `make figures` first")
    out_dir = Path(out_dir) if out_dir else executed_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab", embed_images=True, mathjax_url="", require_js_url="",
                            mermaid_js_url="")
    written = []
    for nb in notebooks:
        body, _ = exporter.from_notebook_node(nbformat.read(nb, as_version=4))
        body = re.sub(r"<script\b[^>]*>.*?</script>", "", body, flags=re.S | re.I)
        remote = re.findall(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", body, flags=re.I)
        if remote:  # a template change that loads something from the network: say so rather than ship it
            raise RuntimeError(f"{nb.name}: the HTML export still references {len(remote)} remote resources")
        target = out_dir / (nb.stem + ".html")
        target.write_text(body, encoding="utf-8")
        written.append(target)
    return written
