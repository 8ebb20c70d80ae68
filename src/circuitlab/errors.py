"""Every error circuitlab raises for bad input or configuration, in one place.

Each is a `CircuitlabError`; each message says what is wrong and how to fix it. The command line turns
them into one line on stderr and exit code 2, never a traceback.
"""


class CircuitlabError(ValueError):
    """Base class: bad input or configuration, detected before any heavy computation where possible."""


class TokenizationError(CircuitlabError):
    """A string is not the single token, or prompts are not the token length, that an analysis needs."""


class ModelLoadError(CircuitlabError):
    """A model spec cannot be resolved or loaded (unknown name, missing or corrupt file, no network)."""


class TaskError(CircuitlabError):
    """A task (dataset) is empty, malformed, or does not fit the model."""


class MetricError(CircuitlabError):
    """A metric cannot be computed (unknown name, zero denominator in a normalised metric, ...)."""


class GraphError(CircuitlabError):
    """An edge graph, circuit file, node/edge name or edge-coefficient tensor does not fit the model."""


class PatchingError(CircuitlabError):
    """An activation-patching request that cannot run: unknown site, bad granularity, head out of range."""


class CausalTraceError(CircuitlabError):
    """A causal-tracing request that cannot run: subject not in the prompt, bad window or noise level."""


class LensError(CircuitlabError):
    """A logit-lens request that cannot run (bad top-k, empty prompt)."""


class AttributionError(CircuitlabError):
    """An attribution request that cannot run: unknown method, rule or baseline, missing corrupt prompt."""


class AnalysisError(CircuitlabError):
    """An unknown analysis name, or options that the analysis does not take."""


class OutputError(CircuitlabError):
    """An output directory that cannot be written: a file, not writable, holds another run, or in use."""


class CacheError(CircuitlabError):
    """A model-cache entry that is missing, truncated or does not match its recorded size and hash."""


class HeadsError(CircuitlabError):
    """A head-analysis request that cannot run: repeated random tokens that do not fit the model's
    vocabulary or context, or a bad option (token count, sequence count, top)."""


class DiscoveryError(CircuitlabError):
    """A circuit-discovery request that cannot run: unknown method, ablation, metric or positions, a selection
    (top-n, threshold, target faithfulness) outside its range, or a metric the task cannot provide."""


class VerifyError(CircuitlabError):
    """A circuit-verification request that cannot run: faithfulness undefined (the metric is the same with
    every edge and with none), an empty task split, a bad noise level or bootstrap count, or a circuit file
    that does not fit the model."""
