"""draftlm: small Llama-family draft models and speculative decoding (AMD-135M, in the open)."""

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError
from draftlm.generate import GenerationResult, generate
from draftlm.load import LM, load

__all__ = ["LM", "DraftlmError", "GenerationResult", "ModelConfig", "generate", "load"]
__version__ = "0.1.0"
