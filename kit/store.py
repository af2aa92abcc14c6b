"""How a run directory's artefacts are stored: atomically, with provenance and checksums, under locks.

Every artefact file ``F`` (factors, score store, token store files) gets a sidecar ``F.json``::

    {"sha256": …, "bytes": …, "made_from": {…what it was computed from: keys of model, corpus, config…}}

written *after* ``F`` itself, and both by write-to-temporary-then-rename, so a reader sees either the old pair, the
new pair, or a file without its sidecar (treated as missing: it is recomputed). :func:`verify` recomputes the
checksum and compares the provenance; any mismatch is one :class:`StoreError` naming the file and what differs,
which the pipeline answers by recomputing the stage (or, where that would lose work, by refusing with the command
that repairs it).

Concurrent jobs on one run are safe by design: whoever writes a stage or reads-modifies-writes ``config.json``
holds an exclusive ``fcntl`` lock on a lock file next to it (:func:`lock`); a second job waits, then finds the
stage done and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pandas as pd

from .corpus import InputError


class StoreError(InputError):
    """A stored artefact is missing, truncated, altered or was computed from something else."""


PathLike = Union[str, Path]


def sha256_file(path: PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json(path: PathLike, obj) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=2, default=str))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: PathLike, default=None):
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{path} is not valid JSON ({err.msg}); it was truncated or edited by hand") from None


def seal(path: PathLike, made_from: dict) -> None:
    """Record ``path``'s checksum, size and provenance in its sidecar (call after the file is complete)."""
    path = Path(path)
    write_json(path.with_name(path.name + ".json"),
               {"sha256": sha256_file(path), "bytes": path.stat().st_size, "made_from": made_from})


def verify(path: PathLike, made_from: Optional[dict] = None, checksum: bool = True) -> None:
    """Raise :class:`StoreError` unless ``path`` exists, matches its sidecar and was made from ``made_from``."""
    path = Path(path)
    side = path.with_name(path.name + ".json")
    if not path.exists():
        raise StoreError(f"{path} is missing")
    meta = read_json(side)
    if meta is None:
        raise StoreError(f"{path} has no checksum record ({side.name}); it was not completely written")
    if path.stat().st_size != meta["bytes"]:
        raise StoreError(f"{path} has {path.stat().st_size} bytes, {meta['bytes']} were written: it was truncated or "
                         "altered")
    if checksum and sha256_file(path) != meta["sha256"]:
        raise StoreError(f"{path} does not match its checksum: it was altered after it was written")
    if made_from is not None:
        diff = {k: (meta["made_from"].get(k), v) for k, v in made_from.items() if meta["made_from"].get(k) != v}
        if diff:
            k, (old, new) = next(iter(diff.items()))
            raise StoreError(f"{path} was computed from {k}={old!r}, not {new!r}")


def is_valid(path: PathLike, made_from: Optional[dict] = None) -> bool:
    try:
        verify(path, made_from)
        return True
    except StoreError:
        return False


def discard(path: PathLike) -> None:
    path = Path(path)
    for p in (path, path.with_name(path.name + ".json")):
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(path: PathLike) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (created if needed); released when the block ends or the process
    dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def save_tensors(path: PathLike, tensors: dict, made_from: dict) -> None:
    """safetensors file written atomically and sealed with its provenance."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp(path)
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.data_ptr() in seen:  # layers sharing one tensor (e.g. one input's eigenbasis): a copy
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    save_file(out, str(tmp),
              metadata={"made_from": json.dumps(made_from, sort_keys=True, default=str)})
    os.replace(tmp, path)
    seal(path, made_from)


def load_tensors(path: PathLike, made_from: Optional[dict] = None, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    verify(path, made_from)
    return load_file(str(path), device=device)


# --------------------------------------------------------------------------------------------------------------
# The top-k table
# --------------------------------------------------------------------------------------------------------------


def top_k_table(raw: np.ndarray, nats: np.ndarray, doc_norm: np.ndarray, query_ids, doc_ids, k: int) -> pd.DataFrame:
    """Each query's top and bottom ``k`` documents under the raw (= per-nat) and the document-normalised ranking.

    Columns: query, ranking (``raw``/``normalized``), side (``top``/``bottom``), rank (1 = most positive for top,
    most negative for bottom), document, raw, per_nat, normalized. Reads one query row of the score store at a time.
    """
    doc_ids = np.asarray(doc_ids, dtype=object)
    norm = np.maximum(np.asarray(doc_norm, dtype=np.float64), np.finfo(np.float64).tiny)
    D = raw.shape[1]
    k = min(k, D)
    parts = []
    for q, qid in enumerate(query_ids):
        r = np.asarray(raw[q], dtype=np.float64)
        for ranking, values in (("raw", r), ("normalized", r / norm)):
            for side, sign in (("top", -1.0), ("bottom", 1.0)):
                part = np.argpartition(sign * values, k - 1)[:k] if k < D else np.arange(D)
                order = part[np.argsort(sign * values[part], kind="stable")]
                parts.append(pd.DataFrame({
                    "query": qid, "ranking": ranking, "side": side, "rank": np.arange(1, len(order) + 1),
                    "document": doc_ids[order], "raw": r[order], "per_nat": r[order] / float(nats[q]),
                    "normalized": r[order] / norm[order]}))
    return pd.concat(parts, ignore_index=True)
