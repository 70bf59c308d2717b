"""Exceptions raised by bcpc.

Every user mistake gets a specific exception type with a message that says what is wrong and what
to do about it. All of them derive from :class:`BcpcError`, so ``except bcpc.errors.BcpcError``
catches everything this library raises on purpose. Several also derive from the built-in type a
user would expect (``ValueError``, ``TypeError``) so generic handlers keep working.
"""


class BcpcError(Exception):
    """Base class of every error bcpc raises on purpose."""


class UnsupportedOpError(BcpcError, NotImplementedError):
    """A graph node has no bound rule (raised at compile time, never at run time)."""


class TraceError(BcpcError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class GraphStructureError(BcpcError, ValueError):
    """The traced graph has a shape bcpc cannot certify (several inputs, batch mixing, ...)."""


class InvalidInputError(BcpcError, ValueError):
    """An input tensor, label or epsilon given at run time is malformed."""


class InvalidEpsilonError(InvalidInputError):
    """eps is negative, NaN, infinite or not a number."""


class InputDomainError(InvalidInputError):
    """The input lies outside the declared input domain."""


class ModelModeError(BcpcError, RuntimeError):
    """The model is in a mode (e.g. training-mode BatchNorm) in which a certificate would be wrong."""


class NonFiniteBoundError(BcpcError, ArithmeticError):
    """A bound came out NaN or infinite; a NaN must never be read as a margin."""


class ConfigError(BcpcError, ValueError):
    """A configuration value or file is invalid."""


class DatasetError(BcpcError, FileNotFoundError):
    """A dataset is missing, corrupted, or its hash does not match."""


class CheckpointError(BcpcError, ValueError):
    """A checkpoint is corrupted, truncated, unsafe, or belongs to another model/config."""


class ModelSpecError(BcpcError, ValueError):
    """A ``MODULE:FACTORY`` model path cannot be imported, is not callable, or does not build a model."""


class MissingToolError(BcpcError, RuntimeError):
    """An optional external tool (e.g. graphviz's ``dot``) is needed and not installed."""


class NonFiniteTrainingError(BcpcError, ArithmeticError):
    """Training produced NaN/Inf (loss, gradients or weights); the last finite checkpoint is kept."""


class GraphMismatchError(BcpcError, RuntimeError):
    """The compiled graph does not compute the user's ``model(x)``: no certificate is given."""
