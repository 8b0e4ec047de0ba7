"""draftlm: small Llama-family draft models and speculative decoding (AMD-135M, in the open)."""

from draftlm.config import ModelConfig
from draftlm.errors import DraftlmError

__all__ = ["DraftlmError", "ModelConfig"]
__version__ = "0.1.0"
