"""Model loading and the `Model` wrapper around a TransformerLens `TransformerBridge`."""

from circuitlab.models.loading import load_model
from circuitlab.models.model import Model
from circuitlab.models.specs import DEFAULT_SPEC, KNOWN_SPECS

__all__ = ["Model", "load_model", "KNOWN_SPECS", "DEFAULT_SPEC"]
