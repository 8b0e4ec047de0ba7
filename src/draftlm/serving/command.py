"""`draftlm serve`: one model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    draftlm serve --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --port 8000

then point any OpenAI client at http://127.0.0.1:8000/v1 (`--api-key KEY`, or
$DRAFTLM_API_KEY, makes it require `Authorization: Bearer KEY` everywhere but /health).

- `POST /v1/completions`, `POST /v1/chat/completions` (the model's own chat template):
  `max_tokens` (completions default 16 as OpenAI's; chat default and upper bound
  `--max-tokens-limit`), `temperature` (default 1.0 as OpenAI's; 0 is greedy), `top_p`,
  `top_k`, `seed`, `stop` (string or list), `stream` (SSE chunks, then `data: [DONE]`),
  `stream_options.include_usage`; `n` must be 1. Penalties, logprobs, tools, echo are
  refused (400) rather than ignored.
- `GET /v1/models`, `GET /health` (503 once the generation thread has stopped).
- `GET /metrics`: JSON (`?format=prometheus` for Prometheus text): requests accepted,
  completed, cancelled, failed, rejected (4xx) and refused for a full queue; prompt and
  completion tokens; `tokens_per_second` (completion tokens over the time spent
  generating); queue depth; with a drafter, drafted/accepted tokens and `acceptance_rate`.

Requests run one at a time on one generation thread, in arrival order; at most
`--max-queue` wait (more get 429). This module is only the command: the app is
`serving.app.build_app` (usable on an already-loaded model), the wire format `serving.protocol`,
the generation thread and metrics `serving.worker`. FastAPI is imported only when the
command runs, so the rest of the CLI works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from draftlm.errors import DraftlmError
from draftlm.options import LOAD_DEFAULTS, NO_DRAFTER, DraftOptions, LoadOptions, add_flags
from draftlm.serving import DEFAULT_MAX_BODY_BYTES
from draftlm.speculative.factory import load_with_drafter


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | None = None,
    max_queue: int = 64,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    shutdown_timeout_s: int = 30,
    load_options: LoadOptions = LOAD_DEFAULTS,
    draft_options: DraftOptions = NO_DRAFTER,
) -> None:
    """Load `model` (and a drafter when asked) and serve it until interrupted.

    On Ctrl-C uvicorn stops accepting connections, lets in-flight requests finish for up
    to `shutdown_timeout_s`, cancels the rest, then the worker thread stops."""
    try:
        import uvicorn

        from draftlm.serving.app import build_app
    except ModuleNotFoundError as err:
        raise DraftlmError(
            f"`draftlm serve` needs FastAPI and uvicorn ({err.name} is missing): "
            "pip install 'draftlm[serve]'"
        ) from err

    api_key = resolve_api_key(api_key, api_key_file)
    if not is_loopback(host) and api_key is None:
        print(f"draftlm serve: warning: listening on {host} without --api-key; anyone who "
              "can reach this port can use the model", file=sys.stderr)
    lm, drafter = load_with_drafter(model, load_options, draft_options)
    app = build_app(lm, drafter, api_key=api_key, max_queue=max_queue,
                    max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=shutdown_timeout_s)
    kind = " with speculative decoding" if drafter is not None else ""
    print(f"draftlm serve: {lm.name}{kind} on http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.Server(config).run()


def resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from --api-key, else --api-key-file, else $DRAFTLM_API_KEY, else None.

    A key on the command line is readable by every local user in /proc/PID/cmdline; a file
    (mode 600) or the environment (/proc/PID/environ is private to the user) is not."""
    if api_key is not None and api_key_file is not None:
        raise DraftlmError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise DraftlmError(f"cannot read --api-key-file {api_key_file}: {err}") from err
        if not api_key:
            raise DraftlmError(f"--api-key-file {api_key_file} is empty")
        return api_key
    return api_key or os.environ.get("DRAFTLM_API_KEY") or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model behind an OpenAI-compatible API")
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF folder")
    add_flags(p, LoadOptions, "load_options")
    add_flags(p, DraftOptions, "draft_options")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'; other local users "
                   "can read a key given here (in /proc): prefer --api-key-file or "
                   "$DRAFTLM_API_KEY")
    p.add_argument("--api-key-file", help="read the API key from this file (first line)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the model; more get 429")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for (the chat default too)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413")
    p.add_argument("--shutdown-timeout-s", type=int, default=30,
                   help="how long in-flight requests may run on after Ctrl-C")
    p.set_defaults(func=serve)
