"""`kit plan`: memory per stage from the shapes, measured times, and advice that names the option to change."""

import json

import pytest

from kit.cli import main
from kit.corpus import InputError
from kit.plan import GiB, PlanConfig, plan, render


def test_plan_counts_the_factor_and_query_memory_from_the_shapes(smoke_world):
    from kit.models import load_model, tracked_modules

    p = plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], queries=smoke_world["queries"],
                        device="cpu"))
    model, _ = load_model(smoke_world["model"])
    layers = [(m.out_features, m.in_features) for m in tracked_modules(model).values()]  # Llama MLPs: no bias
    weights = sum(o * i for o, i in layers)
    assert p["inputs"]["tracked_weights"] == weights and p["inputs"]["documents"] == 160
    assert p["inputs"]["queries"] == 6 and p["inputs"]["measured"]
    assert p["memory"]["score"]["preconditioned query gradients"] == 6 * weights * 4
    assert p["memory"]["score"]["factors (eigenbases, Λ)"] == sum(i * i + o * o + i + o + o * i for o, i in layers) * 4
    assert p["memory"]["score"]["score store pages (memory-mapped)"] == 6 * 160 * 4 + 160 * 8
    assert p["time"]["fit"] > 0 and p["time"]["score"] > 0 and p["timing"]["fit_s_per_token"] > 0
    # measured on the longest batch; a long-lived test process may reuse freed memory, then it is estimated
    assert p["memory"]["fit"]["activations of one batch"] > 0
    assert p["timing"]["activation_source"] in ("measured", "estimated")
    low = plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], n_queries=100, query_rank="4",
                          device="cpu", measure=False))
    assert low["memory"]["score"]["preconditioned query gradients"] == 100 * sum(4 * (o + i) for o, i in layers) * 4
    assert low["time"] is None and "not measured" in render(low)
    assert "every stage fits" in render(p)


def test_plan_names_the_option_that_fixes_a_stage(smoke_world):
    p = plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], n_queries=100_000, device="cpu",
                        measure=False, memory_gb=1.0))
    assert any("score needs" in a and "--query-rank 32" in a for a in p["advice"])
    p = plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], n_queries=1, device="cpu",
                        measure=False, memory_gb=1e-5))
    assert any("fit needs" in a for a in p["advice"])


def test_plan_without_weights_or_corpus(tmp_path, capsys):
    """A 1B-parameter Llama given as a configuration only, on a million documents it does not have."""
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tmp_path), "--n-docs", "1000000", "--tokens-per-doc", "512",
                 "--query-rank", "32", "--device", "cpu", "--memory-gb", "80", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1,000,000 documents" in text and "48 tracked layers" in text
    p = json.loads(out.read_text())
    assert p["inputs"]["tracked_weights"] == 16 * 3 * 2048 * 8192
    assert p["memory"]["fit"]["model weights"] == pytest.approx(p["inputs"]["parameters"] * 4)
    assert p["disk"]["score store"] == 100 * 1_000_000 * 4 + 1_000_000 * 8


def test_plan_bad_values(smoke_world, capsys):
    with pytest.raises(InputError, match="--nproc must be at least 1"):
        plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], nproc=0))
    with pytest.raises(InputError, match="give --corpus, or --n-docs"):
        plan(PlanConfig(model=smoke_world["model"]))
    with pytest.raises(InputError, match="--dtype must be one of"):
        plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], dtype="int4"))
    assert main(["plan", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--device", "tpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["plan", "--model", smoke_world["model"], "--corpus", smoke_world["corpus"], "--query-rank",
                 "zero"]) == 2
    assert "--query-rank must be 'full' or a positive integer" in capsys.readouterr().err


def test_plan_times_the_queries_and_scoring_in_the_basis_the_run_will_use(smoke_world):
    """Few documents against many queries keep P in the eigenbasis (see `preconditioned_queries`); the plan measures
    in the same basis. It times one batch of queries, so it must scale the documents' tokens to that batch: else a
    batch of 8 would never choose the eigenbasis that 2,000 queries do."""
    from kit.models import load_model, tracked_modules

    model, _ = load_model(smoke_world["model"])
    layers = {n: (m.out_features, m.in_features) for n, m in tracked_modules(model).items()}
    for Q in (6, 2000):
        p = plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], n_queries=Q, device="cpu"))
        doc_tokens = p["inputs"]["tokens"] * p["inputs"]["padding"]
        expect = sorted(n for n, (o, i) in layers.items() if doc_tokens * (o * o + i * i) < Q * o * i * (o + i))
        assert p["timing"]["eigenbasis_layers"] == expect
        assert p["time"]["score"] > 0
    assert expect == sorted(layers)  # 2,000 queries: every layer kept in the eigenbasis (6 queries: none)


@pytest.mark.parametrize("workers", [1, 2])
def test_plan_times_the_fit_on_its_worker_threads_with_their_batches(smoke_world, workers):
    """The fit's passes are timed as `kit fit` runs them: on its worker threads, each worker's batches holding
    1/W of the token cap; one batch per worker from each of the three places sampled."""
    p = plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], n_queries=4, device="cpu",
                        max_batch_tokens=64, workers=workers))
    assert p["inputs"]["workers"] == workers and p["timing"]["workers"] == workers
    assert p["inputs"]["fit_batch_tokens"] == 64 // workers
    assert p["timing"]["measured_batches"] == 3 * workers
    assert p["timing"]["fit_s_per_token"] > 0 and p["timing"]["replay_s_per_token"] > 0
    assert ("the fit on 2 worker threads" in render(p)) == (workers == 2)
    with pytest.raises(InputError, match="--workers must be a whole number of at least 1"):
        plan(PlanConfig(model=smoke_world["model"], corpus=smoke_world["corpus"], workers=0))
