"""One error hierarchy for the whole package (root: :class:`RebasinError`)."""


class RebasinError(Exception):
    """Root of every error rebasin raises on purpose."""

    exit_code = 2


class ModelLoadError(RebasinError):
    """The model file is missing, unreadable or not a valid model."""


class UnsupportedOpError(ModelLoadError):
    """onnxruntime has no kernel for an op of the model (a custom or contrib op)."""


class UnsupportedModelError(RebasinError):
    """The model uses something the analyzer refuses to handle (``strict`` mode)."""


class SpecMismatchError(RebasinError):
    """A spec or a permutation does not fit the model it is applied to."""


class SolverError(RebasinError):
    """A solver was asked for something it cannot do (unknown name, bad data)."""


class VerificationError(RebasinError):
    """Two models that must compute the same function do not."""

    exit_code = 1


class ResourceLimitError(RebasinError):
    """The work would exceed a resource budget (memory); refused before it starts."""

    exit_code = 3


class InternalError(RebasinError):
    """A bug in rebasin: an exception it did not expect (``--debug`` shows the traceback)."""

    exit_code = 4
