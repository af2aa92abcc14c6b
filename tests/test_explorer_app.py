"""`make explore` in a real browser: Voilà serves notebook 08 as an app on the smoke runs, headless Chromium (Debian's
`chromium`, driven by Playwright's sync API; Playwright's own browser download is never used) picks another query,
and the page shows that query's prompt, documents, highlighted tokens, layer bars and ground truth."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit.figures import ROOT

CHROMIUM = shutil.which("chromium")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no `chromium` on PATH, so no browser to drive the explorer app: `make test` installs "
    "Debian's chromium with apt-get as root (or sudo -n); where it cannot, this test is skipped")

NOTEBOOK = ROOT / "notebooks" / "08_explorer.ipynb"
SCREENSHOT = ROOT / "figures" / "explorer_app.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"Voilà exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"Voilà did not listen on 127.0.0.1:{port} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Voilà's process group, then any kernel it started (kernels run in sessions of their own)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    _, alive = psutil.wait_procs(children, timeout=5)
    for c in alive:
        c.kill()


@pytest.fixture()
def voila_app(smoke_ctx, tmp_path):
    """Voilà serving notebook 08 the way `make explore` does, on the smoke runs and a free loopback port."""
    port = _free_port()
    env = dict(os.environ, KIT_EXPLORE_RUNS=json.dumps(smoke_ctx["runs"]), KIT_EXPLORE_APP="1", TQDM_DISABLE="",
               OMP_WAIT_POLICY="PASSIVE")  # as `make explore` sets them (TQDM_DISABLE unset: no bar may show anyway)
    log = tmp_path / "voila.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
             "--Voila.port_retries=0", "--show_tracebacks=True", "--MappingKernelManager.cull_idle_timeout=300"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(port, proc, log)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        _stop(proc)


def test_the_app_takes_its_runs_from_the_environment_and_says_what_to_run(tmp_path, monkeypatch):
    from kit.explorer import DEFAULT_RUNS, SetupError, app_mode, open_explorer, runs_from_env

    assert runs_from_env(DEFAULT_RUNS, {}) == DEFAULT_RUNS
    assert runs_from_env(DEFAULT_RUNS, {"KIT_EXPLORE_RUNS": '{"a": "x/run-a"}'}) == {"a": "x/run-a"}
    assert runs_from_env({}, {"KIT_EXPLORE_RUNS": "x/run-a, b=y/run-b"}) == {"run-a": "x/run-a", "b": "y/run-b"}
    with pytest.raises(SetupError, match="not valid JSON"):
        runs_from_env({}, {"KIT_EXPLORE_RUNS": "{small: x}"})
    assert not app_mode({}) and not app_mode({"KIT_EXPLORE_APP": "0"}) and app_mode({"KIT_EXPLORE_APP": "1"})
    monkeypatch.chdir(tmp_path)  # no data/runs here: the default runs are missing
    with pytest.raises(SetupError) as e:
        open_explorer(DEFAULT_RUNS)
    assert "run `make figures` first" in str(e.value) and "make explore RUNS=" in str(e.value)
    assert len(e.value._render_traceback_()) == 1  # Jupyter, Voilà and papermill show the message, no traceback
    (tmp_path / "unscored").mkdir()
    (tmp_path / "unscored" / "config.json").write_text("{}")
    with pytest.raises(SetupError, match="cannot read its runs.*no scores yet"):
        open_explorer({"mine": tmp_path / "unscored"})


@needs_browser
def test_explorer_app_in_a_browser_shows_the_chosen_query(smoke_ctx, voila_app):
    from playwright.sync_api import sync_playwright

    from kit.explorer import Explorer

    url, log = voila_app
    runs = smoke_ctx["runs"]
    model = next(iter(runs))  # the app's first model
    e = Explorer(runs)
    default = e.default_query(model)
    q = e.queries[model].set_index("id")
    qid = next(i for i in q.index if q.loc[i, "task"] == "factual" and i != default)  # another query, fact-labelled
    picks = e.picks(model, qid, n=5, kind="per_nat")
    truth = e.relevant(model, qid, picks["document"].tolist())
    n_layers = len(json.loads((Path(runs[model]) / "config.json").read_text())["modules"])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            # loopback only: the widgets' icon font from a CDN is refused at once rather than left to time out
            page.route(lambda u: not u.startswith("http://127.0.0.1"), lambda r: r.abort())
            t0 = time.monotonic()
            page.goto(url, wait_until="commit", timeout=60_000)  # Voilà streams the page as the notebook runs
            header = page.locator(".kit-explorer h4")
            header.first.wait_for(timeout=150_000)  # the widgets render the first view
            first_render = time.monotonic() - t0
            assert default in header.first.inner_text()
            text = page.locator("body").inner_text()
            assert "Static view" not in text  # the app shows only the interactive view
            assert "Traceback" not in text and "There was an error" not in text, text[-2000:]
            assert "Loading weights" not in text and "it/s]" not in text  # no progress bars in the view
            assert page.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0

            # another query: the query dropdown (an ipywidgets Dropdown renders as <select>)
            select = page.locator(".widget-dropdown").filter(has=page.locator("label", has_text="query")).locator(
                "select")
            options = [o.replace("\xa0", " ") for o in select.locator("option").all_inner_texts()]
            t0 = time.monotonic()
            select.select_option(index=next(i for i, o in enumerate(options) if o.startswith(f"{qid} ")))
            page.locator(".kit-explorer h4", has_text=qid).wait_for(timeout=60_000)
            switch = time.monotonic() - t0
            view = page.locator(".kit-explorer")
            assert view.count() == 1  # the view replaced, not appended

            # that query's prompt and completion
            prompt, completion = view.locator("p .doc").all_inner_texts()[:2]
            assert prompt.strip() == q.loc[qid, "prompt"].strip()
            assert completion.strip() == q.loc[qid, "completion"].strip()
            # its top and bottom documents: side, rank, source, in the top-k table's order; score kinds in the header
            heads = view.locator("th").all_inner_texts()
            assert heads[:5] == ["", "rank", "per_nat", "raw", "normalized"] and "source" in heads
            assert "states the fact" in heads  # the ground-truth column of the labelled lab corpus
            rows = view.locator("tr").all()[1:]
            assert len(rows) == len(picks) == 10
            col = {h: i for i, h in enumerate(heads)}
            docs = e.documents[model]
            for row, (_, pick) in zip(rows, picks.iterrows()):
                cells = row.locator("td").all_inner_texts()
                assert cells[0] == pick["side"] and cells[1] == str(int(pick["rank"]))
                assert float(cells[col["per_nat"]]) == pytest.approx(pick["per_nat"], rel=1e-3)
                assert cells[col["source"]] == docs.loc[pick["document"], "source"]
                assert cells[col["states the fact"]] == ("yes" if truth[pick["document"]] else "")
            # every shown document token-highlighted (spans with a background), and its per-layer bars
            stats = view.evaluate("""v => [...v.querySelectorAll('tr')].slice(1).map(r => {
                const spans = [...r.querySelectorAll('.doc span[title]')];
                const shaded = spans.filter(s => s.style.background && !/rgba\\([^)]*,\\s*0(\\.0+)?\\)/.test(
                    getComputedStyle(s).backgroundColor));
                const bars = [...r.querySelectorAll('.bar')];
                return [spans.length, shaded.length, bars.length, bars.filter(b => b.offsetWidth > 0).length];
            })""")
            for spans, shaded, bars, drawn in stats:
                assert spans > 0 and shaded > 0, stats
                assert bars == n_layers and drawn > 0, stats
            assert "Loading weights" not in page.locator("body").inner_text()

            SCREENSHOT.parent.mkdir(exist_ok=True)
            height = page.evaluate("() => document.getElementById('rendered_cells').scrollHeight")  # Voilà's scroller
            page.set_viewport_size({"width": 1500, "height": min(height + 20, 6000)})
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(f"explorer app: first render {first_render:.1f} s, query switch {switch:.1f} s -> {SCREENSHOT}")
            page.close(run_before_unload=True)  # the page asks Voilà to shut its kernel down
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()
