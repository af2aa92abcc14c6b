"""`make figures` in smoke mode: every notebook executes headlessly (papermill) on a tiny lab world, writes its
figures with provenance and its keys in findings.json; `kit findings` computes the same from a run directory."""

import json
import re
from pathlib import Path

import pytest

from kit.figures import NOTEBOOKS, PRESETS, ROOT, config_hash, run_notebooks

FIGURES = {
    "01_world_and_queries.ipynb": ["world_corpus_composition", "world_accuracy_by_task"],
    "02_fit_and_score.ipynb": ["fit_eigenvalue_spectra_small", "score_distributions_large"],
    "03_f1_correlations.ipynb": ["f1_pearson_heatmaps", "f1_spearman_heatmaps", "f1_within_task_means",
                                 "paper_fig1_overview_heatmaps", "paper_f1_per_task_means", "paper_f1_pair_table"],
    "04_f2_magnitude.ipynb": ["f2_cumulative_influence", "f2_percent_of_total", "f2_negative_tail",
                              "f2_powerlaw_rank_plots", "f2_powerlaw_slopes", "paper_fig2_influence_per_nat",
                              "paper_fig2_absolute_count", "paper_a9_2_negative_tail", "paper_a9_2_size_ratio",
                              "paper_a9_2_volatility", "paper_a9_3_powerlaw_slopes"],
    "05_f3_answers.ipynb": ["f3_answers_in_top_k", "f3_fact_document_ranks", "paper_fig3_answers_top_k",
                            "paper_fig3_answer_curves"],
    "06_f4_procedures.ipynb": ["f4_procedures_in_top_k", "paper_a8_3_keyword_categories", "paper_f4_procedures_top_k"],
    "07_f5_sources.ipynb": ["f5_sources_top", "f5_sources_bottom", "paper_fig4_source_multipliers",
                            "paper_a8_4_bottom_and_controls"],
    "08_explorer.ipynb": [],
}
KEYS = ["F0_world", "F0_fit", "F1_correlations", "F2_magnitude", "F3_answers", "F4_procedures", "F5_sources",
        "F0_explorer"]


def test_notebooks_are_committed_clean():
    assert sorted(FIGURES) == NOTEBOOKS
    for nb in NOTEBOOKS:
        cells = json.loads((ROOT / "notebooks" / nb).read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), nb
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), nb
        assert cells[0]["cell_type"] == "markdown" and len("".join(cells[0]["source"])) > 300, nb
        # opened from notebooks/ (Jupyter, Voilà) it works from the repository root, and its defaults are the runs
        # `make figures` builds
        p = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
        assert any('os.chdir("..")' in "".join(c["source"]) for c in cells[:p]), nb
        params = "".join(cells[p]["source"])
        assert 'world_dir = "data/lab"' in params and '"large": "data/runs/lab-large"' in params, nb


def test_smoke_preset_builds_two_scored_runs(smoke_ctx):
    import kit

    assert sorted(smoke_ctx["runs"]) == ["large", "small"]
    for name, run in smoke_ctx["runs"].items():
        s = kit.load_scores(run, "per_nat")
        assert s.shape[0] + len(smoke_ctx["dropped_queries"][name]) == 6 + 2 * 4 + 2 + 2 and s.shape[1] >= 800  # long documents are chunked
    assert len(config_hash(PRESETS["smoke"], smoke_ctx["runs"])) == 12


def test_notebooks_execute_write_figures_and_findings(smoke_ctx, tmp_path):
    from PIL import Image

    fj = tmp_path / "findings.json"
    executed = run_notebooks(smoke_ctx, tmp_path, "smoke", findings_json=fj, extra={"n_boot": 50})
    assert [p.name for p in executed] == NOTEBOOKS
    for nb, names in FIGURES.items():
        for name in names:
            png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
            assert png.stat().st_size > 5_000 and pdf.stat().st_size > 3_000, name
            source = Image.open(png).info["Source"]
            assert f"notebooks/{nb}" in source and smoke_ctx["runs"]["small"] in source, name
            assert nb.split(".")[0].encode() in pdf.read_bytes(), name
    data = json.loads(fj.read_text())
    for key in KEYS:
        assert set(data[key]) >= {"small", "large"}, key
    for key in KEYS[2:7]:
        assert set(data["verdicts"][key]) == {"small", "large"}
        assert all(v["holds"] in (True, False, None) and v["text"] for v in data["verdicts"][key].values())
    assert "cross_model" in data["F1_correlations"]["small"]
    assert "multiplier" in data["F2_magnitude"]["small"]
    # the notebooks report what the tested functions compute, number for number
    from kit import findings as FD

    cfg = FD.FindingsConfig(n_boot=50)
    runs = smoke_ctx["runs"]
    ref = json.loads(json.dumps(FD._jsonable(FD.compute(FD.from_runs([runs["small"], runs["large"]],
                                                                        ["small", "large"], cfg), cfg))))
    for key in KEYS[2:7]:
        assert data[key] == ref[key], key
        assert data["paper"][key] == ref["paper"][key], key
        assert data["verdicts"][key] == ref["verdicts"][key], key
    # every paper figure named in figures/index.md was made
    index = FD.paper.index_markdown(ref["runs"], tmp_path)
    for _, stem, nb, _ in FD.paper.FIGURES:
        assert (tmp_path / f"{stem}.png").stat().st_size > 5_000, stem
        assert f"[{stem}.png]({stem}.png)" in index and f"notebooks/{nb}.ipynb" in index
    # make html: each executed notebook readable offline, figures embedded, nothing fetched from a network
    from kit.figures import export_html

    pages = export_html(tmp_path / "executed", standalone=False)  # notebook 00's page: tests/test_notebook_00.py
    assert [p.stem for p in pages] == [nb.split(".")[0] for nb in NOTEBOOKS]
    for page, nb in zip(pages, NOTEBOOKS):
        text = page.read_text()
        title = json.loads((ROOT / "notebooks" / nb).read_text())["cells"][0]["source"][0].lstrip("# ").strip()
        assert max(re.findall(r"[A-Za-z]{4,}", title), key=len) in text, nb  # the notebook's own heading
        assert "<script" not in text.lower() and "https://cdn" not in text, nb
        if FIGURES[nb]:
            assert "data:image/png;base64," in text, nb
    html = (tmp_path / "explorer_small.html").read_text()
    assert "08_explorer" in html and "<table>" in html and "background:rgba" in html


def test_kit_findings_cli_matches_the_notebooks(smoke_ctx, tmp_path, capsys):
    from kit.cli import main

    runs = smoke_ctx["runs"]
    assert main(["findings", "--run", runs["small"], "--run", runs["large"], "--name", "small", "--name", "large",
                 "--out", str(tmp_path), "--n-boot", "50"]) == 0
    data = json.loads((tmp_path / "findings.json").read_text())
    assert set(data["verdicts"]) == set(KEYS[2:7])
    assert data["F3_answers"]["small"]["k"] == 10
    assert "## F5" in (tmp_path / "findings.md").read_text()
    assert main(["findings", "--run", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_explorer_reads_the_top_k_table_and_highlights_every_shown_document(smoke_ctx):
    import numpy as np

    import kit
    from kit.errors import InputError
    from kit.explorer import Explorer, _text

    runs = smoke_ctx["runs"]
    e = Explorer(runs)
    qid = e.default_query("small")
    assert e.queries["small"].set_index("id").loc[qid, "task"] in ("arithmetic", "slope", "linear")
    picks = e.picks("small", qid, n=3, kind="raw")
    scores = kit.load_scores(runs["small"], "raw")
    row = np.asarray(scores.loc[qid], dtype=float)
    order = np.argsort(-row, kind="stable")
    top_ids = list(scores.columns[order[:3]])
    assert picks[picks["side"] == "top"]["document"].tolist() == top_ids  # the top-k table = the dense ranking
    page = e.view("small", qid, n=3, kind="raw")
    n_layers = len(json.loads((Path(runs["small"]) / "config.json").read_text())["modules"])
    assert page.count("<tr>") == 1 + 6 and page.count('class="bar"') == 6 * n_layers
    assert page.count("<td><div class=\"doc\"><span title=") == 6  # every shown document highlighted
    assert "text-align:left" in page and "Top and bottom 3 of" in page
    truth = e.relevant("small", qid, top_ids)  # the smoke lab corpus is labelled: does each demonstrate the procedure?
    docs = e.documents["small"].loc[top_ids]
    assert truth == {d: p == e.queries["small"].set_index("id").loc[qid, "task"]
                     for d, p in zip(top_ids, docs["procedure"])}
    assert "<th>shows the procedure</th>" in page
    assert "$" not in _text("costs $5, or $x$") and "&#36;5" in _text("costs $5")
    with pytest.raises(InputError, match="not in the scores"):
        e.view("small", "no-such-query")
