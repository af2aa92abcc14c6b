"""Typed configurations for fitting and scoring, with the help text the CLI shows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from .errors import InputError

DEFAULT_BATCH_TOKENS = 1024  # padded tokens per batch, at most (see FitConfig.max_batch_tokens)


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class FitConfig:
    """How EK-FAC factors are fitted on a corpus (``python -m kit fit``)."""

    model: str = _help("local Hugging Face model directory, a .gguf file, or a hub id", default="")
    corpus: str = _help("jsonl or parquet with columns id, text, source", default="")
    modules: Optional[List[str]] = _help(
        "linear layers to track: full names or suffixes (e.g. down_proj); default every MLP linear layer", default=None)
    fisher: str = _help("'sampled': labels drawn from the model (true Fisher); 'empirical': the document's own tokens",
                        default="sampled")
    damping: Union[str, float] = _help("'heuristic' = 0.1 × mean corrected eigenvalue per layer, or a fixed value",
                                       default="heuristic")
    n_docs: Optional[int] = _help("use a seeded random sample of this many documents (for slow models on a CPU); "
                                  "default all", default=None)
    max_tokens: Optional[int] = _help("tokens per document (the context); default min(512, model context)", default=None)
    long_docs: str = _help("documents longer than max_tokens: 'chunk' into pieces or 'truncate'", default="chunk")
    batch_size: int = _help("documents per forward/backward pass", default=8)
    max_batch_tokens: Optional[int] = _help(
        "also cap a batch at this many padded tokens (batches of long documents get fewer documents, at least one), "
        "so a pass's memory does not grow with document length; 0 = no cap. On the lab model the default ran as fast "
        "as 2,048-token batches with about 80 MB less memory; on a GPU larger batches pay", default=DEFAULT_BATCH_TOKENS)
    seed: int = _help("seed for the labels sampled for the true Fisher", default=0)
    dtype: str = _help("dtype of the model's forward/backward: float32, bfloat16, float16 (or float64 for tests); "
                       "factors are accumulated in float32 whatever it is", default="float32")
    factor_dtype: str = _help("dtype the factors are accumulated and stored in: float32, or float64 (tests)",
                              default="float32")
    keep_covariances: bool = _help("store A and S next to their eigenbases (not needed for scoring)", default=False)
    device: str = _help("'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'; under torchrun each process "
                        "takes cuda:LOCAL_RANK", default="auto")
    checkpoint_every: int = _help("save partial factors every N batches so a killed fit resumes", default=50)
    cache_gb: Optional[float] = _help(
        "token cache budget (GiB): the covariance pass's per-token activations and pseudo-gradients are kept for the "
        "eigenvalue-correction pass — and, with --fisher empirical, for the scoring pass of `fit --queries` — which "
        "then replay them instead of running the model again (identical results); 0 disables. Default 2 in "
        "memory, 8 on disk (at most half the free space)", default=None)
    cache_on: str = _help("where the token cache lives: 'memory' (on the compute device), 'disk' (a temporary file "
                          "in the run directory, read back through the OS page cache, so the process holds one "
                          "batch), or 'auto' (memory on a GPU, disk on a CPU)", default="auto")
    workers: Optional[int] = _help(
        "threads of this process that run batches side by side on a CPU, each with its share of the intra-op threads "
        "and its own sums (added up in a fixed order: the same factors up to float rounding); each worker's batches "
        "hold at most --max-batch-tokens / workers tokens, so the batches in flight take one batch's memory. "
        "Default: 2 on a CPU with at least 2 threads for a model under 20M parameters (its products split poorly "
        "over cores; two batches at once keep both busy), else 1", default=None)

    def validate(self) -> "FitConfig":
        if self.fisher not in ("sampled", "empirical"):
            raise InputError(f"--fisher must be 'sampled' or 'empirical', got {self.fisher!r}")
        self.damping = parse_damping(self.damping)
        if self.long_docs not in ("chunk", "truncate"):
            raise InputError(f"--long-docs must be 'chunk' or 'truncate', got {self.long_docs!r}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise InputError(f"--max-tokens must be at least 2, got {self.max_tokens}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.n_docs is not None and self.n_docs < 1:
            raise InputError(f"--n-docs must be at least 1, got {self.n_docs}")
        if self.cache_gb is not None and not self.cache_gb >= 0:
            raise InputError(f"--cache-gb must be a non-negative number of GiB, got {self.cache_gb!r}")
        if self.cache_on not in ("auto", "memory", "disk"):
            raise InputError(f"--cache-on must be auto, memory or disk, got {self.cache_on!r}")
        if self.workers is not None and not (isinstance(self.workers, int) and self.workers >= 1):
            raise InputError(f"--workers must be a whole number of at least 1, got {self.workers!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.factor_dtype not in ("float32", "float64"):
            raise InputError(f"--factor-dtype must be float32 or float64, got {self.factor_dtype!r}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 0:
            raise InputError(f"--max-batch-tokens must be at least 1 (or 0 for no cap), got {self.max_batch_tokens}")
        if self.max_batch_tokens == 0:
            self.max_batch_tokens = None
        if not isinstance(self.device, str) or not self.device:
            raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


@dataclass
class ScoreConfig:
    """How queries are scored against the fitted documents (``python -m kit score``)."""

    queries: str = _help("jsonl with id, prompt, completion (task optional)", default="")
    query_rank: Union[str, int] = _help("'full', or the rank r of each preconditioned query gradient's SVD", default="full")
    batch_size: int = _help("documents per forward/backward pass (default: the fit's)", default=0)
    query_batch_size: int = _help("queries per pass when computing query gradients", default=8)
    memory_budget_gb: float = _help("refuse full-rank queries whose preconditioned gradients exceed this", default=8.0)
    corpus: Optional[str] = _help("score this corpus (jsonl, parquet or a saved HF dataset) with the fitted factors "
                                  "instead of the fit corpus", default=None)
    top_k: int = _help("documents kept per query and side in topk.parquet", default=1000)
    device: Optional[str] = _help("compute device (default: the fit's)", default=None)
    dtype: Optional[str] = _help("model dtype for scoring (default: the fit's)", default=None)

    def validate(self) -> "ScoreConfig":
        self.query_rank = parse_rank(self.query_rank)
        if self.batch_size < 0:
            raise InputError(f"--batch-size must be at least 1 (or 0 for the fit's), got {self.batch_size}")
        if self.query_batch_size < 1:
            raise InputError(f"--query-batch-size must be at least 1, got {self.query_batch_size}")
        if self.top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {self.top_k}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return self

    @property
    def rank(self) -> Optional[int]:
        return None if self.query_rank == "full" else int(self.query_rank)


DTYPES = {"float32", "float64", "bfloat16", "float16"}


def parse_damping(value: Union[str, float]) -> Union[str, float]:
    if value == "heuristic":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"--damping must be 'heuristic' or a positive number, got {value!r}") from None
    if not (v > 0 and v != float("inf")):
        raise InputError(f"--damping must be 'heuristic' or a positive number, got {value!r} (with 0 EK-FAC's inverse "
                         "does not exist wherever a corrected eigenvalue is 0)")
    return v


def parse_rank(value: Union[str, int]) -> Union[str, int]:
    if value in ("full", None):
        return "full"
    try:
        r = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--query-rank must be 'full' or a positive integer, got {value!r}") from None
    if r < 1:
        raise InputError(f"--query-rank must be 'full' or a positive integer, got {value!r}")
    return r


def config_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def to_dict(cfg) -> Dict[str, Any]:
    return asdict(cfg)


def from_dict(cls, d: Dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


@dataclass
class FindingsConfig:
    """How the findings are computed (every field can be overridden from the command line / notebook parameters)."""

    kind: str = field(default="per_nat", metadata={"help": "score variant: per_nat (paper), raw or normalized"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for confidence intervals"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstraps"})
    answer_k: Optional[int] = field(default=None, metadata={
        "help": "top-k searched for answers (default: the paper's 500 of 5M scaled to the run, at least 10)"})
    procedure_k: Optional[int] = field(default=None, metadata={
        "help": "top-k characterised for procedures (default: the paper's 100 of 5M scaled, at least 10)"})
    powerlaw_top: int = field(default=500, metadata={"help": "top documents of each ranking fitted by a power law"})
    magnitude_fraction: float = field(default=0.01, metadata={
        "help": "top fraction of documents whose total influence per nat is compared (the paper's 50k of 5M)"})
    source_fractions: Optional[List[float]] = field(default=None, metadata={
        "help": "top/bottom cuts as fractions of the documents (default: the paper's 1e-5..1e-1 that fit)"})

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
