"""Every bad input gets one clear error that names what to fix."""

import json
import threading

import pandas as pd
import pytest
import torch

from kit import FitConfig, ScoreConfig, ekfac, fit, score
from kit.cli import main
from kit.corpus import Batch, InputError, load_corpus, load_queries, tokenise_documents
from kit.influence import _nonfinite_message
from kit.models import ModelError, load_model, tracked_modules
from kit.smoke import tiny_model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_empty_corpus(tmp_path):
    with pytest.raises(InputError, match="is empty"):
        load_corpus(write_jsonl(tmp_path / "c.jsonl", []))


def test_corpus_without_required_columns(tmp_path):
    with pytest.raises(InputError, match=r"lacks the column\(s\) \['source'\]"):
        load_corpus(write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}]))


def test_empty_document(tmp_path):
    rows = [{"id": "a", "text": "fine", "source": "wiki"}, {"id": "b", "text": "  ", "source": "wiki"}]
    with pytest.raises(InputError, match="document 'b' has empty text"):
        load_corpus(write_jsonl(tmp_path / "c.jsonl", rows))


def test_duplicate_ids(tmp_path):
    rows = [{"id": "a", "text": "x y", "source": "wiki"}] * 2
    with pytest.raises(InputError, match="'a' occurs more than once"):
        load_corpus(write_jsonl(tmp_path / "c.jsonl", rows))


def test_empty_completion(tmp_path):
    rows = [{"id": "q1", "prompt": "What?", "completion": ""}]
    with pytest.raises(InputError, match="query 'q1' has an empty completion"):
        load_queries(write_jsonl(tmp_path / "q.jsonl", rows))


@pytest.mark.parametrize("mode,pieces,word", [("chunk", 3, "chunked"), ("truncate", 1, "truncated")])
def test_long_documents_are_chunked_or_truncated_and_say_so(smoke_world, mode, pieces, word):
    _, tok = load_model(smoke_world["model"])
    text = " ".join(["Paris is the capital of France."] * 6)
    n = len(tok(text)["input_ids"])
    docs = load_corpus(pd.DataFrame([{"id": "long", "text": text, "source": "wiki"},
                                     {"id": "short", "text": "Oslo.", "source": "wiki"}]))
    out = tokenise_documents(docs, tok, max_tokens=(n + 2) // 3 + 1, long_docs=mode)
    assert word in out.note and "1 document(s)" in out.note
    assert (out.table["parent_id"] == "long").sum() == pieces
    assert max(map(len, out.ids)) <= (n + 2) // 3 + 1
    if mode == "chunk":  # nothing lost: the pieces concatenate to the document
        assert sum(out.ids[:pieces], []) == tok(text)["input_ids"]


def test_unknown_module_name_lists_the_known_ones():
    model = tiny_model("llama", vocab_size=30, hidden=8, intermediate=12, layers=1, heads=2)
    with pytest.raises(ModelError, match=r"unknown module name 'mlp_in'.*down_proj, gate_proj"):
        tracked_modules(model, ["mlp_in"])
    assert len(tracked_modules(model, ["down_proj"])) == 1


def test_nan_covariance_names_the_layer():
    f = ekfac.LayerFactors("model.layers.3.mlp.up_proj", 2, 2, A=torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
                           S=torch.eye(2, dtype=torch.float64), n_tokens=4)
    with pytest.raises(ekfac.FactorError, match=r"layer model.layers.3.mlp.up_proj: the activation covariance A contains NaN"):
        ekfac.eigendecompose({"x": f})


@pytest.mark.parametrize("workers", [1, 2])
def test_nan_weights_fail_the_fit_with_a_named_layer(smoke_world, tmp_path, workers):
    model, tok = load_model(smoke_world["model"])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "broken")
    tok.save_pretrained(tmp_path / "broken")
    with pytest.raises(ekfac.FactorError, match=r"layer model\.layers\.1\.mlp\.up_proj: .* NaN or inf"):
        fit(FitConfig(model=str(tmp_path / "broken"), corpus=smoke_world["corpus"], workers=workers),
            tmp_path / "run", quiet=True)


def test_nan_layer_is_named_from_the_callers_forward_not_another_threads():
    """Module hooks fire in every thread: a second fit worker reaching a broken ``lm_head`` while the first
    looks for its broken layer must not be reported (a race the CI machine once hit)."""
    model = tiny_model("llama", vocab_size=30, hidden=8, intermediate=12, layers=2, heads=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
        model.lm_head.weight[0, 0] = float("inf")
    other = threading.Thread(target=lambda: model.lm_head(torch.ones(1, 8)))
    started = []

    def other_worker_runs_now(mod, args):  # deterministic interleaving: the other thread's lm_head goes first
        if not started:
            started.append(True)
            other.start()
            other.join()

    handle = model.model.layers[0].register_forward_pre_hook(other_worker_runs_now)
    ids = torch.tensor([[1, 2, 3, 4]])
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, index=torch.tensor([7]))
    message = _nonfinite_message(model, batch)
    handle.remove()
    assert started and message.startswith("layer model.layers.1.mlp.up_proj: produces NaN or inf outputs on documents [7]")


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_unreachable_hub_id_says_to_pass_a_local_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="pass a local model directory or .gguf file"):
        load_model("some-org/not-a-real-model-xyz")


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    # the corpus is checked before any model is loaded
    corpus = write_jsonl(tmp_path / "c.jsonl", [])
    code = main(["fit", "--model", str(tmp_path / "nope"), "--corpus", str(corpus), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: corpus") and "is empty" in err[0]
    code = main(["fit", "--model", str(tmp_path / "nope"), "--corpus", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.jsonl does not exist" in err[0]
    good = write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "text": "x y", "source": "wiki"}])
    code = main(["fit", "--model", str(tmp_path / "nope"), "--corpus", str(good), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: model path")
    assert not (tmp_path / "r").exists()  # a failed fit leaves no empty run directory


def test_bad_options():
    with pytest.raises(InputError, match="--damping must be 'heuristic' or a positive number"):
        FitConfig(damping="lots").validate()
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(InputError, match="--damping must be 'heuristic' or a positive number"):
            FitConfig(damping=bad).validate()
    with pytest.raises(InputError, match="--factor-dtype must be float32 or float64"):
        FitConfig(factor_dtype="bfloat16").validate()
    with pytest.raises(InputError, match="--dtype must be one of"):
        FitConfig(dtype="int8").validate()
    with pytest.raises(InputError, match="--dtype must be one of"):
        ScoreConfig(dtype="fp8").validate()
    with pytest.raises(InputError, match="--top-k must be at least 1"):
        ScoreConfig(top_k=0).validate()
    with pytest.raises(InputError, match=r"--max-batch-tokens must be at least 1 \(or 0 for no cap\)"):
        FitConfig(max_batch_tokens=-5).validate()
    assert FitConfig(max_batch_tokens=0).validate().max_batch_tokens is None  # 0: no cap
    from kit.pipeline import resolve_device

    with pytest.raises(InputError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available on this machine; use --device cpu"):
            resolve_device("cuda:0")
    with pytest.raises(InputError, match="--query-rank must be 'full' or a positive integer"):
        ScoreConfig(query_rank="0").validate()


def test_scoring_before_fitting(tmp_path):
    with pytest.raises(InputError, match="not a fitted run directory"):
        score(tmp_path, ScoreConfig(queries="q.jsonl"))
