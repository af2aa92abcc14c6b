"""EK-FAC: eigenvalue-corrected Kronecker-factored curvature, one linear layer at a time.

Read this module top to bottom; it follows the order of the maths.

Setting
-------
A tracked linear layer computes ``s_t = W a_t`` for every token ``t`` of a sequence, with
``W ∈ R^{d_out × d_in}`` (a bias is folded in by appending a constant 1 to ``a_t``). Back-propagating a
loss ``L`` through the network gives the *pseudo-gradient* ``g_t = ∂L/∂s_t ∈ R^{d_out}`` and the weight
gradient of one sequence is the sum of outer products

    G_n = ∂L_n/∂W = Σ_t g_t a_tᵀ.                                                       (1)

Influence functions need the inverse of the (damped) Fisher / Gauss–Newton matrix of the tracked
weights, ``F = E_n[vec(G_n) vec(G_n)ᵀ]``, which has ``(d_out·d_in)²`` entries: far too many. EK-FAC
(George et al. 2018; Grosse et al. 2023) approximates it in four steps:

1. **Covariances** (:func:`accumulate_covariances`). Average over all non-padding tokens

       A = E_t[a_t a_tᵀ]  (d_in × d_in),        S = E_t[g_t g_tᵀ]  (d_out × d_out).

   KFAC approximates ``F ≈ A ⊗ S``. For the *true* Fisher the labels that produce ``g_t`` are sampled from
   the model's own predictive distribution; the *empirical* Fisher uses the document's real next tokens.

2. **Eigenbasis** (:func:`eigendecompose`). In float64, ``A = Q_A diag(λ_A) Q_Aᵀ`` and
   ``S = Q_S diag(λ_S) Q_Sᵀ``. KFAC's eigenvalues would be the products ``λ_S[i]·λ_A[j]``. ``A`` and ``S``
   themselves are no longer needed after this step (and dropped unless asked to keep them).

3. **Corrected eigenvalues** (:func:`accumulate_lambda`). KFAC's eigenbasis is kept, but its eigenvalues
   are replaced by the exact second moments of the per-sequence gradients in that basis:

       Λ = E_n[(Q_Sᵀ G_n Q_A)²]     (elementwise square, d_out × d_in).

   Because ``Q_Sᵀ G_n Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ``, this never materialises ``G_n`` in the original basis.

4. **Damping and preconditioning** (:meth:`LayerFactors.precondition`). With damping ``λ`` (default
   ``0.1 × mean(Λ)`` per layer, as Grosse et al.), the inverse-Fisher-vector product of a gradient ``V``
   shaped like ``W`` is

       (F + λI)⁻¹ V ≈ Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ) ] Q_Aᵀ.                               (2)

The influence of a training document ``z`` on a query ``q`` is then the sum over tracked layers of
``⟨P_q, G_z⟩`` with ``P_q`` the preconditioned query gradient (2); see :mod:`kit.influence` for the score.

Layers: ``nn.Linear`` stores ``W`` as ``(d_out, d_in)``; Hugging Face GPT-2's ``Conv1D`` stores it transposed
``(d_in, d_out)``. Hooks see both as ``s = W a (+ b)`` with the same ``a`` and ``g``; everything in this module
uses the ``(d_out, d_in)`` convention.

Precision: each layer's factors carry a ``dtype`` (float32 by default, float64 in the tests). Whatever the
model's own dtype (a bfloat16 or float16 model included), ``a`` and ``g`` are cast to it before they are
multiplied, so covariances, Λ, preconditioning and scores are sums in float32 (float16 sums overflow, bfloat16
sums lose digits); the eigendecomposition always runs in float64. Nothing here moves tensors between devices:
the factors live on the device of the ``a`` and ``g`` they are made from (see :meth:`LayerFactors.to`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "LayerFactors",
    "TokenHooks",
    "accumulate_covariances",
    "eigendecompose",
    "eigh",
    "accumulate_lambda",
    "damping_value",
    "dense_ekfac_matrix",
    "truncated_svd",
    "FactorError",
]


from .errors import FactorError  # noqa: E402  (re-exported)


# --------------------------------------------------------------------------------------------------------------
# Capturing a_t and g_t
# --------------------------------------------------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's GPT-2 style ``Conv1D`` (weight stored ``(d_in, d_out)``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(d_out, d_in, has_bias)`` of a tracked layer, ``d_in`` excluding the bias column."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, module.bias is not None
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_out, d_in, module.bias is not None
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or GPT-2 Conv1D)")


class TokenHooks:
    """Hooks that hand ``(layer name, a, g)`` to a callback for every tracked layer after each backward.

    ``a`` is the layer input with a trailing 1 appended when the layer has a bias, shape ``(B, T, d_in[+1])``;
    ``g`` is the gradient of the loss w.r.t. the layer output, ``(B, T, d_out)``. Both are zeroed at padding
    positions using the mask given to :meth:`set_mask` (``(B, T)``, 1 = real token).

    Parameter gradients are switched off while the hooks are installed: the backward pass then only computes
    what the hooks need (activation gradients from the loss down to the first tracked layer), which is what
    makes the scoring pass cost about one forward + backward.

    Layers fed the very same input tensor in a forward (a Llama MLP's ``gate_proj`` and ``up_proj``; ``q/k/v_proj``)
    are handed the very same ``a`` object, masked once. Consumers may rely on that identity to do the work on
    ``a`` once (:func:`accumulate_covariances`, :func:`accumulate_lambda`, the token cache).
    """

    def __init__(self, model: nn.Module, modules: Dict[str, nn.Module], callback: Callable[[str, Tensor, Tensor], None]):
        self.model, self.modules, self.callback = model, modules, callback
        # per thread: its mask, its forward's inputs → their masked `a`, its callback (see :meth:`bind`)
        self._local = threading.local()
        self._handles: list = []
        self._saved_requires_grad: list = []

    def set_mask(self, mask: Tensor) -> None:
        """The padding mask of the batch the calling thread runs next."""
        self._local.mask = mask
        self._local.inputs = {}

    def bind(self, callback: Callable[[str, Tensor, Tensor], None]) -> None:
        """Hand the calling thread's batches to ``callback`` instead of the one given at construction: threads that
        run batches side by side (:func:`kit.influence.run_pass_in_threads`) each keep their own sums."""
        self._local.callback = callback

    def _forward_hook(self, name: str, module: nn.Module):
        bias = layer_shape(module)[2]

        def hook(mod, inputs, output):
            if not torch.is_grad_enabled():
                return
            local = self._local
            x, mask = inputs[0], getattr(local, "mask", None)
            callback = getattr(local, "callback", self.callback)
            inputs_seen = local.__dict__.setdefault("inputs", {})
            seen = inputs_seen.get((id(x), bias))
            if seen is not None and seen[0] is x:  # another layer's input too: the same `a`
                a = seen[1]
            else:
                a = x.detach()
                if bias:
                    a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
                if mask is not None:
                    a = a * mask.to(a.dtype).unsqueeze(-1)
                inputs_seen[(id(x), bias)] = (x, a)  # x held: its id cannot be reused during this forward
            if not output.requires_grad:  # first tracked layer: start the graph here
                output.requires_grad_(True)

            def grad_hook(g):
                g = g.detach()
                if mask is not None:
                    g = g * mask.to(g.dtype).unsqueeze(-1)
                callback(name, a, g)

            output.register_hook(grad_hook)

        return hook

    def __enter__(self) -> "TokenHooks":
        for p in self.model.parameters():
            self._saved_requires_grad.append((p, p.requires_grad))
            p.requires_grad_(False)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name, module)))
        return self

    def __exit__(self, *exc) -> None:
        self._local = threading.local()
        for h in self._handles:
            h.remove()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._handles, self._saved_requires_grad = [], []


# --------------------------------------------------------------------------------------------------------------
# Factors of one layer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LayerFactors:
    """Everything EK-FAC knows about one tracked layer, in ``dtype``.

    ``A``/``S`` are *sums* over tokens until :func:`eigendecompose` divides them by ``n_tokens``;
    ``Lambda`` is a sum over sequences until :func:`finalise_lambda` divides it by ``n_sequences``.
    """

    name: str
    d_out: int
    d_in: int  # including the bias column if any
    A: Optional[Tensor] = None  # activation covariance E_t[a aᵀ]
    S: Optional[Tensor] = None  # pseudo-gradient covariance E_t[g gᵀ]
    n_tokens: int = 0
    Q_A: Optional[Tensor] = None
    eig_A: Optional[Tensor] = None
    Q_S: Optional[Tensor] = None
    eig_S: Optional[Tensor] = None
    Lambda: Optional[Tensor] = None  # corrected eigenvalues E_n[(Q_Sᵀ G_n Q_A)²]
    n_sequences: int = 0
    dtype: torch.dtype = torch.float32  # accumulation and storage dtype of every tensor above
    _denominator: Optional[tuple] = field(default=None, repr=False, compare=False)  # (Λ, its version, damping, Λ+λ)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LayerFactors":
        """Move (and cast) every tensor of the layer, in place; returns ``self``."""
        self.dtype = dtype or self.dtype
        for k in ("A", "S", "Q_A", "eig_A", "Q_S", "eig_S", "Lambda"):
            t = getattr(self, k)
            if t is not None:
                setattr(self, k, t.to(device=device, dtype=self.dtype))
        return self

    # -- damping and preconditioning ---------------------------------------------------------------------------
    def damping(self, damping: Union[str, float] = "heuristic") -> float:
        return damping_value(self.Lambda, damping)

    def to_eigenbasis(self, a: Tensor, g: Tensor) -> Tensor:
        """``Q_Sᵀ G_n Q_A`` for each sequence's gradient ``G_n = Σ_t g_t a_tᵀ``, from its tokens ``a (B, T, d_in)``,
        ``g (B, T, d_out)``, in ``self.dtype``; ``(B, d_out, d_in)``.

        Both orders give the same matrix; the cheaper one is taken (the ``Σ_t g aᵀ`` term, ``T·d_out·d_in``, is
        common to both). Rotating every token costs ``T·(d_out² + d_in²)``; rotating each sequence's ``G_n`` once
        costs ``d_out·d_in·(d_out + d_in)``, cheaper only for long sequences.
        """
        return self._to_eigenbasis(a, g, None)

    def _to_eigenbasis(self, a: Tensor, g: Tensor, memo: Optional[list], out: Optional[Sequence[Tensor]] = None):
        """:meth:`to_eigenbasis`; ``memo`` (a list) remembers the last ``a Q_A`` so that a layer given the same ``a``
        object and the same ``Q_A`` object right after (a shared input and eigenbasis) does not rotate it again.
        ``out``: the ``B`` matrices ``(d_out, d_in)`` to write the results into (rows of a larger tensor)."""
        tokens = self._rotated_tokens(a, g, memo)
        if tokens is not None:  # per token, then summed
            gq, aq, lengths = tokens
            return sequence_gradients(gq, aq, out=out, lengths=lengths)
        a, g = a.to(self.dtype), g.to(self.dtype)
        lengths = token_lengths(a, self.d_out * self.d_in)
        rotated = self.Q_S.T @ sequence_gradients(g, a, lengths=lengths) @ self.Q_A  # G_n, then rotated
        if out is None:
            return rotated
        for r, o in zip(rotated, out):
            o.copy_(r)
        return out

    def _rotated_tokens(self, a: Tensor, g: Tensor, memo: Optional[list]
                        ) -> Optional[Tuple[Tensor, Tensor, Optional[List[int]]]]:
        """``(g Q_S, a Q_A, lengths)``, every token rotated (padding skipped, :func:`token_lengths`), when that is
        the cheaper order of :meth:`to_eigenbasis` (then ``Q_Sᵀ G_n Q_A = (g Q_S)_nᵀ (a Q_A)_n``, summed over the
        sequence's first ``lengths[n]`` tokens); ``None`` when forming each ``G_n`` first is cheaper."""
        T = a.shape[1]
        if T * (self.d_out**2 + self.d_in**2) > self.d_out * self.d_in * (self.d_out + self.d_in):
            return None
        a, g = a.to(self.dtype), g.to(self.dtype)
        lengths = token_lengths(a, self.d_out**2 + self.d_in**2 + self.d_out * self.d_in)
        return rotate_tokens(g, self.Q_S, lengths), rotate(a, self.Q_A, memo, lengths), lengths

    def precondition(self, V: Tensor, damping: Union[str, float] = "heuristic", kfac: bool = False) -> Tensor:
        """Apply equation (2), ``Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ``, to ``V`` of shape ``(..., d_out, d_in)``.

        With ``kfac=True`` the KFAC eigenvalues ``λ_S ⊗ λ_A`` replace the corrected ``Λ`` (for comparison).
        """
        lam = self._eigenvalues(kfac)
        return self._solve(self.Q_S.T @ V.to(self.dtype) @ self.Q_A, lam, damping)

    def precondition_tokens(self, a: Tensor, g: Tensor, damping: Union[str, float] = "heuristic",
                            kfac: bool = False, eigenbasis: bool = False, out: Optional[Sequence[Tensor]] = None):
        """:meth:`precondition` of each sequence's gradient ``Σ_t g_t a_tᵀ``, rotated from its tokens
        (:meth:`to_eigenbasis`): for a short query the rotation into the eigenbasis costs a few tokens' worth
        instead of two dense ``d_out × d_in`` products. ``(B, d_out, d_in)``. With ``eigenbasis=True`` the result
        stays in the eigenbasis, ``(Q_Sᵀ V Q_A) ⊘ (Λ + λ)`` (``P = Q_S · that · Q_Aᵀ``): a score against a document
        gradient ``G`` is then taken against ``Q_Sᵀ G Q_A``, rotated from the document's tokens.

        ``out``: ``B`` matrices ``(d_out, d_in)`` (e.g. rows of the caller's result tensor) that receive the
        results, returned instead of a new tensor: each is written once, in place."""
        lam = self._eigenvalues(kfac)
        rotated = self._to_eigenbasis(a, g, None, out)
        den = self._damped(lam, damping)
        if eigenbasis:
            for r in rotated:
                r.div_(den)
            return rotated
        if out is None:
            return self.Q_S @ rotated.div_(den) @ self.Q_A.T
        for r in rotated:
            torch.mm(self.Q_S @ (r / den), self.Q_A.T, out=r)
        return rotated

    def _damped(self, lam: Tensor, damping: Union[str, float]) -> Tensor:
        """``Λ + λ``, kept for the next call with the same, unchanged ``Λ`` and damping (a query pass asks once per
        layer and batch)."""
        c = self._denominator
        if c is not None and c[0] is lam and c[1] == lam._version and c[2] == damping:
            return c[3]
        den = lam + damping_value(lam, damping)
        self._denominator = (lam, lam._version, damping, den)
        return den

    def _solve(self, rotated: Tensor, lam: Tensor, damping: Union[str, float]) -> Tensor:
        """``Q_S [M ⊘ (Λ + λ)] Q_Aᵀ`` for ``M`` already in the eigenbasis and the eigenvalues ``lam``: in the
        eigenbasis the damped Fisher is diagonal, so its inverse is an elementwise division."""
        return self.Q_S @ (rotated / self._damped(lam, damping)) @ self.Q_A.T

    def _eigenvalues(self, kfac: bool) -> Tensor:
        if self.Q_S is None or (not kfac and self.Lambda is None):
            raise FactorError(f"layer {self.name}: the {'eigenbasis' if self.Q_S is None else 'corrected eigenvalues'}"
                              " are missing; fit the factors first (`kit fit`)")
        return self.kfac_eigenvalues() if kfac else self.Lambda

    def precondition_low_rank(self, V: Optional[Tensor], rank: int, damping: Union[str, float] = "heuristic",
                              kfac: bool = False, seed: int = 0,
                              tokens: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """Rank-``r`` factors ``L (…, d_out, r)``, ``R (…, r, d_in)`` of the preconditioned ``V`` (eq. 2), ``P ≈ L R``.

        ``P = Q_S M Q_Aᵀ`` with ``M = (Q_Sᵀ V Q_A) ⊘ (Λ + λ)``, and ``Q_S``, ``Q_A`` are orthogonal, so ``P`` and
        ``M`` have the same singular values and the truncated SVD of ``P`` is ``Q_S U_r · diag(s_r) · V_rᵀ Q_Aᵀ``
        with ``U_r s_r V_rᵀ`` that of ``M``: the dense ``P`` is never rotated back, and the SVD is the randomised
        one of :func:`truncated_svd`. ``tokens=(a, g)`` instead of ``V`` rotates each sequence's gradient from its
        tokens (:meth:`to_eigenbasis`).
        """
        lam = self._eigenvalues(kfac)
        rotated = self.to_eigenbasis(*tokens) if tokens is not None else self.Q_S.T @ V.to(self.dtype) @ self.Q_A
        M = rotated / self._damped(lam, damping)
        U, s, Vh = truncated_svd(M, rank, seed=seed)
        return self.Q_S @ (U * s.unsqueeze(-2)), Vh @ self.Q_A.T

    def kfac_eigenvalues(self) -> Tensor:
        """KFAC's eigenvalues ``λ_S[i] λ_A[j]``, scaled to the per-sequence Fisher by tokens per sequence."""
        tokens_per_seq = self.n_tokens / max(self.n_sequences, 1)
        return torch.outer(self.eig_S, self.eig_A) * tokens_per_seq

    def state_dict(self, stage: str, dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
        """The tensors of one stage (``covariance``, ``eigen``, ``lambda``) for saving, cast to ``dtype``."""
        keys = {"covariance": ["A", "S"], "eigen": ["Q_A", "eig_A", "Q_S", "eig_S"], "lambda": ["Lambda"]}[stage]
        out = {f"{self.name}/{k}": getattr(self, k).to(dtype or self.dtype).contiguous() for k in keys}
        counts = {"covariance": self.n_tokens, "eigen": self.n_tokens, "lambda": self.n_sequences}[stage]
        out[f"{self.name}/count_{stage}"] = torch.tensor(counts, dtype=torch.int64)
        return out

    def load_state(self, stage: str, tensors: Dict[str, Tensor]) -> None:
        keys = {"covariance": ["A", "S"], "eigen": ["Q_A", "eig_A", "Q_S", "eig_S"], "lambda": ["Lambda"]}[stage]
        for k in keys:
            setattr(self, k, tensors[f"{self.name}/{k}"].to(self.dtype))
        count = int(tensors[f"{self.name}/count_{stage}"])
        if stage == "lambda":
            self.n_sequences = count
        else:
            self.n_tokens = count


def truncated_svd(M: Tensor, rank: int, oversample: int = 10, power_iters: int = 3,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``r`` truncated SVD ``M ≈ U diag(s) Vᵀ`` of a batch of matrices ``(…, m, n)``: ``U (…, m, r)``,
    ``s (…, r)``, ``Vᵀ (…, r, n)``.

    Randomised (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1): an orthonormal basis ``Y`` of the
    range of ``M`` comes from ``M Ω`` for a Gaussian ``Ω`` with ``r + oversample`` columns (seeded: the result
    is deterministic), sharpened by ``power_iters`` rounds of ``M Mᵀ``; the exact SVD of the small ``Yᵀ M`` then
    gives the factors. It costs ``O(m n (r + oversample))`` instead of a full SVD's ``O(m n min(m, n))``. When
    ``r + oversample`` reaches ``min(m, n)`` the full SVD is used.
    """
    m, n = M.shape[-2:]
    k = rank + oversample
    if k >= min(m, n):
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[..., :rank], s[..., :rank], Vh[..., :rank, :]
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same Ω whatever the device
    omega = torch.randn(n, k, generator=gen, dtype=torch.float64).to(device=M.device, dtype=M.dtype)
    Y = torch.linalg.qr(M @ omega).Q
    for _ in range(power_iters):
        Y = torch.linalg.qr(M @ torch.linalg.qr(M.mT @ Y).Q).Q
    Ub, s, Vh = torch.linalg.svd(Y.mT @ M, full_matrices=False)
    return (Y @ Ub)[..., :rank], s[..., :rank], Vh[..., :rank, :]


def new_factors(modules: Dict[str, nn.Module], dtype: Optional[torch.dtype] = None) -> Dict[str, LayerFactors]:
    """Empty factors per tracked layer. ``dtype`` defaults to float32, or float64 for a float64 model."""
    out = {}
    for name, module in modules.items():
        d_out, d_in, bias = layer_shape(module)
        dt = dtype or accumulation_dtype(module.weight.dtype)
        out[name] = LayerFactors(name=name, d_out=d_out, d_in=d_in + int(bias), dtype=dt)
    return out


TRIM_WORK = 1 << 20  # multiply-adds per token below which padding is not worth finding (narrow layers)


def token_lengths(x: Tensor, work: int) -> Optional[List[int]]:
    """For ``x (B, T, d)`` on a CPU: per sequence, 1 + the position of its last token whose row of ``x`` is not all
    zero (0 if none), for products that cost ``work`` multiply-adds per token. ``None`` (every token) when that is
    under :data:`TRIM_WORK` (finding and packing the tokens would cost about what it saves: on lab ``large``'s
    192/576-wide layers it cost 2 % of the run), when under 1/16 of the ``B·T`` tokens would be trimmed, or on
    another device (where data-dependent shapes would stall the stream).

    Padding is zeroed by :class:`TokenHooks`, and a token whose row is zero adds nothing to ``Σ_t g_t a_tᵀ``, to
    a Gram ``Σ_t x_t x_tᵀ`` or to ``x Q`` (zeros), so every product over tokens may stop there: the trimmed products
    are the padded ones, without the multiplications by zero."""
    if x.device.type != "cpu" or work < TRIM_WORK:
        return None
    T = x.shape[1]
    live = x.abs().amax(-1) != 0  # (B, T); a NaN row counts as live
    last = (live * torch.arange(1, T + 1)).amax(1).tolist()
    return None if sum(last) * 16 > 15 * len(last) * T else last  # under 1/16 padding: not worth packing


def real_tokens(x: Tensor, lengths: Optional[List[int]]) -> Tensor:
    """The tokens of ``x (B, T, d)`` as rows ``(tokens, d)``: each sequence's first ``lengths[n]``, packed (all
    ``B·T`` when ``lengths`` is ``None``)."""
    if lengths is None:
        return x.reshape(-1, x.shape[-1])
    return torch.cat([x[n, :L] for n, L in enumerate(lengths)])


def rotate_tokens(x: Tensor, Q: Tensor, lengths: Optional[List[int]] = None) -> Tensor:
    """``x Q`` for ``x (B, T, d)``; with ``lengths``, only each sequence's first ``lengths[n]`` tokens are multiplied
    (packed into one product) and the others are zero, as they would be (see :func:`token_lengths`)."""
    if lengths is None:
        return x @ Q
    out = x.new_zeros(x.shape[:-1] + (Q.shape[1],))
    rotated, start = real_tokens(x, lengths) @ Q, 0
    for n, L in enumerate(lengths):
        out[n, :L] = rotated[start:start + L]
        start += L
    return out


def sequence_gradients(g: Tensor, a: Tensor, out: Optional[Sequence[Tensor]] = None,
                       lengths: Optional[List[int]] = None):
    """Each sequence's gradient ``G_n = Σ_t g_t a_tᵀ`` of one layer from its tokens ``g (B, T, d_out)`` and
    ``a (B, T, d_in)``: ``(B, d_out, d_in)``, or written into ``out`` (a ``(B, d_out, d_in)`` tensor, or ``B``
    matrices ``(d_out, d_in)`` such as rows of a larger tensor) and ``out`` returned. ``lengths``: sum only each
    sequence's first ``lengths[n]`` tokens (:func:`token_lengths`; the others are zero).

    On a CPU one product per sequence, straight into its matrix, is about twice as fast as one batched product
    (MKL's batched kernel multiplies the transposed ``g`` less well, and its result would be a new tensor to copy);
    on a GPU the batched product is one kernel instead of ``B``."""
    B, T, d_out = g.shape
    if out is None:
        out = torch.empty((B, d_out, a.shape[2]), dtype=g.dtype, device=g.device)
    if g.device.type != "cpu" and isinstance(out, Tensor) and lengths is None:
        return torch.bmm(g.transpose(1, 2), a, out=out)
    for n in range(B):
        L = T if lengths is None else lengths[n]
        torch.mm(g[n, :L].T, a[n, :L], out=out[n])
    return out


def rotate(a: Tensor, Q: Tensor, memo: Optional[list] = None, lengths: Optional[List[int]] = None) -> Tensor:
    """``a @ Q`` (:func:`rotate_tokens`); ``memo`` (a list) keeps the last ``(a, Q, a @ Q)`` so that the same ``a``
    object rotated by the same ``Q`` object right after (layers sharing an input and its eigenbasis) is not
    rotated again."""
    if memo and memo[0] is a and memo[1] is Q:
        return memo[2]
    aq = rotate_tokens(a, Q, lengths)
    if memo is not None:
        memo[:] = [a, Q, aq]
    return aq


def accumulation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/bfloat16/float16 models (never sum in half precision), float64 for float64 models."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def damping_value(Lambda: Tensor, damping: Union[str, float]) -> float:
    """``0.1 × mean(Λ)`` for ``"heuristic"`` (Grosse et al. 2023), else the given fixed value."""
    if isinstance(damping, str):
        if damping != "heuristic":
            raise ValueError(f"damping must be 'heuristic' or a non-negative number, got {damping!r}")
        return 0.1 * float(Lambda.to(torch.float64).mean())
    if not (damping > 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be 'heuristic' or a positive number, got {damping!r} (with 0 the inverse "
                         "does not exist wherever Λ is 0)")
    return float(damping)


# --------------------------------------------------------------------------------------------------------------
# Step 1: covariances
# --------------------------------------------------------------------------------------------------------------


def _gram_blocks(d: int) -> List[Tuple[int, int]]:
    """Column blocks of about 160 (at most 8 blocks) for :func:`add_gram_`."""
    k = min(8, max(1, math.ceil(d / 160)))
    edges = [d * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def add_gram_(acc: Tensor, x: Tensor) -> None:
    """``acc += xᵀx = Σ_t x_t x_tᵀ`` for ``x`` of shape ``(tokens, d)``, on and above the diagonal blocks only.

    ``xᵀx`` is symmetric, so only the column blocks on and above the diagonal are multiplied (with ``k`` blocks,
    ``(k+1)/2k`` of a full product's flops), straight into ``acc`` (no temporary); :func:`mirror_` fills the blocks
    below the diagonal once, when the sum is complete.
    """
    for lo, hi in _gram_blocks(x.shape[1]):
        acc[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])


def mirror_(M: Tensor) -> Tensor:
    """Copy the blocks above the diagonal blocks of a sum built by :func:`add_gram_` to those below: ``M`` symmetric."""
    for lo, hi in _gram_blocks(M.shape[0]):
        M[hi:, lo:hi] = M[lo:hi, hi:].T
    return M


def accumulate_covariances(factors: Dict[str, LayerFactors]) -> Callable[[str, Tensor, Tensor], None]:
    """Hook callback adding ``Σ_t a aᵀ`` and ``Σ_t g gᵀ`` of a batch to the factors (padding already zeroed); the sums
    hold their upper blocks only until :func:`eigendecompose_layer` mirrors them.

    Layers that are handed the same ``a`` object (the same input, see :class:`TokenHooks`) from the very first
    batch share one ``A`` tensor, added to once per batch: the first of them to see a batch's ``a`` adds its Gram,
    the others only count it. Every member must see every ``a`` the first one saw; anything else is an error.
    A fit resumed from saved sums keeps each layer's own ``A``."""
    groups: Dict[str, dict] = {}  # layer → its group: members, the `a` being counted, how many members saw it

    def add(acc: Tensor, x: Tensor) -> None:
        """``acc += Σ_t x_t x_tᵀ`` over the real tokens of ``x (B, T, d)`` (padding skipped where that pays)."""
        add_gram_(acc, real_tokens(x, token_lengths(x, x.shape[-1] ** 2 // 2)).to(acc.dtype))

    def callback(name: str, a: Tensor, g: Tensor) -> None:
        f = factors[name]
        if f.A is None:
            f.S = torch.zeros(f.d_out, f.d_out, dtype=f.dtype, device=a.device)
            twin = next((gr for gr in groups.values() if gr["a"] is a and gr["batches"] == 1), None)
            if twin is not None:  # the same input as a layer that started on this very `a`: share its sum
                f.A = factors[twin["members"][0]].A
                twin["members"].append(name)
                twin["seen"] += 1
                groups[name] = twin
                add(f.S, g)
                return
            f.A = torch.zeros(f.d_in, f.d_in, dtype=f.dtype, device=a.device)
        group = groups.setdefault(name, {"members": [name], "a": None, "seen": 0, "batches": 0})
        if group["a"] is a:
            group["seen"] += 1  # already added by a member of the group
        else:
            if group["a"] is not None and group["seen"] != len(group["members"]):
                raise FactorError(f"layers {group['members']} were given the same inputs in the first batch but not "
                                  "in a later one; their activation covariance cannot be shared")
            group["a"], group["seen"], group["batches"] = a, 1, group["batches"] + 1
            add(f.A, a)
        add(f.S, g)

    return callback


# --------------------------------------------------------------------------------------------------------------
# Step 2: eigendecomposition
# --------------------------------------------------------------------------------------------------------------


def eigendecompose(factors: Dict[str, LayerFactors], progress: bool = False, keep_covariances: bool = False) -> None:
    """Normalise the summed covariances to means and eigendecompose them in float64 (every layer).

    Layers that share one ``A`` tensor (:func:`accumulate_covariances`) share its eigenbasis too: it is computed
    for the first of them, and the others take the same ``Q_A``/``eig_A`` objects and decompose their own ``S``."""
    from tqdm.auto import tqdm

    layers = list(factors.values())
    leaders: Dict[int, LayerFactors] = {}
    for f in layers:
        if f.A is not None:
            leaders.setdefault(id(f.A), f)
    followers = [(f, leaders[id(f.A)]) for f in layers if f.A is not None and leaders[id(f.A)] is not f]
    first = [f for f in layers if f.A is None or leaders[id(f.A)] is f]
    bar = tqdm(total=len(layers), desc="EK-FAC eigendecomposition", disable=not progress)
    threads = torch.get_num_threads()
    serial = threads == 1 or not layers or layers[0].A is None or layers[0].A.device.type != "cpu"
    with lapack_threads(1 if not serial else threads):
        for wave in ([(f, None) for f in first], followers):  # the shared eigenbases first, then those sharing them
            if serial:
                for f, like in wave:
                    eigendecompose_layer(f, keep_covariances, like)
                    bar.update()
                continue
            # LAPACK's eigh scales poorly over cores: N single-threaded eighs side by side are faster on a CPU
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    biggest_first = sorted(wave, key=lambda fl: -(fl[0].d_in**3 + fl[0].d_out**3))
                    for _ in pool.map(lambda fl: eigendecompose_layer(fl[0], keep_covariances, fl[1]), biggest_first):
                        bar.update()
            finally:
                torch.set_num_threads(threads)
    bar.close()


def eigh(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of the symmetric ``M``, on ``M``'s device.

    On a CPU through NumPy's LAPACK (OpenBLAS ``dsyevd``, divide and conquer, as torch's): for SmolLM2's 150
    covariances (576 and 1,536 wide, float64) it took 29.3 s against torch's 34.5 s on 2 cores, two at a time, with
    eigenvalues equal to about 1e-15 relative. NumPy releases the GIL inside LAPACK, so threads run side by side;
    its threads are set by :func:`lapack_threads`. Elsewhere torch's (cuSOLVER on a GPU)."""
    if M.device.type != "cpu":
        return torch.linalg.eigh(M)
    import numpy as np

    w, V = np.linalg.eigh(M.numpy())
    return torch.from_numpy(w), torch.from_numpy(V)


@contextlib.contextmanager
def lapack_threads(n: int):
    """Run NumPy's BLAS/LAPACK (used by :func:`eigh`) on ``n`` threads inside the block (``threadpoolctl``)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def eigendecompose_layer(f: LayerFactors, keep_covariances: bool = False, like: Optional[LayerFactors] = None) -> None:
    """``A/n = Q_A diag(λ_A) Q_Aᵀ``, ``S/n = Q_S diag(λ_S) Q_Sᵀ`` in float64 on the factors' device; the results are
    kept in ``f.dtype``. A non-finite covariance (NaN/inf activations or gradients, e.g. from an overflowing fp16
    model) is reported with the layer's name instead of failing inside ``eigh``. ``like``: a layer, already done,
    whose ``A`` is this layer's (the same input): its ``Q_A``/``eig_A`` (and kept ``A``) are taken as they are."""
    if f.A is None or f.n_tokens == 0:
        raise FactorError(f"layer {f.name}: no tokens were seen; is the corpus empty?")
    if like is not None and like.n_tokens != f.n_tokens:
        raise FactorError(f"layers {like.name} and {f.name} share an activation covariance but counted "
                          f"{like.n_tokens} and {f.n_tokens} tokens")
    mirror_(f.S)
    if like is None:
        mirror_(f.A)
    for label, M in (("activation covariance A", None if like is not None else f.A), ("pseudo-gradient covariance S", f.S)):
        if M is not None and not torch.isfinite(M).all():
            raise FactorError(
                f"layer {f.name}: the {label} contains NaN or inf values; the model produced non-finite "
                "activations or gradients on this corpus (check the model's dtype and the documents)"
            )
    S = f.S.to(torch.float64) / f.n_tokens
    eig_S, Q_S = eigh(0.5 * (S + S.T))
    f.eig_S, f.Q_S = (t.to(f.dtype).contiguous() for t in (eig_S, Q_S))
    f.S = S.to(f.dtype) if keep_covariances else None
    if like is not None:
        f.eig_A, f.Q_A, f.A = like.eig_A, like.Q_A, like.A
        return
    A = f.A.to(torch.float64) / f.n_tokens
    eig_A, Q_A = eigh(0.5 * (A + A.T))
    f.eig_A, f.Q_A = (t.to(f.dtype).contiguous() for t in (eig_A, Q_A))
    f.A = A.to(f.dtype) if keep_covariances else None


# --------------------------------------------------------------------------------------------------------------
# Step 3: eigenvalue correction
# --------------------------------------------------------------------------------------------------------------


def accumulate_lambda(factors: Dict[str, LayerFactors]) -> Callable[[str, Tensor, Tensor], None]:
    """Hook callback adding ``Σ_n (Q_Sᵀ G_n Q_A)²`` of a batch, with ``G_n = Σ_t g_t a_tᵀ`` per sequence. Layers with
    a shared input and eigenbasis (:func:`eigendecompose`) rotate that input once per batch."""
    memo: list = []  # the last (a, Q_A, a Q_A)

    def callback(name: str, a: Tensor, g: Tensor) -> None:
        f = factors[name]
        if f.Lambda is None:
            f.Lambda = torch.zeros(f.d_out, f.d_in, dtype=f.dtype, device=a.device)
        tokens = f._rotated_tokens(a, g, memo)
        if tokens is None:  # long sequences: each G_n formed, then rotated
            for r in f._to_eigenbasis(a, g, memo):
                f.Lambda.addcmul_(r, r)
            return
        gq, aq, lengths = tokens
        r = torch.empty_like(f.Lambda)
        for n in range(gq.shape[0]):  # Λ += r ⊙ r, r = (g Q_S)_nᵀ (a Q_A)_n, one sequence at a time in one buffer
            L = gq.shape[1] if lengths is None else lengths[n]
            torch.mm(gq[n, :L].T, aq[n, :L], out=r)
            f.Lambda.addcmul_(r, r)

    return callback


def finalise_lambda(factors: Dict[str, LayerFactors]) -> None:
    for f in factors.values():
        if f.Lambda is None or f.n_sequences == 0:
            raise FactorError(f"layer {f.name}: no sequences were seen in the eigenvalue-correction pass")
        if not torch.isfinite(f.Lambda).all():
            raise FactorError(f"layer {f.name}: the corrected eigenvalues contain NaN or inf values")
        f.Lambda = f.Lambda / f.n_sequences


# --------------------------------------------------------------------------------------------------------------
# For tests and teaching: the dense matrix EK-FAC stands for
# --------------------------------------------------------------------------------------------------------------


def dense_ekfac_matrix(f: LayerFactors, damping: Union[str, float] = "heuristic") -> Tensor:
    """The explicit ``(d_out·d_in)²`` matrix ``(Q_S ⊗ Q_A) diag(vec(Λ) + λ) (Q_S ⊗ Q_A)ᵀ`` for row-major vec(W).

    Only for tiny layers: it is what :meth:`LayerFactors.precondition` inverts implicitly.
    """
    K = torch.kron(f.Q_S, f.Q_A)
    diag = f.Lambda.reshape(-1) + damping_value(f.Lambda, damping)
    return K @ torch.diag(diag) @ K.T


@contextlib.contextmanager
def hooks(model: nn.Module, modules: Dict[str, nn.Module], callback) -> Iterator[TokenHooks]:
    with TokenHooks(model, modules, callback) as h:
        yield h


def total_parameters(factors: Dict[str, LayerFactors]) -> int:
    return sum(f.d_out * f.d_in for f in factors.values())
