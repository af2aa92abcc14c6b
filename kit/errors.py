"""The kit's errors: each is reported by the command line as one line and exit status 2 (no imports here, so the
command line starts fast)."""


class InputError(ValueError):
    """Bad user input (corpus, queries, options); the message says what to fix."""


class FactorError(RuntimeError):
    """Raised when a factor cannot be computed (non-finite covariance, missing stage)."""


class ModelError(ValueError):
    """A model could not be found or loaded; the message says what to pass instead."""
