"""Load test for a running `draftlm serve` (or any OpenAI-compatible server).

    draftlm serve --model qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b &
    python benchmarks/serve_load.py --clients 16 --requests-per-client 10 --max-tokens 64

Each client is a thread with its own official `openai` client sending its requests one
after another; all clients start together. Prints requests, failures, p50/p95 latency
(and time to first token when streaming), aggregate tokens/s, and the server's own
`/metrics` (tokens/s while generating, acceptance rate when speculative).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

# Short code prompts, in the spirit of HumanEval (used when no --prompts-file is given).
DEFAULT_PROMPTS = [
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    'def is_palindrome(s: str) -> bool:\n    """True when s reads the same backwards."""\n',
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n",
    'def word_count(text: str) -> dict[str, int]:\n    """Count each word in text."""\n',
    "class Stack:\n    def __init__(self):\n",
    "def binary_search(items: list[int], target: int) -> int:\n",
    'def flatten(nested: list) -> list:\n    """Flatten arbitrarily nested lists."""\n',
    "def parse_csv_line(line: str) -> list[str]:\n",
]


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    first_token_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(
    client: openai.OpenAI, model: str, prompt: str, args: argparse.Namespace
) -> Outcome:
    start = time.perf_counter()
    common = dict(model=model, max_tokens=args.max_tokens, temperature=args.temperature)
    try:
        if args.stream:
            first, tokens = None, 0
            if args.chat:
                chunks = client.chat.completions.create(
                    messages=[{"role": "user", "content": prompt}], stream=True,
                    stream_options={"include_usage": True}, **common)
            else:
                chunks = client.completions.create(
                    prompt=prompt, stream=True, stream_options={"include_usage": True}, **common)
            for chunk in chunks:
                if first is None and chunk.choices and _text_of(chunk.choices[0]):
                    first = time.perf_counter() - start  # the first text, not the role chunk
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return Outcome(True, time.perf_counter() - start, first, tokens)
        if args.chat:
            out = client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **common)
        else:
            out = client.completions.create(prompt=prompt, **common)
        return Outcome(True, time.perf_counter() - start, None, out.usage.completion_tokens)
    except openai.OpenAIError as err:
        return Outcome(False, time.perf_counter() - start, error=f"{type(err).__name__}: {err}")


def _text_of(choice) -> str:
    delta = getattr(choice, "delta", None)
    return (delta.content or "") if delta is not None else (choice.text or "")


def run(args: argparse.Namespace) -> dict:
    prompts = DEFAULT_PROMPTS
    if args.prompts_file:
        prompts = [p for p in Path(args.prompts_file).read_text().split("\n\n") if p.strip()]
    probe = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0)
    model = args.model or probe.models.list().data[0].id
    for _ in range(args.warmup):  # untimed: first-touch of the weights, a --compile'd step
        warm = one_request(probe.with_options(timeout=args.timeout_s), model, prompts[0], args)
        if not warm.ok:
            raise SystemExit(f"serve_load: the warm-up request failed: {warm.error}")
    start_barrier = threading.Barrier(args.clients)

    def client_session(index: int) -> list[Outcome]:
        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none",
                               max_retries=0, timeout=args.timeout_s)
        start_barrier.wait()
        return [one_request(client, model, prompts[(index + j) % len(prompts)], args)
                for j in range(args.requests_per_client)]

    wall_start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        outcomes = [o for os_ in pool.map(client_session, range(args.clients)) for o in os_]
    wall_s = time.perf_counter() - wall_start

    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency_s for o in ok]
    firsts = [o.first_token_s for o in ok if o.first_token_s is not None]
    tokens = sum(o.completion_tokens for o in ok)
    report = {
        "model": model, "clients": args.clients, "requests": len(outcomes),
        "failures": len(outcomes) - len(ok), "wall_s": round(wall_s, 2),
        "latency_p50_s": _round(percentile(latencies, 0.5)),
        "latency_p95_s": _round(percentile(latencies, 0.95)),
        "latency_mean_s": _round(statistics.fmean(latencies) if latencies else None),
        "completion_tokens": tokens, "tokens_per_second": round(tokens / wall_s, 2),
        "requests_per_second": round(len(ok) / wall_s, 3),
        "max_tokens": args.max_tokens, "stream": args.stream, "chat": args.chat,
    }
    if firsts:
        report["first_token_p50_s"] = _round(percentile(firsts, 0.5))
        report["first_token_p95_s"] = _round(percentile(firsts, 0.95))
    errors = sorted({o.error for o in outcomes if o.error})
    if errors:
        report["errors"] = errors[:5]
    root = args.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        server = httpx.get(f"{root}/metrics", headers=headers, timeout=10).json()
        report["server"] = {k: server.get(k) for k in (
            "tokens_per_second", "acceptance_rate", "requests_completed_total",
            "requests_cancelled_total", "requests_queue_full_total") if k in server}
    except (httpx.HTTPError, json.JSONDecodeError):
        pass  # not a draftlm server: the client-side figures stand alone
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="Bearer key, when the server was started with one")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--stream", action="store_true", help="stream, and time the first token")
    p.add_argument("--prompts-file", help="prompts separated by blank lines")
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed requests before the clients start (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:22s} {value}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
