"""circuitlab: circuit analysis for transformer language models on a TransformerLens bridge."""

from circuitlab.models import DEFAULT_SPEC, Model, load_model

__version__ = "0.1.0"
__all__ = ["Model", "load_model", "DEFAULT_SPEC", "__version__"]
