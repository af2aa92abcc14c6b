"""Every notebook executes headlessly (papermill) in smoke mode and writes its figures with provenance."""

import json

import pytest

from kit.figures import NOTEBOOKS, ROOT, run_notebooks


@pytest.fixture(scope="module")
def smoke_run(smoke_world, tmp_path_factory):
    import kit

    run = tmp_path_factory.mktemp("nbrun")
    kit.fit(kit.FitConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], batch_size=16), run, quiet=True)
    kit.score(run, kit.ScoreConfig(queries=smoke_world["queries"]), quiet=True)
    return run


def test_notebooks_are_committed_clean():
    for nb in NOTEBOOKS:
        cells = json.loads((ROOT / "notebooks" / nb).read_text())["cells"]
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), nb
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), nb


def test_notebooks_execute_and_write_figures(smoke_run, tmp_path):
    from PIL import Image

    executed = run_notebooks(smoke_run, tmp_path, "smoke")
    assert [p.name for p in executed] == NOTEBOOKS
    for name in ("fit_eigenvalue_spectra", "score_distributions"):
        png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
        assert png.stat().st_size > 10_000 and pdf.stat().st_size > 5_000
        source = Image.open(png).info["Source"]
        assert "notebooks/02_fit_and_score.ipynb" in source and str(smoke_run) in source
        assert b"02_fit_and_score" in pdf.read_bytes()
