"""Documents and queries: read, validate, tokenise, chunk, and batch.

Documents: jsonl or parquet with ``id``, ``text``, ``source``. Queries: jsonl (or parquet) with ``id``,
``prompt``, ``completion`` and optionally ``task``. Every problem is one :class:`InputError` naming the file,
the row and what to fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

IGNORE = -100


class InputError(ValueError):
    """Bad user input (corpus, queries, options); the message says what to fix."""


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
# Tokenising
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tokenised:
    """Token ids per item plus labels (``IGNORE`` where no loss is taken)."""

    ids: List[List[int]]
    labels: List[List[int]]
    table: pd.DataFrame  # one row per item (documents: after chunking)
    note: str = ""  # what chunking/truncation did, for the user

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, lab in zip(self.ids, self.labels):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(lab, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def tokenise_documents(docs: pd.DataFrame, tokenizer, max_tokens: int, long_docs: str = "chunk") -> Tokenised:
    """Tokenise documents as the model's tokenizer does; split or cut those longer than ``max_tokens``.

    ``long_docs="chunk"`` splits a long document into consecutive pieces ``<id>#<k>`` of at most
    ``max_tokens`` tokens (the paper's 512-token documents); ``"truncate"`` keeps the first ``max_tokens``.
    Either way the returned note says how many documents were affected.
    """
    if long_docs not in ("chunk", "truncate"):
        raise InputError(f"long_docs must be 'chunk' or 'truncate', got {long_docs!r}")
    if max_tokens < 2:
        raise InputError(f"max_tokens must be at least 2, got {max_tokens}")
    enc = tokenizer(list(docs["text"]), add_special_tokens=True)["input_ids"]
    rows, ids = [], []
    n_long = n_pieces = 0
    for (_, doc), toks in zip(docs.iterrows(), enc):
        if len(toks) < 2:
            raise InputError(f"document {doc['id']!r} has fewer than 2 tokens; it has no next-token loss")
        pieces = [toks]
        if len(toks) > max_tokens:
            n_long += 1
            if long_docs == "truncate":
                pieces = [toks[:max_tokens]]
            else:
                pieces = [toks[i : i + max_tokens] for i in range(0, len(toks), max_tokens)]
                pieces = [p for p in pieces if len(p) >= 2]
                n_pieces += len(pieces)
        for k, p in enumerate(pieces):
            row = {"id": doc["id"] if len(pieces) == 1 else f"{doc['id']}#{k}", "parent_id": doc["id"],
                   "source": doc["source"], "n_tokens": len(p), "piece": k, "n_pieces": len(pieces),
                   "truncated": long_docs == "truncate" and len(toks) > max_tokens}
            rows.append(row)
            ids.append(list(p))
    if n_long == 0:
        note = f"all {len(docs)} documents fit in {max_tokens} tokens"
    elif long_docs == "chunk":
        note = f"{n_long} document(s) longer than {max_tokens} tokens were chunked into {n_pieces} pieces"
    else:
        note = f"{n_long} document(s) longer than {max_tokens} tokens were truncated to their first {max_tokens} tokens"
    table = pd.DataFrame(rows)
    # the document's text and any further columns of the corpus (e.g. the lab world's ground-truth labels)
    extra = [c for c in docs.columns if c not in ("id", "source") and c not in table.columns]
    table = table.merge(docs[["id"] + extra].rename(columns={"id": "parent_id"}), on="parent_id", how="left")
    return Tokenised(ids=ids, labels=[list(x) for x in ids], table=table, note=note)


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
    index: torch.Tensor  # (B,) positions of the items in the Tokenised lists
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T) token ids or IGNORE; loss at t is -log p(labels[t] | tokens < t)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.index, self.input_ids, self.attention_mask, self.labels)))


def make_batches(tok: Tokenised, batch_size: int, pad_id: int, sort_by_length: bool = True) -> List[Batch]:
    """Group items into right-padded batches; sorting by length keeps padding (wasted compute) small.

    Results do not depend on the grouping: every per-item quantity (labels sampled for the Fisher included)
    is keyed by the item's index, not by its batch.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    order = list(range(len(tok.ids)))
    if sort_by_length:
        order.sort(key=lambda i: -len(tok.ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = max(len(tok.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(tok.ids[i])
            input_ids[r, :n] = torch.tensor(tok.ids[i])
            labels[r, :n] = torch.tensor(tok.labels[i])
            mask[r, :n] = 1
        batches.append(Batch(torch.tensor(idx), input_ids, mask, labels))
    return batches
