"""The end-to-end benchmark's verdicts on the speed targets (`benchmarks/bench_peers.py`), on planted numbers."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(kit, peers, kit_rss=0.7, peer_rss=0.8):
    tools = {"kit": {"wall_s": kit, "median_s": sorted(kit)[len(kit) // 2], "peak_rss_gb": kit_rss}}
    for name, walls in peers.items():
        tools[name] = {"wall_s": walls, "median_s": sorted(walls)[len(walls) // 2], "peak_rss_gb": peer_rss}
    return {"tools": tools}


def test_the_best_peer_is_the_fastest_median_and_rounds_are_paired(bench):
    s = summary([24.0, 25.0, 26.0], {"slow": [70.0, 71.0, 72.0], "fast": [50.0, 48.0, 52.0]})
    v = bench.verdicts(s, floor_s=30.0)
    assert v["best_peer"] == "fast"
    assert v["speedup"] == pytest.approx(50.0 / 25.0)  # medians 50 and 25: exactly 2×, which meets ≥ 2×
    assert v["speedup_met"] is True
    assert v["speedup_by_round"] == pytest.approx([50 / 24, 48 / 25, 52 / 26])
    assert "2 of 3 ≥ 2×" in v["lines"][2]
    assert v["over_floor"] == pytest.approx(25.0 / 30.0) and v["floor_met"] is True


def test_each_target_can_fail(bench):
    s = summary([26.0], {"fast": [50.0]}, kit_rss=0.9, peer_rss=0.8)
    v = bench.verdicts(s, floor_s=12.0)
    assert v["speedup"] == pytest.approx(50 / 26) and v["speedup_met"] is False
    assert v["rss_met"] is False  # 0.9 GB against a peer's 0.8 GB
    assert v["over_floor"] == pytest.approx(26 / 12) and v["floor_met"] is False
    assert all("NOT met" in line for line in v["lines"][2:])


def test_bergson_is_timed_as_its_cli_alone(bench, tmp_path):
    """The runner around bergson's CLI prepares datasets and exports scores; neither counts towards bergson's time
    or memory (planted: a 50 s runner around a 44 s CLI of 1.1 GB, the runner itself 0.49 GB)."""
    import json

    (tmp_path / "timings.json").write_text(json.dumps({
        "timings_s": {"runner_imports": 2.1, "tokenise": 1.4, "bergson_process": 44.0, "export": 0.8, "total": 48.4},
        "peak_rss_mib": {"runner": 500.0, "bergson": 1126.4}}))
    got = bench.bergson_cli(tmp_path, runner_wall=50.0)
    assert got["wall_s"] == pytest.approx(44.0)
    assert got["peak_rss_gb"] == pytest.approx(1.1)
    assert got["runner_wall_s"] == pytest.approx(50.0)
