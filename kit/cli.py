"""Command line: ``fit``, ``score``, ``rescore``, ``smoke``. Bad input exits with status 2 and one clear line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import List, Optional

from .config import FitConfig, ScoreConfig, help_of
from .corpus import InputError
from .ekfac import FactorError
from .models import ModelError


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
    f.add_argument("--max-tokens", type=int, default=None, help=_h(FitConfig, "max_tokens"))
    f.add_argument("--long-docs", choices=["chunk", "truncate"], default="chunk", help=_h(FitConfig, "long_docs"))
    f.add_argument("--batch-size", type=int, default=8, help=_h(FitConfig, "batch_size"))
    f.add_argument("--seed", type=int, default=0, help=_h(FitConfig, "seed"))
    f.add_argument("--dtype", default="float32", help=_h(FitConfig, "dtype"))
    f.add_argument("--device", default="auto", help=_h(FitConfig, "device"))

    s = sub.add_parser("score", help="score queries against every document of a fitted run")
    s.add_argument("--run", required=True, help="a run directory made by `fit`")
    s.add_argument("--queries", required=True, help=_h(ScoreConfig, "queries"))
    s.add_argument("--query-rank", default="full", help=_h(ScoreConfig, "query_rank"))
    s.add_argument("--batch-size", type=int, default=0, help=_h(ScoreConfig, "batch_size"))

    r = sub.add_parser("rescore", help="re-score each query's top documents with full-rank query gradients")
    r.add_argument("--run", required=True)
    r.add_argument("--top", type=int, default=100, help="documents per query")

    m = sub.add_parser("smoke", help="build a tiny world (corpus, tokenizer, tiny Llama) and fit + score it")
    m.add_argument("--out", default="data/smoke", help="where the tiny world and its run go")
    m.add_argument("--arch", default="llama", choices=["llama", "gpt2", "gpt_neox"])
    g = sub.add_parser("figures", help="build a preset's world, fit + score, execute the notebooks -> figures/")
    g.add_argument("--preset", default="smoke", help="smoke (tiny world built by the kit)")
    g.add_argument("--data-dir", default="data")
    g.add_argument("--figures-dir", default="figures")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "fit":
            from .pipeline import fit

            cfg = FitConfig(model=args.model, corpus=args.corpus, modules=args.modules, fisher=args.fisher,
                            damping=args.damping, max_tokens=args.max_tokens, long_docs=args.long_docs,
                            batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, device=args.device)
            out = fit(cfg, args.out)
            print(f"run directory: {out}")
        elif args.cmd == "score":
            from .pipeline import score

            sdir = score(args.run, ScoreConfig(queries=args.queries, query_rank=args.query_rank,
                                               batch_size=args.batch_size))
            print(f"scores: {sdir}  (kit.load_scores({str(args.run)!r}) reads them)")
        elif args.cmd == "rescore":
            from .pipeline import rescore_top

            out = rescore_top(args.run, args.top)
            print(out.groupby("query")[["score_lowrank", "score_full"]].corr().iloc[0::2, -1].describe().to_string())
        elif args.cmd == "smoke":
            from .pipeline import fit, score
            from .smoke import build_smoke_world

            print("[kit] smoke preset: a tiny world built by the kit (not the lab world of the findings)")
            w = build_smoke_world(args.out, arch=args.arch)
            run = f"{args.out}/run-{args.arch}"
            fit(FitConfig(model=w["model"], corpus=w["corpus"], batch_size=16), run)
            print(f"scores: {score(run, ScoreConfig(queries=w['queries']))}")
        elif args.cmd == "figures":
            from .figures import main as figures_main

            return figures_main(args.preset, args.data_dir, args.figures_dir)
    except (InputError, ModelError, FactorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
