"""Documents and queries: read, validate, tokenise, chunk, and batch.

Documents: jsonl or parquet with ``id``, ``text``, ``source``. Queries: jsonl (or parquet) with ``id``,
``prompt``, ``completion`` and optionally ``task``. Every problem is one :class:`InputError` naming the file,
the row and what to fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

IGNORE = -100


from .errors import InputError  # noqa: E402  (defined without imports, re-exported here)


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def read_table(path: Union[str, Path], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file {path} does not exist")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix in (".jsonl", ".json"):
            if path.stat().st_size == 0:
                return pd.DataFrame()
            if path.suffix == ".json":
                return pd.read_json(path, dtype=False)
            # json.loads per line: keeps big integers and mixed-type columns as Python values
            import json

            with open(path, encoding="utf-8") as fh:
                return pd.DataFrame([json.loads(line) for line in fh if line.strip()])
    except ValueError as err:
        raise InputError(f"{what} file {path} could not be parsed: {err}") from err
    raise InputError(f"{what} file {path} must be .jsonl or .parquet")


def _check_columns(df: pd.DataFrame, required: Sequence[str], what: str, path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{what} {path} lacks the column(s) {missing}; each row needs {list(required)}")


def load_corpus(path_or_df: Union[str, Path, pd.DataFrame]) -> pd.DataFrame:
    """Read and validate a corpus: non-empty, unique string ids, non-empty text, a source label."""
    df = path_or_df.copy() if isinstance(path_or_df, pd.DataFrame) else read_table(path_or_df, "corpus")
    where = "corpus" if isinstance(path_or_df, pd.DataFrame) else f"corpus {path_or_df}"
    if len(df) == 0:
        raise InputError(f"{where} is empty: it needs at least one document with id, text, source")
    _check_columns(df, ["id", "text", "source"], "corpus", where)
    df["id"] = df["id"].astype(str)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise InputError(f"{where}: document id {dup.iloc[0]!r} occurs more than once; ids must be unique")
    empty = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if empty.any():
        raise InputError(f"{where}: document {df['id'][empty].iloc[0]!r} has empty text; remove it or give it text")
    df["source"] = df["source"].fillna("unknown").astype(str)
    return df[["id", "text", "source"] + [c for c in df.columns if c not in ("id", "text", "source")]].reset_index(drop=True)


def load_queries(path_or_df: Union[str, Path, pd.DataFrame]) -> pd.DataFrame:
    df = path_or_df.copy() if isinstance(path_or_df, pd.DataFrame) else read_table(path_or_df, "queries")
    where = "queries" if isinstance(path_or_df, pd.DataFrame) else f"queries {path_or_df}"
    if len(df) == 0:
        raise InputError(f"{where} is empty: it needs at least one row with id, prompt, completion")
    _check_columns(df, ["id", "prompt", "completion"], "queries", where)
    df["id"] = df["id"].astype(str)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise InputError(f"{where}: query id {dup.iloc[0]!r} occurs more than once; ids must be unique")
    empty = df["completion"].isna() | (df["completion"].astype(str).str.strip() == "")
    if empty.any():
        raise InputError(
            f"{where}: query {df['id'][empty].iloc[0]!r} has an empty completion; influence is measured on the "
            "completion's tokens, so give every query its completion"
        )
    if "task" not in df.columns:
        df["task"] = "unknown"
    df["task"] = df["task"].fillna("unknown").astype(str)
    df["prompt"] = df["prompt"].fillna("").astype(str)
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# Streaming a corpus: record batches from jsonl, parquet or a saved Hugging Face dataset
# --------------------------------------------------------------------------------------------------------------


def corpus_format(path: Union[str, Path]) -> str:
    """``parquet``, ``jsonl`` or ``hf`` (a directory written by ``datasets.Dataset.save_to_disk``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"corpus {path} does not exist; pass a .jsonl or .parquet file or a saved Hugging Face "
                         "dataset directory")
    if path.is_dir():
        if (path / "state.json").exists():
            return "hf"
        raise InputError(f"corpus {path} is a directory but not a saved Hugging Face dataset (no state.json); pass a "
                         ".jsonl or .parquet file or a directory written by datasets.Dataset.save_to_disk")
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    raise InputError(f"corpus {path} must be .jsonl, .parquet or a saved Hugging Face dataset directory")


def _hf_files(path: Path) -> List[Path]:
    state = json.loads((path / "state.json").read_text())
    return [path / f["filename"] for f in state.get("_data_files", [])]


def count_records(path: Union[str, Path]) -> int:
    """Number of records, read from metadata where the format has it (parquet, HF) or by counting lines."""
    fmt, path = corpus_format(path), Path(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "hf":
        import pyarrow as pa

        n = 0
        for f in _hf_files(path):
            with pa.memory_map(str(f)) as src:
                n += sum(b.num_rows for b in pa.ipc.open_stream(src))
        return n
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def iter_records(source: Union[str, Path, pd.DataFrame], batch_rows: int = 2048) -> Iterator[pd.DataFrame]:
    """The corpus as a stream of DataFrames of at most ``batch_rows`` rows; never the whole file in memory."""
    if isinstance(source, pd.DataFrame):
        for start in range(0, len(source), batch_rows):
            yield source.iloc[start : start + batch_rows]
        return
    fmt, path = corpus_format(source), Path(source)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for b in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield b.to_pandas()
    elif fmt == "hf":
        import pyarrow as pa

        for f in _hf_files(path):
            with pa.memory_map(str(f)) as src:
                for b in pa.ipc.open_stream(src):
                    for start in range(0, b.num_rows, batch_rows):
                        yield b.slice(start, batch_rows).to_pandas()
    else:
        rows: list = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"corpus {path}, line {n}: not valid JSON ({err.msg})") from None
                if len(rows) == batch_rows:
                    yield pd.DataFrame(rows)
                    rows = []
        if rows:
            yield pd.DataFrame(rows)


def check_corpus(source: Union[str, Path, pd.DataFrame]) -> None:
    """Cheap checks before any model is loaded: the corpus exists, parses and has ``id``, ``text``, ``source``."""
    first = next(iter_records(source, 16), None)
    where = "corpus" if isinstance(source, pd.DataFrame) else f"corpus {source}"
    if first is None or len(first) == 0:
        raise InputError(f"{where} is empty: it needs at least one document with id, text, source")
    _check_columns(first, ["id", "text", "source"], "corpus", where)


def _clean(df: pd.DataFrame, where: str) -> pd.DataFrame:
    _check_columns(df, ["id", "text", "source"], "corpus", where)
    df = df.copy()
    df["id"] = df["id"].astype(str)
    empty = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if empty.any():
        raise InputError(f"{where}: document {df['id'][empty].iloc[0]!r} has empty text; remove it or give it text")
    df["source"] = df["source"].fillna("unknown").astype(str)
    return df[["id", "text", "source"] + [c for c in df.columns if c not in ("id", "text", "source")]]


def _id_hashes(ids: Sequence[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                    dtype=np.uint64)


# --------------------------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tokenised:
    """Token ids per item plus labels (``IGNORE`` where no loss is taken), in memory (queries, small sets)."""

    ids: List[List[int]]
    labels: List[List[int]]
    table: pd.DataFrame  # one row per item (documents: after chunking)
    note: str = ""  # what chunking/truncation did, for the user

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def item(self, i: int) -> Tuple[Sequence[int], Sequence[int]]:
        return self.ids[i], self.labels[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, lab in zip(self.ids, self.labels):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(lab, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def _pieces(toks: Sequence[int], max_tokens: int, long_docs: str) -> List[Tuple[int, int]]:
    """Token spans ``[start, end)`` a document becomes: itself, its first ``max_tokens`` or consecutive chunks."""
    n = len(toks)
    if n <= max_tokens:
        return [(0, n)]
    if long_docs == "truncate":
        return [(0, max_tokens)]
    return [(s, min(s + max_tokens, n)) for s in range(0, n, max_tokens) if min(s + max_tokens, n) - s >= 2]


def _chunk_rows(docs: pd.DataFrame, enc: List[List[int]], offsets: Optional[list], max_tokens: int, long_docs: str,
                counts: dict):
    """Rows (metadata + the piece's own text) and token lists of the pieces of a batch of documents."""
    rows, pieces = [], []
    extra = [c for c in docs.columns if c not in ("id", "text", "source")]
    for r, (doc, toks) in enumerate(zip(docs.itertuples(index=False, name=None), enc)):
        d = dict(zip(docs.columns, doc))  # plain tuples: column names that are not identifiers stay as they are
        if len(toks) < 2:
            raise InputError(f"document {d['id']!r} has fewer than 2 tokens; it has no next-token loss")
        spans = _pieces(toks, max_tokens, long_docs)
        if len(toks) > max_tokens:
            counts["long"] += 1
            counts["pieces"] += len(spans)
        text = str(d["text"])
        for k, (s, e) in enumerate(spans):
            if len(spans) == 1 and e == len(toks):
                piece_text = text
            elif offsets is not None:  # the piece's own characters, from the tokenizer's offsets
                start = 0 if s == 0 else offsets[r][s][0]
                end = len(text) if e == len(toks) else offsets[r][e - 1][1]
                piece_text = text[start:end]
            else:
                piece_text = None
            row = {"id": d["id"] if len(spans) == 1 else f"{d['id']}#{k}", "parent_id": d["id"],
                   "source": d["source"], "n_tokens": e - s, "piece": k, "n_pieces": len(spans),
                   "truncated": long_docs == "truncate" and len(toks) > max_tokens, "text": piece_text}
            row.update({c: d[c] for c in extra if c not in row})
            rows.append(row)
            pieces.append(toks[s:e])
    return rows, pieces


def _encode(tokenizer, texts: List[str]):
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    return tokenizer(texts, add_special_tokens=True)["input_ids"], None


def _note(n_docs: int, counts: dict, max_tokens: int, long_docs: str) -> str:
    if counts["long"] == 0:
        return f"all {n_docs} documents fit in {max_tokens} tokens"
    if long_docs == "chunk":
        return f"{counts['long']} document(s) longer than {max_tokens} tokens were chunked into {counts['pieces']} pieces"
    return (f"{counts['long']} document(s) longer than {max_tokens} tokens were truncated to their first {max_tokens} "
            "tokens")


def _check_chunking(max_tokens: int, long_docs: str) -> None:
    if long_docs not in ("chunk", "truncate"):
        raise InputError(f"long_docs must be 'chunk' or 'truncate', got {long_docs!r}")
    if max_tokens < 2:
        raise InputError(f"max_tokens must be at least 2, got {max_tokens}")


def tokenise_documents(docs: pd.DataFrame, tokenizer, max_tokens: int, long_docs: str = "chunk") -> Tokenised:
    """Tokenise a (small, in-memory) corpus as the model's tokenizer does; split or cut documents longer than
    ``max_tokens``. ``"chunk"`` splits a long document into consecutive pieces ``<id>#<k>`` of at most
    ``max_tokens`` tokens (the paper's 512-token documents), each row holding its piece's own text; ``"truncate"``
    keeps the first ``max_tokens``. The note says how many documents were affected. For corpora of any size
    :func:`build_token_store` does the same batch by batch onto disk."""
    _check_chunking(max_tokens, long_docs)
    counts = {"long": 0, "pieces": 0}
    enc, offsets = _encode(tokenizer, [str(t) for t in docs["text"]])
    rows, pieces = _chunk_rows(docs, enc, offsets, max_tokens, long_docs, counts)
    ids = [list(p) for p in pieces]
    return Tokenised(ids=ids, labels=[list(x) for x in ids], table=pd.DataFrame(rows),
                     note=_note(len(docs), counts, max_tokens, long_docs))


class TokenStore:
    """Tokenised documents on disk, read lazily: the unit a run scores.

    ``tokens.bin`` holds every document's token ids back to back (int32, memory-mapped), ``offsets.npy`` where each
    starts (``n + 1`` int64), ``documents.parquet`` one row of metadata per document (id, parent_id, source,
    n_tokens, piece, the piece's own text, the corpus's extra columns) and ``meta.json`` the key (a hash of the
    tokens), the chunking note and what it was built from. Memory held: the offsets (8 bytes per document).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.offsets = np.load(self.path / "offsets.npy")
        n_tok = int(self.offsets[-1])
        self.tokens = (np.memmap(self.path / "tokens.bin", dtype=np.int32, mode="r", shape=(n_tok,)) if n_tok
                       else np.zeros(0, dtype=np.int32))
        self._table: Optional[pd.DataFrame] = None

    key = property(lambda self: self.meta["key"])
    note = property(lambda self: self.meta["note"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def item(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        t = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        return t, t

    def fingerprint(self) -> str:
        return self.key

    @property
    def table(self) -> pd.DataFrame:
        """All metadata columns (text included); for big corpora prefer :meth:`columns`."""
        if self._table is None:
            self._table = pd.read_parquet(self.path / "documents.parquet")
        return self._table

    def columns(self, *names: str) -> pd.DataFrame:
        return pd.read_parquet(self.path / "documents.parquet", columns=list(names))

    def take(self, rows: Sequence[int]) -> Tokenised:
        """A small in-memory :class:`Tokenised` of the chosen rows (for detailed scores)."""
        ids = [self.item(int(r))[0].astype(np.int64).tolist() for r in rows]
        table = self.table.iloc[list(rows)].reset_index(drop=True)
        return Tokenised(ids=ids, labels=[list(x) for x in ids], table=table, note=self.note)


def build_token_store(source: Union[str, Path, pd.DataFrame], tokenizer, out_dir: Union[str, Path], max_tokens: int,
                      long_docs: str = "chunk", n_docs: Optional[int] = None, seed: int = 0, batch_rows: int = 2048,
                      progress: bool = False, provenance: Optional[dict] = None) -> TokenStore:
    """Tokenise a corpus record batch by record batch into a :class:`TokenStore` at ``out_dir``.

    ``n_docs``: a seeded sample of that many documents (the same rows ``DataFrame.sample(n, random_state=seed)``
    picks), kept in corpus order. Every document is validated as it streams by; a duplicate id is reported with
    its value. The store is written to a temporary directory and renamed into place, so a killed build leaves
    nothing half-written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    _check_chunking(max_tokens, long_docs)
    check_corpus(source)
    where = "corpus" if isinstance(source, pd.DataFrame) else f"corpus {source}"
    total = len(source) if isinstance(source, pd.DataFrame) else count_records(source)
    keep = None
    if n_docs is not None and n_docs < total:
        keep = np.sort(np.random.RandomState(seed).choice(total, n_docs, replace=False))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    h = hashlib.sha256(f"{max_tokens}/{long_docs}".encode())
    lengths: List[np.ndarray] = []
    hashes: List[np.ndarray] = []
    counts = {"long": 0, "pieces": 0}
    writer, schema, seen, n_in = None, None, 0, 0
    bar = tqdm(total=total, desc="tokenising documents", unit="doc", disable=not progress, mininterval=1.0)
    try:
        with open(tmp / "tokens.bin", "wb") as tok_fh:
            for df in iter_records(source, batch_rows):
                rows_here = len(df)
                if keep is not None:
                    lo, hi = np.searchsorted(keep, [seen, seen + rows_here])
                    df = df.iloc[keep[lo:hi] - seen]
                seen += rows_here
                bar.update(rows_here)
                if len(df) == 0:
                    continue
                df = _clean(df.reset_index(drop=True), where)
                n_in += len(df)
                hashes.append(_id_hashes(df["id"].tolist()))
                enc, offsets = _encode(tokenizer, df["text"].astype(str).tolist())
                rows, pieces = _chunk_rows(df, enc, offsets, max_tokens, long_docs, counts)
                for p in pieces:
                    arr = np.asarray(p, dtype=np.int32)
                    h.update(arr.tobytes())
                    h.update(len(arr).to_bytes(8, "little"))
                    tok_fh.write(arr.tobytes())
                lengths.append(np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)))
                table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
                if schema is None:
                    schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
                    writer = pq.ParquetWriter(tmp / "documents.parquet", schema)
                try:
                    table = table.select(schema.names).cast(schema)
                except (ValueError, KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                    raise InputError(f"{where}: rows {seen - rows_here}–{seen} have columns or types that differ from "
                                     f"earlier rows ({err}); give every row the same columns") from None
                writer.write_table(table)
        if writer is not None:
            writer.close()
            writer = None
        if n_in == 0:
            raise InputError(f"{where} is empty: it needs at least one document with id, text, source")
        _check_duplicates(np.concatenate(hashes), tmp / "documents.parquet", where)
        lens = np.concatenate(lengths)
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
        meta = {"key": h.hexdigest()[:16], "n_documents": n_in, "n_items": int(len(lens)), "n_tokens": int(lens.sum()),
                "max_tokens": max_tokens, "long_docs": long_docs, "note": _note(n_in, counts, max_tokens, long_docs),
                "source": str(source) if not isinstance(source, pd.DataFrame) else "DataFrame",
                "n_docs": n_docs, "seed": seed, **(provenance or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages for reuse: hand them back
    return TokenStore(out_dir)


def _check_duplicates(hashes: np.ndarray, documents: Path, where: str) -> None:
    s = np.sort(hashes)
    dup = s[1:][s[1:] == s[:-1]]
    if len(dup) == 0:
        return
    ids = pd.read_parquet(documents, columns=["parent_id"])["parent_id"].drop_duplicates()
    bad = ids[_id_hashes(ids.tolist()) == dup[0]]
    name = bad.iloc[0] if len(bad) else "?"
    raise InputError(f"{where}: document id {name!r} occurs more than once; ids must be unique")


def tokenise_queries(queries: pd.DataFrame, tokenizer, max_tokens: Optional[int] = None) -> Tokenised:
    """Prompt tokens (as the tokenizer adds special tokens) followed by the completion's own tokens.

    Labels are ``IGNORE`` on the prompt, so the loss is ``-log p(completion | prompt)``.
    """
    ids, labels, n_prompt, n_comp = [], [], [], []
    for _, q in queries.iterrows():
        p = tokenizer(q["prompt"], add_special_tokens=True)["input_ids"] if q["prompt"] else []
        c = tokenizer(q["completion"], add_special_tokens=False)["input_ids"]
        if not c:
            raise InputError(f"query {q['id']!r}: the completion has no tokens")
        if not p:  # the first completion token needs a context to be predicted from
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if bos is None:
                raise InputError(f"query {q['id']!r} has an empty prompt and the tokenizer has no BOS token")
            p = [bos]
        if max_tokens is not None and len(p) + len(c) > max_tokens:
            raise InputError(
                f"query {q['id']!r} has {len(p) + len(c)} tokens, more than the model's context of {max_tokens}; shorten it"
            )
        ids.append(list(p) + list(c))
        labels.append([IGNORE] * len(p) + list(c))
        n_prompt.append(len(p))
        n_comp.append(len(c))
    table = queries.copy()
    table["n_prompt_tokens"], table["n_completion_tokens"] = n_prompt, n_comp
    return Tokenised(ids=ids, labels=labels, table=table)


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    index: torch.Tensor  # (B,) positions of the items in the tokenised set (always on the CPU)
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T) token ids or IGNORE; loss at t is -log p(labels[t] | tokens < t)

    def to(self, device) -> "Batch":
        """The tensors the model reads on ``device``; the item index stays on the CPU (it addresses host arrays)."""
        return Batch(self.index, *(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask,
                                                                             self.labels)))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class Batches(SequenceABC):
    """Right-padded batches of a tokenised set, built lazily when indexed (nothing is materialised up front).

    Items are sorted by length (descending) so that padding, i.e. wasted compute, stays small; a batch holds at
    most ``batch_size`` items and, with ``max_batch_tokens``, at most that many padded tokens (at least one item).
    Results do not depend on the grouping: every per-item quantity (labels sampled for the Fisher included) is keyed
    by the item's index, not by its batch. ``shard(rank, world)`` is the view of every ``world``-th batch.
    """

    def __init__(self, tok, batch_size: int, pad_id: int, sort_by_length: bool = True,
                 max_batch_tokens: Optional[int] = None):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise InputError(f"max batch tokens must be at least 1, got {max_batch_tokens}")
        self.tok, self.pad_id = tok, pad_id
        self.batch_size, self.max_batch_tokens, self.sorted = batch_size, max_batch_tokens, sort_by_length
        lengths = np.asarray(tok.lengths, dtype=np.int64)
        self.order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(lengths))
        bounds, start, n = [0], 0, len(lengths)
        while start < n:
            stop = min(start + batch_size, n)
            if max_batch_tokens is not None:
                longest = int(lengths[self.order[start]]) if sort_by_length else 0
                end = start
                while end < stop:
                    longest = max(longest, int(lengths[self.order[end]]))
                    if end > start and longest * (end - start + 1) > max_batch_tokens:
                        break
                    end += 1
                stop = end
            bounds.append(stop)
            start = stop
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.selected = np.arange(len(bounds) - 1)
        self._lengths = lengths

    @property
    def padded_tokens(self) -> int:
        """Tokens in these batches, padding included (what a pass over them computes on)."""
        if len(self.order) == 0 or len(self.selected) == 0:
            return 0
        longest = np.maximum.reduceat(self._lengths[self.order], self.bounds[:-1])  # every batch is non-empty
        sizes = np.diff(self.bounds)
        return int((sizes[self.selected] * longest[self.selected]).sum())

    @property
    def signature(self) -> dict:
        """What decides the grouping; a resumed pass must use the same."""
        return {"n_items": int(len(self.order)), "batch_size": self.batch_size,
                "max_batch_tokens": self.max_batch_tokens, "sorted": self.sorted}

    def shard(self, rank: int, world: int) -> "Batches":
        view = copy.copy(self)
        view.selected = self.selected[rank::world]
        return view

    def __len__(self) -> int:
        return len(self.selected)

    def __getitem__(self, i: int) -> Batch:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        b = int(self.selected[i])
        idx = self.order[self.bounds[b] : self.bounds[b + 1]]
        items = [self.tok.item(int(j)) for j in idx]
        T = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, (ids, lab) in enumerate(items):
            n = len(ids)
            input_ids[r, :n] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            labels[r, :n] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
            mask[r, :n] = 1
        return Batch(torch.as_tensor(idx, dtype=torch.long), input_ids, mask, labels)


def make_batches(tok, batch_size: int, pad_id: int, sort_by_length: bool = True,
                 max_batch_tokens: Optional[int] = None) -> Batches:
    """Lazy right-padded batches of ``tok`` (a :class:`Tokenised` or :class:`TokenStore`); see :class:`Batches`."""
    return Batches(tok, batch_size, pad_id, sort_by_length, max_batch_tokens)
