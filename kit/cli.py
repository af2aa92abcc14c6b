"""Command line: ``fit``, ``score``, ``rescore``, ``smoke``. Bad input exits with status 2 and one clear line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from .config import DEFAULT_BATCH_TOKENS, FitConfig, ScoreConfig, help_of
from .errors import FactorError, InputError, ModelError
from .timing import end_start_up


def _h(cls, name):
    return help_of(cls, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kit", description="EK-FAC influence of documents on LLM completions")
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("fit", help="fit EK-FAC factors of a model on a corpus into a run directory")
    f.add_argument("--model", required=True, help=_h(FitConfig, "model"))
    f.add_argument("--corpus", required=True, help=_h(FitConfig, "corpus"))
    f.add_argument("--out", required=True, help="run directory to create or resume")
    f.add_argument("--modules", nargs="+", default=None, help=_h(FitConfig, "modules"))
    f.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled", help=_h(FitConfig, "fisher"))
    f.add_argument("--damping", default="heuristic", help=_h(FitConfig, "damping"))
    f.add_argument("--n-docs", type=int, default=None, help=_h(FitConfig, "n_docs"))
    f.add_argument("--max-tokens", type=int, default=None, help=_h(FitConfig, "max_tokens"))
    f.add_argument("--long-docs", choices=["chunk", "truncate"], default="chunk", help=_h(FitConfig, "long_docs"))
    f.add_argument("--batch-size", type=int, default=8, help=_h(FitConfig, "batch_size"))
    f.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help=_h(FitConfig, "max_batch_tokens"))
    f.add_argument("--seed", type=int, default=0, help=_h(FitConfig, "seed"))
    f.add_argument("--dtype", default="float32", help=_h(FitConfig, "dtype"))
    f.add_argument("--factor-dtype", default="float32", help=_h(FitConfig, "factor_dtype"))
    f.add_argument("--keep-covariances", action="store_true", help=_h(FitConfig, "keep_covariances"))
    f.add_argument("--device", default="auto", help=_h(FitConfig, "device"))
    f.add_argument("--cache-gb", type=float, default=None, help=_h(FitConfig, "cache_gb"))
    f.add_argument("--cache-on", choices=["auto", "memory", "disk"], default="auto", help=_h(FitConfig, "cache_on"))
    f.add_argument("--checkpoint-every", type=int, default=50, help=_h(FitConfig, "checkpoint_every"))
    f.add_argument("--workers", type=int, default=None, help=_h(FitConfig, "workers"))
    f.add_argument("--queries", default=None, help="also score these queries (as `kit score`) in the same process, "
                   "right after the fit: one start-up instead of two, and with --fisher empirical the scoring pass "
                   "replays the fit's token cache instead of running the model")
    f.add_argument("--query-rank", default="full", help=_h(ScoreConfig, "query_rank") + " (with --queries)")
    f.add_argument("--top-k", type=int, default=1000, help=_h(ScoreConfig, "top_k") + " (with --queries)")
    f.add_argument("--query-batch-size", type=int, default=8, help=_h(ScoreConfig, "query_batch_size")
                   + " (with --queries)")
    _nproc_arg(f)

    s = sub.add_parser("score", help="score queries against every document of a fitted run (or of --corpus)")
    s.add_argument("--run", "--run-dir", dest="run", required=True, help="a run directory made by `fit` (under torchrun "
                   "spell it --run-dir: torchrun's own parser mistakes --run for its --run-path)")
    s.add_argument("--queries", required=True, help=_h(ScoreConfig, "queries"))
    s.add_argument("--corpus", default=None, help=_h(ScoreConfig, "corpus"))
    s.add_argument("--query-rank", default="full", help=_h(ScoreConfig, "query_rank"))
    s.add_argument("--batch-size", type=int, default=0, help=_h(ScoreConfig, "batch_size"))
    s.add_argument("--top-k", type=int, default=1000, help=_h(ScoreConfig, "top_k"))
    s.add_argument("--query-batch-size", type=int, default=8, help=_h(ScoreConfig, "query_batch_size"))
    s.add_argument("--device", default=None, help=_h(ScoreConfig, "device"))
    s.add_argument("--dtype", default=None, help=_h(ScoreConfig, "dtype"))
    _nproc_arg(s)

    r = sub.add_parser("rescore", help="re-score each query's top documents with full-rank query gradients")
    r.add_argument("--run", "--run-dir", dest="run", required=True)
    r.add_argument("--top", type=int, default=100, help="documents per query")
    r.add_argument("--device", default=None, help="compute device (default: the fit's)")
    r.add_argument("--dtype", default=None, help="model dtype (default: the fit's)")

    m = sub.add_parser("smoke", help="build a tiny world (corpus, tokenizer, tiny Llama) and fit + score it")
    m.add_argument("--out", default="data/smoke", help="where the tiny world and its run go")
    m.add_argument("--arch", default="llama", choices=["llama", "gpt2", "gpt_neox"])
    pl = sub.add_parser("plan", help="memory per stage and a measured time estimate, before a long fit/score")
    from .plan import PlanConfig

    pl.add_argument("--model", required=True, help=_h(PlanConfig, "model"))
    pl.add_argument("--corpus", help=_h(PlanConfig, "corpus"))
    pl.add_argument("--n-docs", type=int, help=_h(PlanConfig, "n_docs"))
    pl.add_argument("--tokens-per-doc", type=int, help=_h(PlanConfig, "tokens_per_doc"))
    pl.add_argument("--queries", help=_h(PlanConfig, "queries"))
    pl.add_argument("--n-queries", type=int, default=100, help=_h(PlanConfig, "n_queries"))
    pl.add_argument("--nproc", type=int, default=1, help=_h(PlanConfig, "nproc"))
    pl.add_argument("--device", default="auto", help=_h(PlanConfig, "device"))
    pl.add_argument("--dtype", default="float32", help=_h(PlanConfig, "dtype"))
    pl.add_argument("--factor-dtype", default="float32", help=_h(PlanConfig, "factor_dtype"))
    pl.add_argument("--batch-size", type=int, default=8, help=_h(PlanConfig, "batch_size"))
    pl.add_argument("--max-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help=_h(PlanConfig, "max_batch_tokens"))
    pl.add_argument("--max-tokens", type=int, help=_h(PlanConfig, "max_tokens"))
    pl.add_argument("--query-rank", default="full", help=_h(PlanConfig, "query_rank"))
    pl.add_argument("--query-batch-size", type=int, default=8, help=_h(PlanConfig, "query_batch_size"))
    pl.add_argument("--modules", nargs="+", help=_h(PlanConfig, "modules"))
    pl.add_argument("--cache-gb", type=float, default=None, help=_h(PlanConfig, "cache_gb"))
    pl.add_argument("--cache-on", choices=["auto", "memory", "disk"], default="auto", help=_h(PlanConfig, "cache_on"))
    pl.add_argument("--memory-gb", type=float, help=_h(PlanConfig, "memory_gb"))
    pl.add_argument("--workers", type=int, default=None, help=_h(PlanConfig, "workers"))
    pl.add_argument("--no-measure", action="store_true", help="memory from shapes only; no batches are run")
    pl.add_argument("--json", help="also write the plan as JSON to this file")

    b = sub.add_parser("build-corpus", help="build the lab's labelled pretraining corpus (offline, deterministic)")
    b.add_argument("--preset", default="lab", help="lab (20,000 documents) or smoke (800)")
    b.add_argument("--out", default="data/lab", help="directory for corpus.parquet/.jsonl, heldout.json, corpus.json")
    b.add_argument("--n-docs", type=int, default=None, help="override the preset's number of documents")
    b.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    b.add_argument("--shares", default=None, help="source shares, e.g. wiki=0.2,code=0.1 (others keep their default)")

    t = sub.add_parser("pretrain", help="pretrain the lab models (small, large) on a built corpus")
    t.add_argument("--world", default="data/lab", help="directory made by build-corpus; models go to WORLD/models/SIZE")
    t.add_argument("--sizes", nargs="+", default=["small", "large"], help="model sizes to train (small, large, tiny)")
    t.add_argument("--no-eval", action="store_true", help="skip answering and grading the query sets afterwards")

    qa = sub.add_parser("queries", help="answer a query set greedily with a model and grade it -> jsonl")
    qa.add_argument("--model", required=True, help="model directory, .gguf file or hub id")
    qa.add_argument("--world", default=None, help="a lab world: its query templates, facts and held-out instances")
    qa.add_argument("--queries", default=None, help="or a jsonl with id, prompt (task, answer optional)")
    qa.add_argument("--tasks", nargs="+", default=["arithmetic", "slope", "linear"], help="reasoning tasks (with --world)")
    qa.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template (instruct models)")
    qa.add_argument("--factual", type=int, default=40)
    qa.add_argument("--min-docs", type=int, default=15, help="factual questions only about facts at least this many "
                    "corpus documents state (with --world)")
    qa.add_argument("--reasoning", type=int, default=20)
    qa.add_argument("--controls", type=int, default=10)
    qa.add_argument("--max-new-tokens", type=int, default=128)
    qa.add_argument("--out", required=True, help="jsonl written with completion, nats, extracted, correct")

    gr = sub.add_parser("grade", help="grade completions: prints the input fields + graded_as, answer, extracted, "
                        "correct, reason (a row that cannot be graded gets correct null and its reason; exit 2)")
    gr.add_argument("file", help="jsonl (or a JSON array) with prompt and completion; id, task (any spelling: "
                    "'slopes', 'linear equations', ...; unknown names are inferred from the prompt) and answer optional")

    g = sub.add_parser("figures", help="build a preset's world, fit + score, execute the notebooks -> figures/")
    g.add_argument("--preset", default="lab", help="lab (default: the offline lab world, both lab models), smoke "
                   "(a tiny world, about a minute) or smollm2 (make smollm2 first)")
    g.add_argument("--data-dir", default="data")
    g.add_argument("--figures-dir", default="figures")
    g.add_argument("--n-docs", type=int, help="documents the factors are fitted on (seeded sample of the corpus)")
    g.add_argument("--score-sample-only", action="store_true", help="score only the fitted sample, not every "
                   "document of the corpus (the lab preset scores all 20,000)")
    g.add_argument("--query-rank", help="full or a rank r for the query gradients")
    g.add_argument("--fisher", choices=["sampled", "empirical"])
    g.add_argument("--factual", type=int, help="factual queries per model")
    g.add_argument("--reasoning", type=int, help="queries per reasoning task per model")
    g.add_argument("--controls", type=int, help="factual and reasoning controls per model (each)")
    g.add_argument("--min-docs", type=int, help="factual queries only about facts this many documents state")
    _findings_args(g)

    v = sub.add_parser("validate", add_help=False, help="does EK-FAC find the documents that matter? counterfactual "
                       "retraining, LDS and ground-truth recall on the micro lab setting, then notebook 09 "
                       "(`kit validate --help` for its options)")
    v.add_argument("rest", nargs=argparse.REMAINDER)

    h = sub.add_parser("html", help="every executed notebook (figures/executed) as standalone offline HTML")
    h.add_argument("--figures-dir", default="figures")

    fd = sub.add_parser("findings", help="compute the five findings of scored run directories -> findings.json/.md")
    fd.add_argument("--run", action="append", required=True, help="a scored run directory (repeat for a second "
                    "model: cross-model correlations and magnitude multipliers)")
    fd.add_argument("--name", action="append", help="a name per --run (default: the directory name)")
    fd.add_argument("--out", help="where findings.json and findings.md go (default: the first run directory)")
    _findings_args(fd)
    return p


def _nproc_arg(p) -> None:
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine: relaunches the command under "
                   "`torchrun --standalone --nproc_per_node N` (for several nodes call torchrun yourself)")


def _findings_args(p) -> None:
    from .config import FindingsConfig

    p.add_argument("--kind", choices=["per_nat", "raw", "normalized"], help=_h(FindingsConfig, "kind"))
    p.add_argument("--n-boot", type=int, help=_h(FindingsConfig, "n_boot"))
    p.add_argument("--answer-k", type=int, help=_h(FindingsConfig, "answer_k"))
    p.add_argument("--procedure-k", type=int, help=_h(FindingsConfig, "procedure_k"))
    p.add_argument("--source-fractions", type=float, nargs="+", help=_h(FindingsConfig, "source_fractions"))


def _findings_config(args):
    from .config import FindingsConfig

    given = {k: getattr(args, k) for k in ("kind", "n_boot", "answer_k", "procedure_k", "source_fractions")
             if getattr(args, k, None) is not None}
    if given.get("n_boot", 1) < 1:
        raise InputError("--n-boot must be at least 1")
    return FindingsConfig(**given), given


_COMMAND = False  # set by run(): main() is this process's command, so what the process cost so far is its start-up


def _start_up_s() -> float:
    """What starting this process cost so far (:func:`kit.timing.process_age`) when ``main`` is its command; 0 for
    in-process callers, whose process started for something else."""
    from .timing import process_age

    return process_age() if _COMMAND else 0.0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun … -m kit -- score …`: everything after -- is ours
        argv = argv[1:]
    if argv[:1] == ["validate"]:  # its own parser (kit/validate.py), options passed through untouched
        end_start_up()
        from .validate import main as validate_main

        return validate_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cmd not in ("fit", "score"):  # these switch the collector back on after their model load
        end_start_up()
    try:
        if getattr(args, "nproc", 1) != 1 and args.cmd != "plan":
            import os

            if args.nproc < 1:
                raise InputError(f"--nproc must be at least 1, got {args.nproc}")
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # not yet inside torchrun: launch it
                from . import distributed

                rest = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
                        and (i == 0 or argv[i - 1] != "--nproc")]
                return distributed.launch(["--"] + rest, args.nproc)
        if args.cmd in ("fit", "score"):  # their time summary starts with what starting the process cost
            from . import pipeline

            pipeline.STARTUP_S = _start_up_s()
            if args.cmd in ("fit", "plan") and args.workers != 1:  # before any thread starts (influence.share_heap)
                from .influence import share_heap

                share_heap()
        if args.cmd == "fit":
            from .pipeline import fit

            cfg = FitConfig(model=args.model, corpus=args.corpus, modules=args.modules, fisher=args.fisher,
                            damping=args.damping, n_docs=args.n_docs, max_tokens=args.max_tokens, long_docs=args.long_docs,
                            batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, seed=args.seed,
                            dtype=args.dtype, factor_dtype=args.factor_dtype, keep_covariances=args.keep_covariances,
                            device=args.device, cache_gb=args.cache_gb, cache_on=args.cache_on, workers=args.workers,
                            checkpoint_every=args.checkpoint_every)
            if args.queries:
                from .pipeline import fit_and_score

                sdir = fit_and_score(cfg, args.out, ScoreConfig(queries=args.queries, query_rank=args.query_rank,
                                                                top_k=args.top_k,
                                                                query_batch_size=args.query_batch_size))
                _main_print(f"run directory: {args.out}\nscores: {sdir}  (kit.load_scores({str(args.out)!r}) reads them)")
            else:
                out = fit(cfg, args.out)
                _main_print(f"run directory: {out}")
        elif args.cmd == "score":
            from .pipeline import score

            sdir = score(args.run, ScoreConfig(queries=args.queries, query_rank=args.query_rank,
                                               batch_size=args.batch_size, corpus=args.corpus, top_k=args.top_k,
                                               query_batch_size=args.query_batch_size,
                                               device=args.device, dtype=args.dtype))
            _main_print(f"scores: {sdir}  (kit.load_scores({str(args.run)!r}) reads them)")
        elif args.cmd == "rescore":
            from .pipeline import open_run, rescore_top

            out = rescore_top(args.run, args.top, run=open_run(args.run, device=args.device, dtype=args.dtype))
            print(out.groupby("query")[["score_lowrank", "score_full"]].corr().iloc[0::2, -1].describe().to_string())
        elif args.cmd == "smoke":
            from .pipeline import fit, score
            from .smoke import build_smoke_world

            print("[kit] smoke preset: a tiny world built by the kit (not the lab world of the findings)")
            w = build_smoke_world(args.out, arch=args.arch)
            run = f"{args.out}/run-{args.arch}"
            fit(FitConfig(model=w["model"], corpus=w["corpus"], batch_size=16), run)
            print(f"scores: {score(run, ScoreConfig(queries=w['queries']))}")
        elif args.cmd == "plan":
            import transformers  # noqa: F401  (imported by every fit/score: part of their start-up)

            from . import pipeline  # noqa: F401
            from .plan import PlanConfig, plan, render

            p = plan(startup_s=_start_up_s(), cfg=PlanConfig(model=args.model, corpus=args.corpus, n_docs=args.n_docs,
                                tokens_per_doc=args.tokens_per_doc, queries=args.queries, n_queries=args.n_queries,
                                nproc=args.nproc, device=args.device, dtype=args.dtype, factor_dtype=args.factor_dtype,
                                batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                                max_tokens=args.max_tokens, query_rank=args.query_rank, modules=args.modules,
                                query_batch_size=args.query_batch_size, cache_gb=args.cache_gb,
                                cache_on=args.cache_on, measure=not args.no_measure, memory_gb=args.memory_gb,
                                workers=args.workers))
            print(render(p))
            if args.json:
                import json as _json

                Path(args.json).write_text(_json.dumps(p, indent=2, default=float))
        elif args.cmd == "build-corpus":
            from dataclasses import replace

            from .lab.corpus import PRESETS, write_corpus

            if args.preset not in PRESETS:
                raise InputError(f"unknown corpus preset {args.preset!r}; choose from {sorted(PRESETS)}")
            cfg = PRESETS[args.preset]
            cfg = replace(cfg, **{k: v for k, v in (("n_docs", args.n_docs), ("seed", args.seed)) if v is not None})
            if args.shares:
                from .lab.corpus import parse_shares

                cfg = replace(cfg, shares=parse_shares(args.shares, dict(cfg.shares)))
            paths = write_corpus(args.out, cfg)
            import json as _json

            summary = _json.loads((Path(args.out) / "corpus.json").read_text())
            print(f"corpus: {paths['corpus']} ({summary['n_docs']} documents)")
            print("sources: " + ", ".join(f"{k} {v}" for k, v in summary["sources"].items()))
        elif args.cmd == "pretrain":
            from .lab import answer_model_queries, pretrain_models

            done = pretrain_models(args.world, args.sizes)
            for size, info in done.items():
                print(f"{size}: {info['parameters']:,} parameters, {info['steps']} steps, {info['seconds']} s, "
                      f"loss {info['loss_first']:.2f} -> {info['loss_last']:.2f}")
                if not args.no_eval:
                    acc = answer_model_queries(args.world, size)["accuracy"]
                    print(f"{size} accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
        elif args.cmd == "queries":
            from .models import load_model
            from .queries import QueryCounts, accuracy, answer_queries, lab_queries

            if (args.world is None) == (args.queries is None):
                raise InputError("pass exactly one of --world (a lab world's query set) or --queries (a jsonl)")
            if args.world:
                q = lab_queries(args.world, args.tasks, QueryCounts(args.factual, args.reasoning, args.controls,
                                                                    args.controls), min_docs=args.min_docs)
            else:
                from .corpus import read_table

                q = read_table(args.queries, "queries")
                if "prompt" not in q.columns or len(q) == 0:
                    raise InputError(f"queries {args.queries} need rows with at least id and prompt")
                if "task" not in q.columns:
                    from .queries import infer_task

                    q["task"] = [infer_task(p) for p in q["prompt"]]
            model, tok = load_model(args.model)
            answered = answer_queries(model, tok, q, chat=args.chat, max_new_tokens=args.max_new_tokens)
            answered.to_json(args.out, orient="records", lines=True, force_ascii=False)
            print(f"completions: {args.out}")
            print("accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy(answered).items()))
        elif args.cmd == "grade":
            import json

            from .queries import grade_rows, ungraded_message

            rows = grade_rows(args.file)  # the whole file is checked before any row is printed
            for row in rows:
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            problem = ungraded_message(args.file, rows)
            if problem:  # every row was printed; the ones without a true answer carry correct null and a reason
                print(f"error: {problem}", file=sys.stderr)
                return 2
        elif args.cmd == "figures":
            from .config import parse_rank
            from .figures import main as figures_main

            over = {k: getattr(args, k) for k in ("n_docs", "fisher", "factual", "reasoning", "controls", "min_docs")
                    if getattr(args, k) is not None}
            if args.query_rank is not None:
                over["query_rank"] = parse_rank(args.query_rank)
            if args.score_sample_only:
                over["score_all"] = False
            _, nb = _findings_config(args)
            return figures_main(args.preset, args.data_dir, args.figures_dir, over, nb)
        elif args.cmd == "html":
            from .figures import ROOT, export_html

            for path in export_html((ROOT / args.figures_dir / "executed").resolve()):
                print(path)
        elif args.cmd == "findings":
            from . import findings as FD

            cfg, _ = _findings_config(args)
            if args.name and len(args.name) != len(args.run):
                raise InputError(f"give one --name per --run ({len(args.run)} runs, {len(args.name)} names)")
            data = FD.from_runs(args.run, args.name, cfg)
            res = FD.compute(data, cfg)
            j, m = FD.write(res, args.out or args.run[0])
            print(m.read_text())
            print(f"numbers: {j}\nverdicts: {m}")
    except (InputError, ModelError, FactorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The ``kit`` command (console script and ``python -m kit``): :func:`main`, then a prompt exit.

    Everything a command makes is on disk and closed when :func:`main` returns. What is left is the interpreter's
    own teardown of torch and transformers, about a second on a CPU machine, which a user waiting on the command
    (or a script timing it) would otherwise sit through; so the process ends at once, after leaving a
    ``torchrun`` process group and flushing the console. An exception still ends it the usual way (traceback,
    exit status 1). In-process callers (tests, notebooks) use :func:`main`, which returns; their time summaries have
    no "start-up and imports" (the process started for something else), a command's has its process's.
    """
    global _COMMAND
    _COMMAND = True
    code = main()
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except ImportError:  # pragma: no cover
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main_print(msg: str) -> None:
    from . import distributed

    if distributed.current().main:
        print(msg)
