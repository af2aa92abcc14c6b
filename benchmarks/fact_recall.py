"""Fact recall vs fact frequency: how often a lab model answers a factual question right, by how many corpus
documents state the fact.

Asks every factual question the lab world can ask (capital, continent, currency, language of each country
whose fact at least ``--min-docs`` documents state), greedily, and grades it as the query sets are graded.
Prints accuracy per frequency bin; it is the measurement behind the factual queries' ``min_docs`` default.

    python benchmarks/fact_recall.py [--world data/lab] [--size large] [--min-docs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.lab import facts as F  # noqa: E402
from kit.models import load_model  # noqa: E402
from kit.queries import generate, grade_one  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default="data/lab")
    ap.add_argument("--size", default="large")
    ap.add_argument("--min-docs", type=int, default=2)
    ap.add_argument("--bins", default="2,5,10,15,20,30,50,1000000", help="edges of the frequency bins")
    args = ap.parse_args()
    world = Path(args.world)
    counts = json.loads((world / "corpus.json").read_text())["docs_stating_fact"]
    names = F.by_name()
    keys = sorted(k for k, n in counts.items() if n >= args.min_docs and k.split(":", 1)[0] in F.QUERY_RELATIONS
                  and k.split(":", 1)[1] in names)
    rows = []
    for key in keys:
        rel, name = key.split(":", 1)
        rows.append({"fact": key, "docs": counts[key], "prompt": F.question(rel, names[name]),
                     "answer": names[name].fact(rel)})
    df = pd.DataFrame(rows)
    model, tok = load_model(str(world / "models" / args.size))
    df["completion"] = generate(model, tok, list(df["prompt"]), max_new_tokens=24, batch_size=32)
    df["correct"] = [bool(grade_one(r.prompt, r.completion, "factual", r.answer)["correct"]) for r in df.itertuples()]
    edges = [int(x) for x in args.bins.split(",")]
    df["stated by"] = pd.cut(df["docs"], edges, right=False)
    table = df.groupby("stated by", observed=True)["correct"].agg(["size", "mean"])
    table.columns = ["facts", "accuracy"]
    print(f"\n{args.size} model, {len(df)} factual questions (facts stated by >= {args.min_docs} documents)")
    print(table.to_string(float_format=lambda x: f"{100 * x:.0f} %"))
    for m in sorted({args.min_docs, 10, 15, 20, 25, 30}):
        sel = df[df["docs"] >= m]
        if len(sel):
            print(f"facts stated by >= {m:>2} documents: {len(sel):>4} facts, accuracy {100 * sel['correct'].mean():.0f} %")


if __name__ == "__main__":
    main()
