"""draftlm: small Llama-family draft models and speculative decoding (AMD-135M, in the open).

The names here are the Python API: load a model, generate (optionally with a drafter),
and the drafters themselves. Everything else lives in the subpackages."""

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.generate import generate
from draftlm.load import LM, load
from draftlm.output import GenerationResult
from draftlm.speculative import (
    CrossTokenizerDrafter,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    build_drafter,
)

__all__ = [
    "LM", "CrossTokenizerDrafter", "DraftlmError", "Drafter", "GenerationResult", "ModelConfig",
    "ModelDrafter", "NgramDrafter", "build_drafter", "generate", "load",
]
__version__ = "0.1.0"
