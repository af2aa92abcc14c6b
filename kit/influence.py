"""Influence of documents on queries with EK-FAC: losses, data passes, query gradients, scores.

For a document ``z`` and a query ``q = (prompt p, completion c)``:

    I(z, q) = ∇L_q ᵀ (F + λI)⁻¹ ∇L_z = Σ_layers ⟨P_q, G_z⟩,

* ``L_q = −log p(c | p)``, summed over the completion's tokens (prompt tokens are masked): its value is the
  completion's information content in nats;
* ``L_z`` = the document's summed next-token loss, ``G_z = Σ_t g_t a_tᵀ`` its weight gradient per layer;
* ``P_q = (F + λI)⁻¹ ∇L_q`` the EK-FAC-preconditioned query gradient (:mod:`kit.ekfac`, eq. 2).

Sign: upweighting ``z`` moves the weights by ``−ε (F+λI)⁻¹ ∇L_z`` and changes ``L_q`` by ``−ε I(z, q)``, so a
**positive score means the document raises log p(c | p)** (it helps the completion).

One backward pass over a batch of documents serves every query: with the layer's per-document gradient
``G_z = Σ_t g_t a_tᵀ`` in hand, all scores are the matrix product ``vec(P) vec(G_z)ᵀ``. With a rank-``r``
query (``P ≈ L R``, from an SVD) the score is ``Σ_t (Lᵀ g_t) · (R a_t)`` and ``G_z`` is not needed for it.

Normalisations (:func:`normalise`):

* **per nat** — divide a query's scores by its completion's nats, so queries of different length compare;
* **document-normalised** — divide a document's scores by ``‖∇L_z‖₂``, the Euclidean norm of its gradient over
  the tracked weights (one constant per document, as in the paper's released "normalised" scores; a
  cosine-style score as in TrackStar). Raw influence is dominated by documents with large gradients (long or
  high-loss documents) whatever the query; this ranks documents by *direction* instead. The Euclidean norm is
  used rather than the preconditioned norm ``√(∇L_zᵀ (F+λI)⁻¹ ∇L_z)`` because it falls out of the scoring pass
  for free. Raw is the default everywhere; the paper's published ranks use the normalised ranking.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, ekfac
from .corpus import IGNORE, Batch

Damping = Union[str, float]
WRITE_AHEAD_BYTES = 8 << 20  # token-cache bytes queued for the disk at most (see TokenCache._submit_write)

# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def sample_labels(logits: Tensor, batch: Batch, seed: int) -> Tensor:
    """Labels drawn from the model's own predictive distribution (true Fisher), at the positions that have a
    next-token target.

    Inverse-CDF sampling: one uniform ``u`` per position, drawn on the CPU from a generator seeded by
    ``(seed, item index)`` (so the uniforms do not depend on batch size, padding, order or device), and the label
    is the first token whose cumulative probability exceeds ``u``; the softmax and its cumulative sum stay on the
    model's device, in float32. Labels can differ between devices only where a uniform falls within float32
    rounding of a step of the cumulative sum (about 1 draw in 2,000 on the smoke model).
    """
    labels = batch.labels.clone()
    T = logits.shape[1]
    u = torch.zeros(len(batch.index), T - 1, dtype=torch.float64)
    for r, item in enumerate(batch.index.tolist()):
        u[r] = torch.rand(T - 1, generator=torch.Generator().manual_seed(seed * 1_000_003 + item), dtype=torch.float64)
    cdf = torch.softmax(logits.detach()[:, :-1].float(), dim=-1).cumsum(-1)
    u = (u.to(cdf.device, torch.float32) * cdf[..., -1]).unsqueeze(-1)
    draws = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    valid = batch.labels[:, 1:] != IGNORE
    labels[:, 1:] = torch.where(valid, draws.to(labels.device), batch.labels[:, 1:])
    return labels


def token_losses(model: nn.Module, batch: Batch, fisher: str = "empirical", seed: int = 0) -> Tensor:
    """Per-item summed next-token losses ``(B,)``; ``fisher='sampled'`` draws the labels from the model."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = out.logits
    if fisher != "empirical":
        if not torch.isfinite(logits).all():  # labels cannot be drawn from NaN/inf; say where it started
            raise ekfac.FactorError(_nonfinite_message(model, batch))
        labels = sample_labels(logits, batch, seed)
    else:
        labels = batch.labels
    B, T, V = logits.shape
    # Position t predicts label t+1; the last position predicts nothing (IGNORE). All B·T rows of the logits are
    # used as they lie in memory: slicing off the last position would copy the (B, T−1, V) logits and, in the
    # backward, scatter their gradient into a fresh (B, T, V) tensor (vocabulary-wide tensors are most of a small
    # model's activation memory). The log-softmax runs along contiguous rows (a transposed view is ~2× slower).
    targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE)], dim=1)
    ce = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(-1), reduction="none", ignore_index=IGNORE)
    return ce.view(B, T)[:, :-1].sum(1)


def _nonfinite_message(model: nn.Module, batch: Batch) -> str:
    """Name the first linear layer whose output is NaN/inf on this batch.

    Module hooks fire in every thread, so another fit worker's forward could report its own layers here: the
    hook only listens to the calling thread.
    """
    first: List[str] = []
    me = threading.get_ident()

    def hook(name):
        def fn(mod, inp, out):
            if (not first and threading.get_ident() == me and isinstance(out, Tensor)
                    and not torch.isfinite(out).all()):
                first.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               or ekfac.is_conv1d(m)]
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    where = f"layer {first[0]}" if first else "the model"
    return (f"{where}: produces NaN or inf outputs on documents {batch.index.tolist()[:5]}; the model's weights or "
            "dtype are broken (check for overflow in float16/bfloat16)")


def run_pass(model: nn.Module, modules, batches: Sequence[Batch], callback, loss_fn: Callable[[Batch], Tensor],
             desc: str, start: int = 0, after_batch: Optional[Callable[[int, Batch, Optional[Tensor]], None]] = None,
             progress: bool = True, replay: Optional["TokenCache"] = None) -> None:
    """Forward + backward every batch with hooks that hand ``(layer, a, g)`` to ``callback``.

    Batches held in ``replay`` (a :class:`TokenCache` filled by an earlier pass over the same batches) are handed
    to ``callback`` from memory instead, without a forward or backward; ``after_batch`` then gets ``None`` losses.
    """
    with ekfac.hooks(model, modules, callback) as h:
        for i in tqdm(range(start, len(batches)), desc=desc, initial=start, total=len(batches), disable=not progress):
            b, losses = _run_batch(model, batches, i, h, callback, loss_fn, replay, i - start)
            if after_batch is not None:
                after_batch(i, b, losses)


def _run_batch(model: nn.Module, batches: Sequence[Batch], i: int, h: "ekfac.TokenHooks", callback, loss_fn,
               replay: Optional["TokenCache"], nth: int, then: Optional[int] = None) -> Tuple[Batch, Optional[Tensor]]:
    """Batch ``i`` of a pass (its ``nth`` batch): replayed from the token cache to ``callback`` (reading batch
    ``then`` ahead) if it holds it, else forward + backward through the hooks. Returns the batch as run and its
    losses (``None`` when replayed)."""
    device = next(model.parameters()).device  # the one place documents cross to the compute device
    if replay is not None and i in replay:
        for name, a, g in replay.get(i, device, then=then):
            callback(name, a, g)
        return batches[i], None
    fail_after = int(os.environ.get("KIT_FAIL_AFTER_BATCHES", "0"))  # fault injection for the resume tests
    if fail_after and nth >= fail_after:
        raise KeyboardInterrupt(f"KIT_FAIL_AFTER_BATCHES={fail_after}: simulated kill")
    b = batches[i].to(device)
    h.set_mask(b.attention_mask)
    losses = loss_fn(b)
    losses.sum().backward()
    return b, losses.detach()


def run_pass_in_threads(model: nn.Module, modules, batches: Sequence[Batch], callbacks: Sequence[Callable],
                        after_batch: Sequence[Optional[Callable]], loss_fn: Callable[[Batch], Tensor], start: int,
                        stop: int, bar=None, replay: Optional["TokenCache"] = None,
                        pass_start: Optional[int] = None) -> None:
    """:func:`run_pass` over batches ``start … stop-1`` split among ``W = len(callbacks)`` threads of this process.

    Batch ``start + j`` goes to thread ``j mod W``, which hands its ``(layer, a, g)`` to ``callbacks[j mod W]`` and
    then calls ``after_batch[j mod W]`` (each thread its own sums: nothing is shared but the model, read-only, and
    the token cache, which takes concurrent threads). Each thread runs its operations on ``1/W`` of the intra-op
    threads. On a CPU, two batches side by side on one thread each beat one batch at a time on two: a small
    model's matrix products are too small to split well over cores, and one thread's Python, autograd and
    element-wise work overlaps the other's products. The first error any thread raises is raised here, after all
    of them have stopped. ``pass_start``: where the whole pass started, when this is a stretch of it (the fault
    injection of the resume tests counts batches from there)."""
    W = len(callbacks)
    pass_start = start if pass_start is None else pass_start
    stop_now = threading.Event()  # set on the first error (or an interrupt of the caller): the others stop too
    lock = threading.Lock()

    def work(k: int) -> None:
        if W > 1:
            h.bind(callbacks[k])
        mine = list(range(start + k, stop, W))
        for n, i in enumerate(mine):
            if stop_now.is_set():
                return
            b, losses = _run_batch(model, batches, i, h, callbacks[k], loss_fn, replay, i - pass_start,
                                   then=mine[n + 1] if n + 1 < len(mine) else -1)
            if after_batch[k] is not None:
                after_batch[k](i, b, losses)
            if bar is not None:
                with lock:
                    bar.update()

    if W == 1:  # in the caller's own thread, with all of its intra-op threads
        with ekfac.hooks(model, modules, callbacks[0]) as h:
            work(0)
        return
    if replay is not None:
        replay.readers = W
    share_heap()
    try:
        with ekfac.hooks(model, modules, callbacks[0]) as h:
            on_threads(W, work, stop_now, "kit-worker")
    finally:
        if replay is not None:
            replay.readers = 1


def on_threads(W: int, work: Callable[[int], None], stop_now: Optional[threading.Event] = None,
               name: str = "kit-worker") -> None:
    """``work(k)`` for ``k = 0 … W-1`` on ``W`` threads of this process, each running its operations on ``1/W`` of
    the intra-op threads. The first error any thread raises is raised here, after all of them have stopped;
    ``stop_now`` (for work that checks it between steps) is set on an error or on an interrupt of the caller
    (e.g. Ctrl-C: each thread ends its step, then stops)."""
    threads, each = torch.get_num_threads(), max(1, torch.get_num_threads() // W)
    errors: List[Optional[BaseException]] = [None] * W

    def run(k: int) -> None:
        try:
            torch.set_num_threads(each)
            work(k)
        except BaseException as e:  # noqa: BLE001  (re-raised by the caller's thread)
            errors[k] = e
            if stop_now is not None:
                stop_now.set()

    try:
        pool = [threading.Thread(target=run, args=(k,), name=f"{name}-{k}", daemon=True) for k in range(W)]
        for t in pool:
            t.start()
        try:
            for t in pool:
                t.join()
        except BaseException:
            if stop_now is not None:
                stop_now.set()
            for t in pool:
                t.join()
            raise
    finally:
        torch.set_num_threads(threads)  # a thread's setting is also the default of threads started later
    for e in errors:
        if e is not None:
            raise e


def _libc():
    """glibc, or ``False`` where the C library is another (its heap tuning below is then skipped)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_memory() -> None:
    """Hand memory freed by the last pass back to the operating system (glibc keeps freed heap pages for reuse, so
    the next stage's peak would stack on top of this one's); a no-op where the C library has no ``malloc_trim``."""
    if _libc():
        _libc().malloc_trim(0)


def share_heap() -> None:
    """Let threads started from now on allocate from the heap the process already has instead of one heap
    ("arena") each: memory one worker thread frees is then reused by the other, where separate arenas would each
    keep their own high-water mark (about 100 MB more peak memory with two workers on the lab ``large`` model)."""
    if _libc():
        _libc().mallopt(-8, 1)  # M_ARENA_MAX


_LIBC = None


# --------------------------------------------------------------------------------------------------------------
# Fitting the factors over documents
# --------------------------------------------------------------------------------------------------------------


class TokenCache:
    """The per-token ``(layer, a, g)`` of whole batches from one pass, replayed to later passes over them.

    The covariance pass, the eigenvalue-correction pass and — with the empirical Fisher, on the fit corpus, in the
    same process — the scoring pass see exactly the same ``a`` and ``g``: same documents, same model, and for the
    true Fisher the same labels (drawn from generators seeded per document). Keeping them from the first pass lets
    the later ones skip the forward + backward of every cached batch, with identical results. Batches are kept in
    order until ``budget_bytes`` is spent; the rest are recomputed.

    Where they are kept: on the compute device (``directory=None``; the fast path on a GPU), or spilled to a file
    in ``directory`` and read back batch by batch, so that the process holds one batch at a time and the operating
    system's page cache (or the disk) holds the rest — on a CPU, reading a batch back is many times cheaper than
    recomputing it. Tensors are kept in the dtype the hooks gave them (the model's), so a replay is bit-identical.
    The file has no name (it is unlinked as it is made); its space is freed by :meth:`close`, when the cache is
    garbage-collected, or when the process ends, however it ends.

    Threads that run batches side by side (:func:`run_pass_in_threads`) may record, commit and replay at once:
    each thread's batch in progress and read-ahead are its own, and the file's layout is kept under a lock.
    """

    def __init__(self, budget_bytes: float, directory: Optional[Union[str, "os.PathLike"]] = None):
        self.budget = float(budget_bytes)
        self.used = 0
        self.full = budget_bytes <= 0
        self.signature: Optional[dict] = None  # which batches these are (set by the owner; checked before reuse)
        # per thread: in memory, its batch's parts until commit (`pending`); on disk, its batch's parts written so
        # far (`batch`: their offsets, layout entries and `a` objects); its read-ahead (`ahead`)
        self._local = threading.local()
        self._layout_lock = threading.RLock()  # the file's end, the index, the budget and the writes in flight
        self.readers = 1  # threads replaying at once (sizes the pool of read buffers)
        self._mem: Dict[int, List[Tuple[str, Tensor, Tensor]]] = {}
        # batch → ([file offset of each layer's part], [(layer, a dtype, a shape, g dtype, g shape)])
        self._index: Dict[int, Tuple[list, list]] = {}
        self._file = None
        if directory is not None and not self.full:
            import tempfile
            import weakref
            from concurrent.futures import ThreadPoolExecutor

            # nameless (unlinked at once): nothing is left behind however the process ends, killed or not
            self._file = tempfile.TemporaryFile(prefix="token-cache-", suffix=".bin", dir=directory)
            self._directory = str(directory)
            self._end = 0
            # one I/O thread writes batch i while the model runs batch i+1, and reads a layer's part while the one
            # before it is replayed (file reads and writes release the GIL); a few writes and one read in flight
            self._io = ThreadPoolExecutor(1, thread_name_prefix="token-cache")
            self._writing: "collections.deque" = collections.deque()  # (future, bytes) of writes in flight
            self._in_flight = 0
            self._pool: List[np.ndarray] = []
            self._largest = 0  # bytes of the largest layer part written
            self._lock = threading.Lock()  # the pool of read buffers
            self._finalizer = weakref.finalize(self, _close_spill, self._file, self._io)  # closing deletes it

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def record(self, callback):
        """Wrap a hook callback so that it also remembers what it was given. Spilled to a file, each layer's part is
        written as soon as the hook hands it over (at most ``WRITE_AHEAD_BYTES`` queued), so the process never holds
        a whole batch of parts waiting for the disk; in memory, the parts wait for :meth:`commit`."""
        def wrapped(name: str, a: Tensor, g: Tensor) -> None:
            callback(name, a, g)
            if self.full:
                return
            local = self._local
            if self._file is None:
                local.__dict__.setdefault("pending", []).append((name, a, g))
                return
            if getattr(local, "batch", None) is None:  # its parts' offsets, its parts, their `a` objects
                local.batch = ([], [], [])
            offsets, layout, inputs = local.batch
            # an `a` handed over before in this batch (layers with one input, see ekfac.TokenHooks) is written once;
            # the part refers to the earlier one
            ref = next((j for j, x in enumerate(inputs) if x is a), -1)
            part = (name, a.dtype, tuple(a.shape), g.dtype, tuple(g.shape), ref)
            with self._layout_lock:
                offset = self._end
                self._end += _part_bytes(part)
            self._submit_write([_as_bytes(g)] if ref >= 0 else [_as_bytes(a), _as_bytes(g)], offset,
                               _part_bytes(part))
            offsets.append(offset)
            layout.append(part)
            inputs.append(a)
        return wrapped

    def commit(self, i: int) -> None:
        """End of batch ``i``: keep its tensors if they fit, else stop caching (later batches are recomputed)."""
        local = self._local
        if self._file is not None:
            batch, local.batch = getattr(local, "batch", None), None
            if batch is None or self.full:
                return
            offsets, layout, _ = batch
            size = sum(_part_bytes(p) for p in layout)
            with self._layout_lock:
                if self.full or self.used + size > self.budget:  # over budget: forget this batch, cache no more
                    self.full = True
                    if offsets[0] + size == self._end:  # its parts end the file (always so with one thread)
                        self._wait_for_write()
                        self._end = offsets[0]
                        os.ftruncate(self._file.fileno(), self._end)
                    return
                self.used += size
                self._index[i] = (offsets, layout)
                self._largest = max([self._largest] + [_part_bytes(p) for p in layout])
            return
        pending, local.pending = getattr(local, "pending", []), []
        size = sum(g.numel() * g.element_size() for _, _, g in pending) + \
            sum(a.numel() * a.element_size() for a in {id(a): a for _, a, _ in pending}.values())  # a shared `a` once
        if not pending or self.full:
            return
        with self._layout_lock:
            if self.used + size > self.budget:
                self.full = True
                return
            self.used += size
            self._mem[i] = pending

    def _submit_write(self, views: List[np.ndarray], offset: int, nbytes: int) -> None:
        """Queue a write; the hooks go on while the I/O thread writes, with at most ``WRITE_AHEAD_BYTES`` waiting
        (waiting on each write instead leaves both cores idle while the disk copy runs)."""
        while self._finish_oldest_write(until=WRITE_AHEAD_BYTES - nbytes):
            pass
        with self._layout_lock:
            self._writing.append((self._io.submit(_write_all, self._file.fileno(), views, offset), nbytes))
            self._in_flight += nbytes

    def _finish_oldest_write(self, until: Optional[int] = None) -> bool:
        """Wait for the oldest write in flight, if any (and, given ``until``, if more than that many bytes are in
        flight); ``True`` if there was one."""
        with self._layout_lock:
            if not self._writing or (until is not None and self._in_flight <= until):
                return False
            future, nbytes = self._writing.popleft()
            self._in_flight -= nbytes
        future.result()  # re-raises a failed write (e.g. a full disk) here
        return True

    def _wait_for_write(self) -> None:
        while self._finish_oldest_write():
            pass

    def __contains__(self, i: int) -> bool:
        return i in self._mem or i in self._index

    def get(self, i: int, device=None, then: Optional[int] = None) -> Iterator[Tuple[str, Tensor, Tensor]]:
        """Batch ``i``'s ``(layer, a, g)``, in the order the hooks gave them, one layer at a time; the cache keeps
        them for later passes. From disk, each layer's part is read while the one before it is replayed (the first
        part of the batch the caller replays next, ``then``, default ``i + 1``, after a batch's last), into a small
        pool of part-sized buffers: the process holds about two layers of one batch, not whole batches."""
        if i in self._mem:
            yield from self._mem[i]
            return
        keys = [(i, j) for j in range(len(self._index[i][1]))]
        then = i + 1 if then is None else then
        for _, name, a, g in self._replay(keys, (then, 0) if then in self._index else None, device):
            yield name, a, g

    def layers(self) -> List[str]:
        """The cached layers, in the order the hooks gave them (the same in every batch)."""
        first = next(iter(self._mem.values() if self._mem else self._index.values()), None)
        if first is None:
            return []
        return [part[0] for part in first] if self._mem else [part[0] for part in first[1]]

    def by_layer(self, batches: Sequence[int], device=None, layers: Optional[Sequence[int]] = None
                 ) -> Iterator[Tuple[int, str, Tensor, Tensor]]:
        """``(batch, layer, a, g)`` of the given cached ``batches``, layer after layer: every batch's part of the
        first layer, then of the second, and so on. A pass that works layer by layer keeps one layer's own
        matrices (its eigenbases, its preconditioned queries) in the CPU cache while it goes through the batches,
        instead of streaming every layer's from memory once per batch. ``layers``: only these (positions in
        :meth:`layers`, in the order given); threads may each replay their own layers at once."""
        names = self.layers()
        order = range(len(names)) if layers is None else layers
        for i in batches:
            mine = [p[0] for p in self._mem[i]] if i in self._mem else [p[0] for p in self._index[i][1]]
            if mine != names:
                raise ValueError(f"token cache: batch {i} holds layers {mine}, not {names}")
        if self._mem:
            for j in order:
                for i in batches:
                    _, a, g = self._mem[i][j]
                    yield i, names[j], a, g
            return
        yield from self._replay([(i, j) for j in order for i in batches], None, device)

    def _replay(self, keys: List[Tuple[int, int]], then: Optional[Tuple[int, int]], device
                ) -> Iterator[Tuple[int, str, Tensor, Tensor]]:
        """``(batch, layer, a, g)`` of each spilled part ``(batch, layer index)`` in ``keys``, in order; each part
        is read while the one before it is replayed, and ``then`` (if given) after the last."""
        self._wait_for_write()
        batch_a: Dict[Tuple[int, int], Tensor] = {}  # this batch's `a` tensors, for the parts that refer to them
        referred = {(i, p[5]) for i in {k[0] for k in keys} for p in self._index[i][1] if p[5] >= 0}
        for n, key in enumerate(keys):
            i, j = key
            name, da, sa, dg, sg, ref = self._index[i][1][j]
            ahead = getattr(self._local, "ahead", None)
            buf = ahead[1].result() if ahead is not None and ahead[0] == key else self._read(key)
            nxt = keys[n + 1] if n + 1 < len(keys) else then
            self._local.ahead = (nxt, self._io.submit(self._read, nxt)) if nxt is not None else None
            if batch_a and next(iter(batch_a))[0] != i:
                batch_a.clear()
            pos = 0
            if ref < 0:
                a, pos = _tensor_at(buf, da, sa, 0, device)
            else:  # the same object as the part it refers to when that one was replayed just before, else read
                a = batch_a[(i, ref)] if (i, ref) in batch_a else self._read_a(i, ref, device)
            g, _ = _tensor_at(buf, dg, sg, pos, device)
            if (i, j) in referred:  # a later part of this batch refers to this `a`
                batch_a[key] = a
            del buf
            yield i, name, a, g

    def _read_a(self, i: int, j: int, device) -> Tensor:
        """Batch ``i``'s part ``j``'s ``a`` alone, read into its own buffer."""
        offsets, layout = self._index[i]
        _, da, sa, _, _, _ = layout[j]
        size = math.prod(sa) * _itemsize(da)
        buf = np.empty(size, dtype=np.uint8)
        if size and os.preadv(self._file.fileno(), [buf], offsets[j]) < size:
            raise IOError(f"token cache in {self._directory}: short read of batch {i}, layer {layout[j][0]}")
        return _tensor_at(buf, da, sa, 0, device)[0]

    def _read(self, key: Tuple[int, int]) -> np.ndarray:
        i, j = key
        offsets, layout = self._index[i]
        size = _part_bytes(layout[j])
        buf = self._buffer(size)
        n = os.preadv(self._file.fileno(), [buf[:size]], offsets[j]) if size else 0
        if n < size:
            raise IOError(f"token cache in {self._directory}: read {n} of {size} bytes of batch {i}, layer {layout[j][0]}")
        return buf

    def _buffer(self, size: int) -> np.ndarray:
        """A read buffer no tensor views any more (its only references: the pool's and this function's), from a
        small pool: reusing them keeps reads free of page faults, and the process from piling up freed buffers."""
        import sys

        with self._lock:
            for b in self._pool:
                if len(b) >= size and sys.getrefcount(b) == 3:  # the pool, the loop variable, getrefcount's argument
                    return b
            b = np.empty(max(size, self._largest), dtype=np.uint8)
            # per reader: the part replayed, the one read ahead, one its consumer holds, a shared `a`
            if len(self._pool) < 4 * self.readers:
                self._pool.append(b)
            return b

    def close(self) -> None:
        """Free the cached batches (and delete the spill file)."""
        self._mem.clear()
        self._index.clear()
        self.full = True
        if self._file is not None:
            self._writing.clear()
            self._local = threading.local()
            self._pool = []
            self._finalizer()
            self._file = None


def _part_bytes(part) -> int:
    """Bytes of one layer's ``(a, g)`` in the spill file, from its layout entry (``g`` alone when ``a`` is another
    part's)."""
    _, da, sa, dg, sg, ref = part
    return (math.prod(sa) * _itemsize(da) if ref < 0 else 0) + math.prod(sg) * _itemsize(dg)


def _tensor_at(buf: np.ndarray, dtype: torch.dtype, shape: tuple, pos: int, device) -> Tuple[Tensor, int]:
    """A tensor viewing ``buf`` from byte ``pos`` (moved to ``device`` if given), and the byte after it."""
    count = math.prod(shape)
    t = torch.frombuffer(buf, dtype=dtype, count=count, offset=pos).view(shape) if count else \
        torch.empty(shape, dtype=dtype)
    return (t.to(device) if device is not None else t), pos + count * _itemsize(dtype)


def _write_all(fd: int, views: List[np.ndarray], offset: int) -> None:
    for v in views:
        mv = memoryview(v)
        while mv.nbytes:
            n = os.pwrite(fd, mv, offset)
            mv, offset = mv[n:], offset + n


def _close_spill(file, io) -> None:
    io.shutdown(wait=True, cancel_futures=True)
    file.close()


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _as_bytes(t: Tensor) -> np.ndarray:
    """A CPU byte view of ``t`` (any dtype, bfloat16 included) for writing to the spill file."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.uint8).numpy()


@dataclass
class FitState:
    """Where a fit stands, so that a killed fit resumes; see :func:`fit_factors`."""

    stage: str = "covariance"  # covariance → lambda → done
    next_batch: int = 0


def fit_factors(model: nn.Module, modules: Dict[str, nn.Module], batches: Sequence[Batch], fisher: str = "sampled",
                seed: int = 0, factors: Optional[Dict[str, ekfac.LayerFactors]] = None,
                state: Optional[FitState] = None, checkpoint: Optional[Callable] = None,
                checkpoint_every: int = 0, progress: bool = True,
                cache_bytes: float = 0, factor_dtype: Optional[torch.dtype] = None,
                keep_covariances: bool = False, stopwatch=None,
                cache: Optional[TokenCache] = None, workers: int = 1) -> Dict[str, ekfac.LayerFactors]:
    """Covariances → eigendecomposition → corrected eigenvalues over ``batches`` of documents.

    ``checkpoint(state, factors)`` is called every ``checkpoint_every`` batches and at the end of each stage;
    passing back the saved ``factors`` and ``state`` resumes where it stopped. With ``cache_bytes > 0`` the
    covariance pass keeps up to that many bytes of per-token ``(a, g)`` (:class:`TokenCache`) and the correction
    pass replays them instead of recomputing those batches: same factors, one forward + backward fewer per
    cached batch. Pass your own ``cache`` (a :class:`TokenCache`, e.g. spilled to disk) instead to keep it for a
    scoring pass over the same batches; one made from ``cache_bytes`` lives in memory and is freed at the end.
    ``factor_dtype``: float32 by default (float64 for a float64 model); ``keep_covariances`` keeps
    ``A`` and ``S`` after the eigendecomposition. ``stopwatch`` (a :class:`kit.timing.Stopwatch`) gets the time of
    each pass (checkpoints written during a pass included), the eigendecomposition and the stage-end writes.

    Under ``torchrun`` each process passes its own shard of the batches (``Batches.shard``): the sums of each pass
    (covariances and token counts, Λ and sequence counts) are all-reduced at the end of the pass, and the layers'
    eigendecompositions are divided among the processes and broadcast (:mod:`kit.distributed`). Checkpoints then
    hold each process's own partial sums.

    ``workers > 1`` (a CPU): each pass runs on that many threads of this process side by side
    (:func:`run_pass_in_threads`), the first adding into ``factors``, the others into sums of their own that are
    added to ``factors`` at every checkpoint and at the end of the pass, in worker order. The factors are the same
    up to the order of float additions, and the same from run to run for a given ``workers``.
    """
    if fisher not in ("sampled", "empirical"):
        raise ValueError(f"fisher must be 'sampled' or 'empirical', got {fisher!r}")
    factors = factors if factors is not None else ekfac.new_factors(modules, factor_dtype)
    state = state or FitState()
    loss_fn = lambda b: token_losses(model, b, fisher, seed)  # noqa: E731

    def in_threads(kind: str, desc: str, replay: Optional[TokenCache]) -> None:
        """The pass over ``workers`` threads (the caller's own thread for one), in stretches of
        ``checkpoint_every`` batches, each ending with the workers' sums added up and a checkpoint."""
        sums, callbacks, afters = worker_sums(factors, kind, workers, cache)

        every = checkpoint_every if checkpoint is not None and checkpoint_every else len(batches)
        bar = tqdm(total=len(batches), initial=state.next_batch, desc=desc, disable=not progress)
        start = state.next_batch
        while start < len(batches):
            stop = min(len(batches), (start // every + 1) * every)
            run_pass_in_threads(model, modules, batches, callbacks, afters, loss_fn, start, stop, bar, replay,
                                pass_start=state.next_batch)
            add_worker_sums(factors, sums, kind)
            if checkpoint is not None and stop < len(batches) and stop % every == 0:
                checkpoint(FitState(state.stage, stop), factors)
            start = stop
        bar.close()

    from .timing import Stopwatch

    sw = stopwatch if stopwatch is not None else Stopwatch()
    own_cache = cache is None
    cache = TokenCache(cache_bytes) if own_cache else cache
    if state.stage == "covariance":
        with sw("covariance pass"):
            in_threads("covariance", "EK-FAC covariances", None)
            _reduce_covariances(factors, model)
            release_memory()
        with sw("eigendecomposition"):
            _eigendecompose_shared(factors, progress, keep_covariances)
            release_memory()
        state = FitState("lambda", 0)
        if checkpoint is not None:
            with sw("writing"):
                checkpoint(state, factors)
    if state.stage == "lambda":
        with sw("eigenvalue correction"):
            in_threads("lambda", "EK-FAC eigenvalue correction", cache)
            _reduce_lambda(factors, model)
            ekfac.finalise_lambda(factors)
            release_memory()
        state = FitState("done", 0)
        if own_cache:
            cache.close()
        if checkpoint is not None:
            with sw("writing"):
                checkpoint(state, factors)
    return factors


def worker_sums(factors: Dict[str, ekfac.LayerFactors], kind: str, workers: int, cache: TokenCache
                ) -> Tuple[List[Dict[str, ekfac.LayerFactors]], List[Callable], List[Callable]]:
    """For a pass of ``kind`` ("covariance" or "lambda") on ``workers`` threads (:func:`run_pass_in_threads`): each
    worker's sums (the first worker's are ``factors`` themselves), its hook callback adding into them, and its
    after-batch step counting tokens (covariance pass, which also commits each batch to ``cache``) or sequences.
    :func:`add_worker_sums` adds the others' sums into ``factors``."""
    if kind == "covariance":
        sums = [factors] + [{n: ekfac.LayerFactors(f.name, f.d_out, f.d_in, dtype=f.dtype) for n, f in factors.items()}
                            for _ in range(workers - 1)]
        callbacks = [cache.record(ekfac.accumulate_covariances(s)) for s in sums]
    else:
        sums = [factors] + [{n: dataclasses.replace(f, Lambda=None, n_sequences=0) for n, f in factors.items()}
                            for _ in range(workers - 1)]
        callbacks = [ekfac.accumulate_lambda(s) for s in sums]

    def counting_into(mine):
        def after(i, b, _losses):
            if kind == "covariance":
                cache.commit(i)
                n = int(b.attention_mask.sum())
                for f in mine.values():
                    f.n_tokens += n
            else:
                for f in mine.values():
                    f.n_sequences += b.input_ids.shape[0]
        return after

    return sums, callbacks, [counting_into(s) for s in sums]


def add_worker_sums(factors: Dict[str, ekfac.LayerFactors], sums: List[Dict[str, ekfac.LayerFactors]],
                    kind: str) -> None:
    """Add the sums of workers 1 … W-1 (:func:`worker_sums`) into ``factors``, in worker order, and zero them."""
    for other in sums[1:]:
        _add_sums(factors, other, kind)


def _add_sums(factors: Dict[str, ekfac.LayerFactors], other: Dict[str, ekfac.LayerFactors], kind: str) -> None:
    """Add a worker's sums (``kind`` "covariance": ``A``, ``S``, token counts; else ``Λ``, sequence counts) into
    ``factors`` and zero them. A tensor shared by layers (one input's ``A``) is added once where ``factors``
    shares it too, and into each layer's own where it does not (a fit resumed from saved sums)."""
    done, copies = set(), {}
    for name, mine in other.items():
        f = factors[name]
        if kind == "covariance":
            if mine.A is None:  # this worker has not run a batch yet
                continue
            if f.A is None:
                f.A = copies.setdefault(id(mine.A), mine.A.clone())
                f.S = mine.S.clone()
            else:
                if id(f.A) not in done:
                    f.A += mine.A
                f.S += mine.S
            done.add(id(f.A))
            f.n_tokens += mine.n_tokens
            mine.n_tokens = 0
        else:
            if mine.Lambda is None:
                continue
            f.Lambda = mine.Lambda.clone() if f.Lambda is None else f.Lambda.add_(mine.Lambda)
            f.n_sequences += mine.n_sequences
            mine.n_sequences = 0
    for mine in other.values():
        for t in (mine.A, mine.S) if kind == "covariance" else (mine.Lambda,):
            if t is not None:
                t.zero_()


def _zeros_like_layer(f: ekfac.LayerFactors, device, shapes: Dict[str, tuple]) -> None:
    for k, shape in shapes.items():
        if getattr(f, k) is None:
            setattr(f, k, torch.zeros(shape, dtype=f.dtype, device=device))


def _reduce_covariances(factors: Dict[str, ekfac.LayerFactors], model: nn.Module) -> None:
    """Sum every process's covariance sums and token counts (no-op in one process)."""
    if distributed.current().world == 1:
        return
    device = next(model.parameters()).device
    seen = set()
    for f in factors.values():  # a sum shared by layers (ekfac.accumulate_covariances) is copied for each of them
        if f.A is not None and id(f.A) in seen:  # before any is reduced: every rank makes the same calls, and a
            f.A = f.A.clone()  # rank that holds separate sums (an empty shard, a resumed fit) adds up the same
        seen.add(id(f.A))
    for f in factors.values():  # a rank whose shard was empty still takes part
        _zeros_like_layer(f, device, {"A": (f.d_in, f.d_in), "S": (f.d_out, f.d_out)})
        distributed.all_reduce_(f.A)
        distributed.all_reduce_(f.S)
        f.n_tokens = distributed.all_reduce_int(f.n_tokens, device)


def _reduce_lambda(factors: Dict[str, ekfac.LayerFactors], model: nn.Module) -> None:
    if distributed.current().world == 1:
        return
    device = next(model.parameters()).device
    for f in factors.values():
        _zeros_like_layer(f, device, {"Lambda": (f.d_out, f.d_in)})
        distributed.all_reduce_(f.Lambda)
        f.n_sequences = distributed.all_reduce_int(f.n_sequences, device)


def _eigendecompose_shared(factors: Dict[str, ekfac.LayerFactors], progress: bool, keep_covariances: bool) -> None:
    """Each process eigendecomposes its share of the layers (layer ``i`` → rank ``i mod N``); the results are
    broadcast from their owner. Every process checks every layer's covariances first (they are identical after the
    all-reduce), so a non-finite one stops all of them with the same error instead of leaving some waiting."""
    d = distributed.current()
    if d.world == 1:
        ekfac.eigendecompose(factors, progress=progress, keep_covariances=keep_covariances)
        return
    from tqdm.auto import tqdm

    layers = list(factors.values())
    for f in layers:
        if f.n_tokens == 0:
            raise ekfac.FactorError(f"layer {f.name}: no tokens were seen; is the corpus empty?")
        ekfac.mirror_(f.A), ekfac.mirror_(f.S)
        for label, M in (("activation covariance A", f.A), ("pseudo-gradient covariance S", f.S)):
            if not torch.isfinite(M).all():
                raise ekfac.FactorError(f"layer {f.name}: the {label} contains NaN or inf values; the model produced "
                                        "non-finite activations or gradients on this corpus (check the model's dtype "
                                        "and the documents)")
    with ekfac.lapack_threads(torch.get_num_threads()):
        for i, f in enumerate(tqdm(layers, desc="EK-FAC eigendecomposition", disable=not progress)):
            if distributed.owner(i, d.world) == d.rank:
                ekfac.eigendecompose_layer(f, keep_covariances=True)
            else:
                device = f.A.device
                f.A, f.S = f.A / f.n_tokens, f.S / f.n_tokens
                f.Q_A = torch.empty((f.d_in, f.d_in), dtype=f.dtype, device=device)
                f.Q_S = torch.empty((f.d_out, f.d_out), dtype=f.dtype, device=device)
                f.eig_A = torch.empty(f.d_in, dtype=f.dtype, device=device)
                f.eig_S = torch.empty(f.d_out, dtype=f.dtype, device=device)
    for i, f in enumerate(layers):
        for t in (f.Q_A, f.eig_A, f.Q_S, f.eig_S):  # contiguous: a broadcast sends the storage as laid out
            distributed.broadcast_(t, src=distributed.owner(i, d.world))
        if not keep_covariances:
            f.A = f.S = None


# --------------------------------------------------------------------------------------------------------------
# Query gradients
# --------------------------------------------------------------------------------------------------------------


def per_item_gradients(model: nn.Module, modules: Dict[str, nn.Module], batches: Sequence[Batch], n_items: int,
                       fisher: str = "empirical", desc: str = "query gradients", progress: bool = True):
    """Per-item weight gradients ``G = Σ_t g_t a_tᵀ`` per layer ``(N, d_out, d_in)`` and per-item losses ``(N,)``."""
    grads: Dict[str, Tensor] = {}
    losses = torch.zeros(n_items, dtype=torch.float64)
    current: List[Tensor] = []

    def callback(name, a, g):
        acc = ekfac.accumulation_dtype(a.dtype)  # a bfloat16 model's gradient is summed over tokens in float32
        G = torch.bmm(g.transpose(1, 2).to(acc), a.to(acc))
        if name not in grads:
            grads[name] = torch.zeros((n_items,) + G.shape[1:], dtype=G.dtype, device=G.device)
        grads[name][current[0]] = G

    def after(i, b, l):
        losses[b.index.cpu()] = l.to(torch.float64).cpu()

    def loss_fn(b):
        current[:] = [b.index]
        return token_losses(model, b, fisher)

    run_pass(model, modules, batches, callback, loss_fn, desc, after_batch=after, progress=progress)
    return grads, losses


@dataclass
class PreconditionedQueries:
    """``P_q`` per layer: full ``(Q, d_out, d_in)`` or low rank ``L (Q, d_out, r)``, ``R (Q, r, d_in)``.

    A layer is stored in full when the requested rank is at least its smaller dimension. A full layer named in
    ``basis`` (``(Q_S, Q_A)``) is stored in its EK-FAC eigenbasis, ``P̃ = Q_Sᵀ P Q_A``: scoring then rotates each
    document's tokens into that basis instead (see :func:`preconditioned_queries`)."""

    full: Dict[str, Tensor] = field(default_factory=dict)
    left: Dict[str, Tensor] = field(default_factory=dict)
    right: Dict[str, Tensor] = field(default_factory=dict)
    rank: Optional[int] = None  # None = full rank
    basis: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        return next(iter({**self.full, **self.left}.values())).shape[0]

    def layer(self, name: str) -> Tensor:
        """Dense ``P`` for a layer, in the layer's own basis (rebuilt from the factors when low rank, rotated back
        when kept in the eigenbasis)."""
        if name in self.basis:
            Q_S, Q_A = self.basis[name]
            return Q_S @ self.full[name] @ Q_A.T
        return self.full[name] if name in self.full else self.left[name] @ self.right[name]


def precondition_queries(factors: Dict[str, ekfac.LayerFactors], grads: Dict[str, Tensor], damping: Damping = "heuristic",
                         rank: Optional[int] = None, kfac: bool = False) -> PreconditionedQueries:
    """``P_q = (F + λI)⁻¹ ∇L_q`` per layer; with ``rank=r`` keep the rank-``r`` truncated SVD of each ``P_q``
    (Grosse et al. §3.2.2) so that many queries fit in memory."""
    out = PreconditionedQueries(rank=rank)
    for name, G in grads.items():
        if rank is None or rank >= min(G.shape[1:]):  # the rank does not bind: keep P exactly
            out.full[name] = factors[name].precondition(G, damping, kfac=kfac)
        else:
            out.left[name], out.right[name] = factors[name].precondition_low_rank(G, rank, damping, kfac=kfac)
    return out


def preconditioned_queries(model: nn.Module, modules: Dict[str, nn.Module], factors: Dict[str, ekfac.LayerFactors],
                           batches: Sequence[Batch], n_items: int, damping: Damping = "heuristic",
                           rank: Optional[int] = None, progress: bool = True,
                           doc_tokens: Optional[int] = None) -> Tuple[PreconditionedQueries, Tensor]:
    """Query gradients batch by batch, each layer's gradient preconditioned (and cut to rank ``r``) as soon as the
    backward pass produces it.

    Only one layer of one query batch's full gradients is ever in memory (100 queries' full gradients of a
    135M-parameter model's MLPs would take 24 GB; of an 8B model's, 2 TB); the results are written straight into
    the output. Returns ``(P, losses)`` in item order, equal to :func:`per_item_gradients` followed by
    :func:`precondition_queries` over all items.

    ``doc_tokens``: how many (padded) document tokens these queries will be scored against. A full-rank layer's
    ``P = Q_S M Q_Aᵀ`` costs ``Q·d_out·d_in·(d_out + d_in)`` to rotate back out of the eigenbasis; scoring against
    ``M`` instead costs ``doc_tokens·(d_out² + d_in²)`` to rotate the documents' tokens in. Where the second is
    cheaper (few documents, wide layers: SmolLM2 scored on a few dozen documents) ``M`` is kept
    (:attr:`PreconditionedQueries.basis`). The scores are the same up to float rounding.
    """
    losses = torch.zeros(n_items, dtype=torch.float64)
    out = PreconditionedQueries(rank=rank)
    current: List[Tensor] = []

    def callback(name, a, g):
        f = factors[name]
        if rank is None or rank >= min(f.d_out, f.d_in):  # as precondition_queries, rotated from the tokens
            keep = doc_tokens is not None and \
                doc_tokens * (f.d_out**2 + f.d_in**2) < n_items * f.d_out * f.d_in * (f.d_out + f.d_in)
            if name not in out.full:
                out.full[name] = torch.empty((n_items, f.d_out, f.d_in), dtype=f.dtype, device=a.device)
            dest = out.full[name]  # each query's result is written once, straight into its row
            f.precondition_tokens(a, g, damping, eigenbasis=keep, out=[dest[i] for i in current[0].tolist()])
            if keep:
                out.basis[name] = (f.Q_S, f.Q_A)
            return
        parts = dict(zip(("left", "right"), f.precondition_low_rank(None, rank, damping, tokens=(a, g))))
        idx = current[0]
        for attr, part in parts.items():
            dest = getattr(out, attr)
            if name not in dest:
                dest[name] = torch.empty((n_items,) + part.shape[1:], dtype=part.dtype, device=part.device)
            dest[name][idx.to(part.device)] = part

    def loss_fn(b):
        current[:] = [b.index]
        return token_losses(model, b, "empirical")

    def after(i, b, l):
        losses[b.index] = l.to(torch.float64).cpu()

    run_pass(model, modules, batches, callback, loss_fn, "query gradients", after_batch=after, progress=progress)
    return out, losses


# --------------------------------------------------------------------------------------------------------------
# Scoring documents
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreOutput:
    scores: Tensor  # (Q, D) raw influence
    doc_grad_norm: Tensor  # (D,) ‖∇L_z‖₂ over the tracked weights
    per_layer: Optional[Tensor] = None  # (Q, D, L)
    per_token: Optional[List[Tensor]] = None  # D tensors (Q, T_d): token t's share g_tᵀ P a_t


def contraction_group(n_queries: int) -> int:
    """Documents whose gradients are contracted with the full-rank ``P`` together (see :func:`score_documents`).

    Each contraction streams every layer's ``P`` (``Q × d_out × d_in``) from memory once, so contracting a few
    documents at a time is memory-bound (on 2 CPU cores: 12 GFLOP/s at 4 documents, 120 at 64). Gathering up to
    ``Q // 2`` documents (at most 64) keeps the gathered gradients within half of ``P``'s own memory."""
    return max(1, min(64, n_queries // 2))


def document_gradients(g: Tensor, a: Tensor, out: Optional[Tensor] = None,
                       lengths: Optional[List[int]] = None) -> Tensor:
    """Each document's gradient ``G_z = Σ_t g_t a_tᵀ`` of one layer, from its tokens ``g (B, T, d_out)`` and
    ``a (B, T, d_in)`` (each document's first ``lengths[n]``), flattened: ``(B, d_out·d_in)``, written into ``out``
    when given (:func:`kit.ekfac.sequence_gradients`)."""
    B, _, d_out = g.shape
    d_in = a.shape[2]
    G = out if out is not None else torch.empty((B, d_out * d_in), dtype=g.dtype, device=g.device)
    ekfac.sequence_gradients(g, a, out=G.view(B, d_out, d_in), lengths=lengths)
    return G


def score_documents(model: nn.Module, modules: Dict[str, nn.Module], pq: PreconditionedQueries,
                    batches: Sequence[Batch], n_docs: int, per_layer: bool = False, per_token: bool = False,
                    start: int = 0, sink: Optional[Callable[[int, Batch, Tensor, Tensor], None]] = None,
                    progress: bool = True, replay: Optional[TokenCache] = None,
                    group: Optional[int] = None, workers: int = 1) -> ScoreOutput:
    """One pass over the documents scoring all queries; the training loss is the documents' own next-token loss.

    ``sink(i, batch, scores(Q,B), norms(B))`` receives each batch's results, in batch order (the pipeline writes
    them to a memory-mapped file); otherwise results are gathered in memory and returned. ``replay``: a
    :class:`TokenCache` of these same batches under the same (empirical, next-token) loss, e.g. the fit's; its
    batches are scored without running the model, layer after layer (:meth:`TokenCache.by_layer`), so that each
    layer's ``P`` stays in the CPU cache while every cached document meets it; the batches after the cached ones
    run the model. ``workers`` threads replay the cached batches, each its own layers (see :func:`_score_by_layer`).

    Full-rank layers: each document's gradient ``G_z = Σ_t g_t a_tᵀ`` is formed per batch, and the gradients of
    ``group`` documents (default :func:`contraction_group`; batches are never split) are contracted with ``P`` in
    one product ``P Gᵀ`` (replayed: ``G Pᵀ`` with the layer's ``Pᵀ`` laid out once; the same sums in another
    order, equal to float rounding).
    """
    names = list(modules)
    Q = pq.n_queries
    keep = sink is None
    scores = torch.zeros((Q, n_docs) if keep else (0,), dtype=torch.float64)
    norms = torch.zeros(n_docs if keep else 0, dtype=torch.float64)
    layer_scores = torch.zeros((Q, n_docs, len(names)), dtype=torch.float64) if per_layer else None
    token_scores: Optional[List[Tensor]] = [None] * n_docs if per_token else None  # type: ignore
    flat = {n: pq.full[n].reshape(Q, -1) for n in names if n in pq.full}
    dtype = next(iter({**pq.full, **pq.left}.values())).dtype  # the factors' dtype: float32 (float64 in tests)
    group = group or contraction_group(Q)

    memos = threading.local()  # per thread, the last (a, Q_A, a Q_A): layers sharing an input and an eigenbasis
    #                            rotate it once

    def layer_terms(name: str, a: Tensor, g: Tensor, out: Optional[Tensor] = None):
        """One layer of one batch: ``(G (B, d_out·d_in) to contract with P, or None; ‖G_z‖² (B,);
        low-rank scores (Q, B), or None; the a and g used)``. A layer whose ``P`` is kept in the eigenbasis gets
        its tokens rotated into it first (``G`` is then ``Q_Sᵀ G_z Q_A``, of the same norm). ``out``: where to
        write ``G`` (B rows of a buffer)."""
        a, g = a.to(dtype), g.to(dtype)
        d_out, d_in = g.shape[-1], a.shape[-1]  # padding skipped (its rows of a are zero) where that pays
        lengths = ekfac.token_lengths(a, d_out * d_in + (d_out**2 + d_in**2 if name in pq.basis else 0))
        if name in pq.basis:
            Q_S, Q_A = pq.basis[name]
            a = ekfac.rotate(a, Q_A, memos.__dict__.setdefault("memo", []), lengths)
            g = ekfac.rotate_tokens(g, Q_S, lengths)
        G = document_gradients(g, a, out, lengths)  # each document's gradient of this layer
        norm2 = torch.linalg.vector_norm(G, dim=1).to(torch.float64).square()
        if name in pq.full:
            return G, norm2, None, a, g
        L, R = pq.left[name], pq.right[name]
        gl = torch.einsum("bto,qor->qbtr", g, L)
        ar = torch.einsum("qri,bti->qbtr", R, a)
        return None, norm2, (gl * ar).sum((2, 3)).to(torch.float64), a, g

    def deliver(i: int, b: Batch, s: Tensor, n: Tensor, layers: Dict[str, Tensor]) -> None:
        idx = b.index.cpu()
        s, n = s.cpu(), n.cpu()
        if keep:
            scores[:, idx] = s
            norms[idx] = n
        else:
            sink(i, b, s, n)
        if per_layer:
            for j, name in enumerate(names):
                layer_scores[:, idx, j] = layers[name].cpu()

    cached = []  # the batches from `start` on that the replay holds (the cache keeps a prefix of the batches)
    if replay is not None and not per_token:
        while start + len(cached) < len(batches) and start + len(cached) in replay:
            cached.append(start + len(cached))
    if cached:
        device = next(iter({**pq.full, **pq.left}.values())).device
        _score_by_layer(replay, cached, batches, Q, flat, group, layer_terms, deliver, per_layer, progress, device,
                        workers)
        start = cached[-1] + 1
    if start >= len(batches):
        return ScoreOutput(scores, norms, layer_scores, token_scores)

    class Scorer:
        """One thread's share of the batches that run the model: each batch's partial results, its full-rank
        layers' gradients gathered until ``group`` documents are waiting, then contracted with ``P`` together."""

        def __init__(self):
            self.acc: Dict[str, Tensor] = {}  # this batch's low-rank scores, norms and per-token scores
            self.gathered: Dict[str, List[Tensor]] = {}  # per full-rank layer: the waiting batches' G (B, d_out·d_in)
            self.waiting: List[dict] = []  # gathered batches, in order: index, batch, partial scores, norms, layers

        def callback(self, name, a, g):
            acc = self.acc
            G, norm2, s, a, g = layer_terms(name, a, g)
            acc["norm2"] = norm2 if "norm2" not in acc else acc["norm2"] + norm2
            if G is not None:
                self.gathered.setdefault(name, []).append(G)
            else:
                acc["scores"] = s if "scores" not in acc else acc["scores"] + s
                if per_layer:
                    acc[f"layer:{name}"] = s
            if per_token:  # in the eigenbasis when P is kept there: a and g were rotated with it
                P = pq.full[name] if name in pq.basis else pq.layer(name)
                t = torch.einsum("bto,qoi,bti->qbt", g, P, a).to(torch.float64)
                acc["tokens"] = t if "tokens" not in acc else acc["tokens"] + t

        def after(self, i, b, _losses):
            acc, B = self.acc, len(b.index)
            w = {"i": i, "batch": b, "norms": acc.pop("norm2").sqrt(),
                 "scores": acc.pop("scores", None), "layers": {}}
            if w["scores"] is None:
                w["scores"] = torch.zeros((Q, B), dtype=torch.float64, device=w["norms"].device)
            if per_layer:
                w["layers"] = {n[len("layer:"):]: v for n, v in acc.items() if n.startswith("layer:")}
            if per_token:
                t = acc.pop("tokens").cpu()
                for r, d in enumerate(b.index.cpu().tolist()):
                    token_scores[d] = t[:, r, : int(b.attention_mask[r].sum())]
            acc.clear()
            self.waiting.append(w)
            if sum(len(x["batch"].index) for x in self.waiting) >= group:
                self.flush()

        def flush(self):
            """Contract the gathered gradients with ``P`` and hand every waiting batch on (:func:`in_order`)."""
            if not self.waiting:
                return
            sizes = [len(w["batch"].index) for w in self.waiting]
            for name, parts in self.gathered.items():
                s = (flat[name] @ torch.cat(parts).T).to(torch.float64)  # (Q, gathered documents)
                for w, part in zip(self.waiting, torch.split(s, sizes, dim=1)):
                    w["scores"] += part
                    if per_layer:
                        w["layers"][name] = part
            self.gathered.clear()
            for w in self.waiting:
                in_order(w)
            self.waiting.clear()

    ready: Dict[int, dict] = {}  # batches scored by one thread while an earlier one is still with another
    next_batch = [start]
    lock = threading.Lock()

    def in_order(w: dict) -> None:
        """Deliver the batches in batch order, whichever thread scored them (the sink's progress counts on it)."""
        with lock:
            ready[w["i"]] = w
            while next_batch[0] in ready:
                w = ready.pop(next_batch[0])
                deliver(w["i"], w["batch"], w["scores"], w["norms"], w["layers"])
                next_batch[0] += 1

    W = max(1, min(workers, len(batches) - start)) if not per_token else 1
    group = max(1, group // W)  # the threads' gathered gradients together: within half of P's memory, as one's
    scorers = [Scorer() for _ in range(W)]
    bar = tqdm(total=len(batches), initial=start, desc="scoring documents", disable=not progress)
    # batches side by side on one thread each, as the fit's passes (one thread: in this one)
    run_pass_in_threads(model, modules, batches, [sc.callback for sc in scorers], [sc.after for sc in scorers],
                        lambda b: token_losses(model, b, "empirical"), start, len(batches), bar, replay)
    bar.close()
    for sc in scorers:  # what each thread still holds (its share ended before `group` documents were waiting)
        sc.flush()
    return ScoreOutput(scores, norms, layer_scores, token_scores)


def _score_by_layer(cache: TokenCache, cached: List[int], batches: Sequence[Batch], Q: int, flat: Dict[str, Tensor],
                    group: int, layer_terms, deliver, per_layer: bool, progress: bool, device,
                    workers: int = 1) -> None:
    """:func:`score_documents` over the ``cached`` batches, replayed layer after layer. The partial scores of the
    replayed documents (``Q`` per document, a sliver of the cache's own size) are held until every layer is done;
    then each batch goes to ``deliver`` in order.

    ``workers`` threads (a CPU) replay the layers side by side, layer ``j`` on thread ``j mod W`` with ``1/W`` of the
    intra-op threads: one layer's products are too small to split well over cores (as in :func:`run_pass_in_threads`).
    Each layer's scores and squared norms are summed into the totals in layer order, whichever thread finishes
    first, so the totals are added up as with one thread."""
    sizes = [len(batches[i].index) for i in cached]
    offset = dict(zip(cached, np.cumsum([0] + sizes[:-1]).tolist()))
    n = sum(sizes)
    names = cache.layers()
    W = max(1, min(workers, len(names)))
    # A thread holds one layer's gradients, not every layer's as a model-running pass does: the same memory (half of
    # P's, see contraction_group) holds L/W times as many documents, and each pass over the layer's P serves them all
    group = min(max(1, min(64, group * len(names) // W)), n)
    s_all = torch.zeros((Q, n), dtype=torch.float64, device=device)
    n2_all = torch.zeros(n, dtype=torch.float64, device=device)
    layers: Dict[str, Tensor] = {}
    finished: Dict[int, Tuple[Tensor, Tensor]] = {}  # layers done but not yet added: an earlier one is still running
    added = [0]  # layers 0 … added-1 are in the totals
    lock = threading.Lock()
    bar = tqdm(total=len(cached) * len(names), desc="scoring documents (cached)", disable=not progress)

    def replay_layers(mine: List[int], stop_now: Optional[threading.Event] = None) -> None:
        """This thread's layers, one after the other: every cached batch's part, contracted with the layer's P
        ``group`` documents at a time."""
        s = n2 = PT = buf = None  # buf: one layer's G of consecutive batches (`filled` rows), from document `first` on
        first, filled, current = 0, 0, None

        def contract():
            nonlocal filled
            if filled:
                s[:, first:first + filled] += (buf[:filled] @ PT).T.to(torch.float64)
                filled = 0

        def finish():
            if current is None:
                return
            contract()
            if per_layer:
                layers[current] = s
            with lock:  # into the totals in layer order
                finished[names.index(current)] = (s, n2)
                while added[0] in finished:
                    s_j, n2_j = finished.pop(added[0])
                    s_all.add_(s_j)
                    n2_all.add_(n2_j)
                    added[0] += 1

        for i, name, a, g in cache.by_layer(cached, device, layers=mine):
            if stop_now is not None and stop_now.is_set():
                return
            if name != current:
                finish()
                current = name
                # Pᵀ laid out (d_out·d_in, Q) for this layer: `G Pᵀ` streams it row by row (0.1–0.7 s less than
                # `P Gᵀ` in 5 alternating in-process rounds on lab large)
                PT = flat[name].T.contiguous() if name in flat else None
                if PT is not None and (buf is None or buf.shape[1] != PT.shape[0]):  # room for a group and a batch
                    buf = torch.empty((min(group - 1 + max(sizes), n), PT.shape[0]), dtype=PT.dtype, device=device)
                s = torch.zeros((Q, n), dtype=torch.float64, device=device)
                n2 = torch.zeros(n, dtype=torch.float64, device=device)
            o, B = offset[i], a.shape[0]
            if PT is not None:
                if not filled:
                    first = o
                _, norm2, _, _, _ = layer_terms(name, a, g, out=buf[filled:filled + B])
                filled += B
                if filled >= group:
                    contract()
            else:
                _, norm2, sl, _, _ = layer_terms(name, a, g)
                s[:, o:o + B] += sl
            n2[o:o + B] += norm2
            with lock:
                bar.update()
        finish()

    assignments = [list(range(k, len(names), W)) for k in range(W)]
    if W == 1:
        replay_layers(assignments[0])
    else:
        stop_now = threading.Event()  # an error or an interrupt: the other threads stop at their next batch
        cache.readers = W
        try:
            on_threads(W, lambda k: replay_layers(assignments[k], stop_now), stop_now, "kit-scorer")
        finally:
            cache.readers = 1
    bar.close()
    norms_all = n2_all.sqrt()
    for i, B in zip(cached, sizes):
        o = offset[i]
        deliver(i, batches[i], s_all[:, o:o + B], norms_all[o:o + B],
                {k: v[:, o:o + B] for k, v in layers.items()})


def influence(model, modules, factors, query_batches, n_queries, doc_batches, n_docs, damping: Damping = "heuristic",
              rank: Optional[int] = None, progress: bool = False, **kw):
    """Convenience: query gradients → preconditioning → scores, all in memory. Returns ``(ScoreOutput, nats)``."""
    doc_tokens = getattr(doc_batches, "padded_tokens", None)
    if doc_tokens is None:  # a plain list of batches
        doc_tokens = sum(b.input_ids.numel() for b in doc_batches)
    pq, nats = preconditioned_queries(model, modules, factors, query_batches, n_queries, damping, rank, progress,
                                      doc_tokens=doc_tokens)
    return score_documents(model, modules, pq, doc_batches, n_docs, progress=progress, **kw), nats


# --------------------------------------------------------------------------------------------------------------
# Normalisations
# --------------------------------------------------------------------------------------------------------------

KINDS = ("raw", "per_nat", "normalized")


def normalise(scores: np.ndarray, kind: str, nats: Optional[np.ndarray] = None,
              doc_grad_norm: Optional[np.ndarray] = None) -> np.ndarray:
    """``raw``; ``per_nat`` = score / completion nats (per query row); ``normalized`` = score / ‖∇L_z‖₂ (per column)."""
    if kind == "raw":
        return scores
    if kind == "per_nat":
        return scores / np.asarray(nats)[:, None]
    if kind == "normalized":
        return scores / np.maximum(np.asarray(doc_grad_norm), np.finfo(np.float64).tiny)[None, :]
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
