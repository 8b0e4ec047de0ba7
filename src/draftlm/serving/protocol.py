"""The OpenAI wire format that `draftlm serve` speaks: request schemas, errors, responses.

Kept apart from the app and its worker so the contract with clients reads in one place:
what a request may contain (a malformed one is answered 400, as OpenAI does), which values
are refused as unsupported (400), how a prompt or a conversation becomes token ids, and
the JSON shapes of responses, stream chunks and errors that the official clients parse.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt

from draftlm.errors import DraftlmError
from draftlm.load import LM
from draftlm.output import GenerationResult

# torch.Generator.manual_seed accepts this range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code
        )
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---- requests ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI clients send
    many; ones that would change the output and that draftlm cannot honour are refused in
    `unsupported()` rather than silently dropped."""

    # Integers are strict (true, 1.5 or "16" are refused, as OpenAI refuses them); a model
    # name, when given, is not empty.
    model: str | None = Field(default=None, min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=1)  # not OpenAI's; vLLM clients send it
    n: StrictInt = 1
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings are supported", param="stop")
        return [s for s in stop if s]

    def unsupported(self) -> list[str]:
        """Names of the fields set to something draftlm does not implement."""
        names = []
        if self.presence_penalty:
            names.append("presence_penalty")
        if self.frequency_penalty:
            names.append("frequency_penalty")
        if self.logit_bias:
            names.append("logit_bias")
        return names


class CompletionRequest(SamplingFields):
    # A string, one string in a list, or token ids (OpenAI's array-of-integers form).
    prompt: str | list[str] | list[StrictInt]
    max_tokens: StrictInt | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        names += [n for n in ("echo", "suffix", "logprobs") if getattr(self, n)]
        if self.best_of not in (None, 1):
            names.append("best_of")
        return names


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """The plain {role, content} dict chat templates expect."""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        # OpenAI's newer clients send system prompts as "developer"; templates know "system".
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.logprobs:
            names.append("logprobs")
        if self.tools:
            names.append("tools")
        if self.response_format and self.response_format.get("type") != "text":
            names.append("response_format")
        return names

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- from a request to token ids -----------------------------------------------------------
def schema_param(loc: tuple) -> tuple[str | None, bool]:
    """The request field a pydantic error points at ("messages.0.content"), and whether
    it failed a union of forms (pydantic then appends a type tag such as `str` or
    `list[int]`, which is not a field)."""
    parts = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper()):
            return ".".join(parts) or None, True
        parts.append(str(part))
    return ".".join(parts) or None, False


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def completion_prompt_ids(lm: LM, prompt: str | list[str] | list[int]) -> list[int]:
    """Token ids of a completions prompt: a string, a list of one string, or token ids."""
    if isinstance(prompt, str):
        return encode(lm, prompt, "prompt")
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
        return encode(lm, prompt[0], "prompt")
    vocab = lm.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt):  # type: ignore[operator]
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return [int(t) for t in prompt]


def chat_prompt_ids(lm: LM, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the model's own chat template."""
    try:
        rendered = lm.tokenizer.apply_chat_template(messages)
    except DraftlmError as err:
        # The template is the model's, the data the client's: a render failure (or the
        # template's own raise_exception) means these messages do not fit this model's
        # conversation format.
        raise APIError(400, str(err), param="messages") from None
    # The template writes BOS itself when the model wants one (as generate(chat=True)).
    return encode(lm, rendered, "messages", add_bos=False)


def encode(lm: LM, text: str, param: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of client text; JSON can carry lone UTF-16 surrogates (\\ud800) that no
    tokenizer can encode, which the tokenizer reports and this names as the client's field."""
    try:
        return lm.tokenizer.encode(text, add_bos=add_bos)
    except DraftlmError as err:
        raise APIError(400, f"{param}: {err}", param=param) from None


# ---- responses -----------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.num_prompt_tokens,
        "completion_tokens": result.num_new_tokens,
        "total_tokens": result.num_prompt_tokens + result.num_new_tokens,
    }


class ResponseWriter:
    """Builds the JSON bodies of one request: the full response or its stream chunks,
    all sharing one id and creation time as OpenAI's do."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id, "object": object_, "created": self.created, "model": self.model,
            "choices": choices,
        }

    def full(self, result: GenerationResult) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0, "message": {"role": "assistant", "content": result.text},
                "logprobs": None, "finish_reason": result.finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {
                "index": 0, "text": result.text, "logprobs": None,
                "finish_reason": result.finish_reason,
            }
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage(result)
        return body

    def chunk(
        self, text: str | None, finish_reason: str | None = None, first: bool = False
    ) -> dict[str, Any]:
        """One stream chunk: a text delta, or (text None) the closing chunk."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        """The extra last chunk that `stream_options.include_usage` asks for."""
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        body = self._envelope(object_, [])
        body["usage"] = usage(result)
        return body
