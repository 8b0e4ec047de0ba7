"""The one exception type for errors a user can cause.

The CLI prints its message as a single line and exits non-zero; anything else that
escapes is a bug in draftlm and keeps its traceback.
"""


class DraftlmError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
