"""Exceptions that circuitlab raises for bad input: each message says what is wrong and how to fix it."""


class CircuitlabError(ValueError):
    """Base class: bad input or configuration detected before any heavy computation."""


class TokenizationError(CircuitlabError):
    """A string is not the single token, or prompts are not the token length, that an analysis needs."""


class ModelLoadError(CircuitlabError):
    """A model spec cannot be resolved or loaded."""


class TaskError(CircuitlabError):
    """A task (dataset) is empty, malformed, or does not fit the model."""


class MetricError(CircuitlabError):
    """A metric cannot be computed (unknown name, zero denominator in a normalised metric, ...)."""


class GraphError(CircuitlabError):
    """An edge graph, circuit file, node/edge name or edge-coefficient tensor does not fit the model."""
