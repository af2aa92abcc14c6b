"""The model fingerprint that keys cached factors sees every weight of the model, all of it, in its own dtype."""

import copy

import pytest
import torch

from kit.models import model_fingerprint, tracked_modules
from kit.smoke import tiny_model

# the MLP weights are 64 × 512 float32 = 128 KiB each: twice the 64 KiB the old fingerprint looked at
KW = dict(vocab_size=50, hidden=64, intermediate=512, layers=2, heads=2, seed=0)


def fp(model, names=None):
    return model_fingerprint(model, tracked_modules(model, names))


def bumped(x: torch.Tensor) -> torch.Tensor:
    """The next representable value above ``x``: the smallest possible change."""
    return torch.nextafter(x, torch.tensor(float("inf"), dtype=x.dtype))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", **KW)


def test_same_model_same_fingerprint(model):
    assert fp(model) == fp(model)
    assert fp(tiny_model("llama", **KW)) == fp(model)  # an identical model built anew
    assert fp(tiny_model("llama", **{**KW, "seed": 1})) != fp(model)
    assert fp(model, ["down_proj"]) != fp(model)  # the tracked module names are part of it


@pytest.mark.parametrize("where", ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                   "model.layers.1.input_layernorm.weight", "lm_head.weight"])
def test_a_change_outside_the_tracked_layers_changes_it(model, where):
    m = copy.deepcopy(model)
    assert not any(where.startswith(n) for n in tracked_modules(m))
    with torch.no_grad():
        p = dict(m.named_parameters())[where].view(-1)
        p[-1] = bumped(p[-1])
    assert fp(m) != fp(model)


def test_a_change_to_a_buffer_changes_it(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        b = m.model.rotary_emb.inv_freq
        b[-1] = bumped(b[-1])
    assert fp(m) != fp(model)


def test_a_change_deep_inside_a_large_tracked_weight_changes_it(model):
    name = next(n for n in tracked_modules(model) if n.endswith("up_proj"))
    w = dict(model.named_modules())[name].weight
    assert w.numel() * w.element_size() >= 2 * (1 << 16)
    deep = w.numel() - 5  # far beyond the first 64 KiB
    assert deep * w.element_size() > 1 << 16
    m = copy.deepcopy(model)
    with torch.no_grad():
        mw = dict(m.named_modules())[name].weight.view(-1)
        mw[deep] = bumped(mw[deep])
    assert fp(m) != fp(model)
    # two elements swapped: the weight's sum is unchanged, its bytes are not
    m = copy.deepcopy(model)
    with torch.no_grad():
        mw = dict(m.named_modules())[name].weight.view(-1)
        mw[[deep, deep - 1000]] = mw[[deep - 1000, deep]].clone()
    assert fp(m) != fp(model)


def test_dtype_is_part_of_it_and_bfloat16_models_work(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    f = fp(bf16)
    assert len(f) == 16 and f == fp(bf16)
    assert f != fp(model)
    assert fp(tiny_model("llama", **KW, dtype=torch.bfloat16)) == f  # same weights rounded the same way
    # a change of one bfloat16 element deep inside a tracked weight is seen too
    with torch.no_grad():
        w = next(iter(tracked_modules(bf16).values())).weight.view(-1)
        w[-1] = bumped(w[-1])
    assert fp(bf16) != f


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_other_architectures(arch):
    a, b = tiny_model(arch, **KW), tiny_model(arch, **KW)
    assert fp(a) == fp(b)
    with torch.no_grad():
        p = next(p for n, p in a.named_parameters() if "attn" in n or "attention" in n).view(-1)
        p[0] = bumped(p[0])
    assert fp(a) != fp(b)
