"""Speculative decoding: drafters propose, the target verifies in one pass, exactly.

`verify` holds the acceptance rule, `decode` the loop, `drafters` the proposers (a draft
model, prompt lookup, a draft with another tokenizer) and `factory` builds the one a
command asks for.
"""

from draftlm.speculative.decode import speculative_decode
from draftlm.speculative.drafters import (
    CrossTokenizerDrafter,
    Draft,
    Drafter,
    ModelDrafter,
    NgramDrafter,
)
from draftlm.speculative.factory import build_drafter, drafter_from_options, load_draft
from draftlm.speculative.verify import acceptance_probability, verify_draft, verify_greedy

__all__ = [
    "CrossTokenizerDrafter", "Draft", "Drafter", "ModelDrafter", "NgramDrafter",
    "acceptance_probability", "build_drafter", "drafter_from_options", "load_draft",
    "speculative_decode", "verify_draft", "verify_greedy",
]
