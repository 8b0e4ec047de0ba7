"""`draftlm serve` through the official OpenAI client against a live loopback server.

A tiny random model answers; every greedy (or seeded) output is checked against
`draftlm.generate.generate` on the same prompt, so the server adds transport and nothing
else. Timing-sensitive cases (queue full, disconnect, shutdown) hold the worker with a
gated or slowed `generate` instead of relying on how fast the model happens to be.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the dev extra (openai client) is not installed")
httpx = pytest.importorskip("httpx", reason="the dev extra (httpx) is not installed")

import uvicorn  # noqa: E402
from helpers import make_tiny_lm  # noqa: E402

from draftlm.cli import build_parser  # noqa: E402
from draftlm.generate import generate  # noqa: E402
from draftlm.load import LM  # noqa: E402
from draftlm.options import gather_options  # noqa: E402
from draftlm.serving.app import build_app  # noqa: E402
from draftlm.serving.command import serve  # noqa: E402
from draftlm.serving.worker import GenerationWorker  # noqa: E402
from draftlm.speculative import build_drafter  # noqa: E402

API_KEY = "sk-test-key"
MAX_TOKENS_LIMIT = 64
MAX_BODY_BYTES = 16 * 1024


def endless_lm() -> LM:
    """A tiny model that never emits EOS, so every output runs to max_tokens."""
    lm = make_tiny_lm(seed=0, eos_ids=())
    lm.tokenizer.eos_ids = ()
    return lm


class LiveServer:
    """uvicorn serving `app` on a free loopback port from a background thread."""

    def __init__(self, app, graceful_timeout_s: int = 5) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning",
                                timeout_graceful_shutdown=graceful_timeout_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=60, **kwargs)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def headers(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def lm() -> LM:
    return endless_lm()


@pytest.fixture(scope="module")
def live(lm) -> Iterator[LiveServer]:
    app = build_app(lm, api_key=API_KEY, max_tokens_limit=MAX_TOKENS_LIMIT,
                    max_body_bytes=MAX_BODY_BYTES)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return live.client()


# ---- happy paths ---------------------------------------------------------------------------
def test_models_and_health(live, client, lm) -> None:
    assert [m.id for m in client.models.list().data] == [lm.name]
    assert client.models.retrieve(lm.name).id == lm.name
    health = httpx.get(f"{live.url}/health").json()  # no key needed for liveness probes
    assert health["status"] == "ok" and health["model"] == lm.name
    head = httpx.head(f"{live.url}/health")  # load balancers probe with HEAD (it was 405)
    assert head.status_code == 200 and head.content == b""


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    """A key given on the command line shows in /proc/PID/cmdline to every local user; a
    file or $DRAFTLM_API_KEY keeps it private."""
    from draftlm.errors import DraftlmError
    from draftlm.serving.command import resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    monkeypatch.setenv("DRAFTLM_API_KEY", "from-env")
    assert resolve_api_key(None, str(key_file)) == "s3cret"
    assert resolve_api_key(None, None) == "from-env"
    assert resolve_api_key("flag", None) == "flag"
    monkeypatch.delenv("DRAFTLM_API_KEY")
    assert resolve_api_key(None, None) is None
    (tmp_path / "empty").write_text("\n")
    for args, message in (((None, str(tmp_path / "empty")), "is empty"),
                          ((None, str(tmp_path / "absent")), "cannot read"),
                          (("flag", str(key_file)), "not both")):
        with pytest.raises(DraftlmError, match=message):
            resolve_api_key(*args)


def test_completion_equals_generate(client, lm) -> None:
    prompt = "def add(a, b):"
    out = client.completions.create(model=lm.name, prompt=prompt, max_tokens=12, temperature=0)
    expected = generate(lm, prompt, max_new_tokens=12)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == "length"
    assert out.object == "text_completion" and out.model == lm.name
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_completion_accepts_token_ids(client, lm) -> None:
    ids = lm.tokenizer.encode("hello")
    out = client.completions.create(model=lm.name, prompt=ids, max_tokens=5, temperature=0)
    assert out.choices[0].text == generate(lm, ids, max_new_tokens=5).text


def test_chat_equals_generate_with_the_template(client, lm) -> None:
    out = client.chat.completions.create(
        model=lm.name, messages=[{"role": "user", "content": "hi there"}], max_tokens=10,
        temperature=0,
    )
    expected = generate(lm, "hi there", max_new_tokens=10, chat=True)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == expected.num_prompt_tokens
    assert out.usage.completion_tokens == 10

    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "why?"}]}]
    out = client.chat.completions.create(model=lm.name, messages=messages, max_tokens=6,
                                         temperature=0)
    rendered = "<system>be brief\n<user>why?\n<assistant>"
    ids = lm.tokenizer.encode(rendered, add_bos=False)
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == generate(lm, ids, max_new_tokens=6).text


def test_streaming_equals_the_full_response(client, lm) -> None:
    prompt = "stream me"
    chunks = list(client.completions.create(
        model=lm.name, prompt=prompt, max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == generate(lm, prompt, max_new_tokens=15).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15  # the include_usage chunk
    assert len({c.id for c in chunks}) == 1

    chunks = list(client.chat.completions.create(
        model=lm.name, messages=[{"role": "user", "content": prompt}], max_tokens=15,
        temperature=0, stream=True,
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == generate(lm, prompt, max_new_tokens=15, chat=True).text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None  # not asked for


def test_sse_wire_format_ends_with_done(live, lm) -> None:
    body = {"model": lm.name, "prompt": "x", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, headers=headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_like_generate(client, lm, stream) -> None:
    prompt = "once upon"
    full = generate(lm, prompt, max_new_tokens=30).text
    stop = full[10:12]
    assert stop and full.index(stop) < 30
    expected = generate(lm, prompt, max_new_tokens=30, stop=[stop, "never-seen"])
    assert expected.finish_reason == "stop" and expected.text == full[: full.index(stop)]
    out = client.completions.create(model=lm.name, prompt=prompt, max_tokens=30, temperature=0,
                                    stop=[stop, "never-seen"], stream=stream)
    if stream:
        chunks = list(out)
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = out.choices[0].text, out.choices[0].finish_reason
    assert (text, finish) == (expected.text, "stop")
    out = client.completions.create(model=lm.name, prompt=prompt, max_tokens=30, temperature=0,
                                    stop=stop)  # a single string works too
    assert out.choices[0].text == expected.text


def test_seeded_sampling_equals_generate(client, lm) -> None:
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=1234)
    expected = generate(lm, "abc", **kwargs).text
    outs = [client.completions.create(model=lm.name, prompt="abc", max_tokens=12,
                                      temperature=0.9, top_p=0.8, seed=1234).choices[0].text
            for _ in range(2)]
    assert outs == [expected, expected]
    other = client.completions.create(model=lm.name, prompt="abc", max_tokens=12,
                                      temperature=0.9, top_p=0.8, seed=99).choices[0].text
    assert other != expected


def test_metrics_json_and_prometheus(live, client, lm) -> None:
    before = httpx.get(f"{live.url}/metrics", headers=headers()).json()
    client.completions.create(model=lm.name, prompt="count me", max_tokens=7, temperature=0)
    after = httpx.get(f"{live.url}/metrics", headers=headers()).json()
    assert after["requests_completed_total"] == before["requests_completed_total"] + 1
    assert after["completion_tokens_total"] == before["completion_tokens_total"] + 7
    assert after["prompt_tokens_total"] == before["prompt_tokens_total"] + len("count me")
    assert after["tokens_per_second"] > 0 and after["speculative"] is False
    assert "acceptance_rate" not in after
    text = httpx.get(f"{live.url}/metrics?format=prometheus", headers=headers()).text
    assert f"draftlm_completion_tokens_total {after['completion_tokens_total']}" in text
    assert "# TYPE draftlm_tokens_per_second gauge" in text


# ---- errors: OpenAI's JSON shape, a 4xx status, never a 500 --------------------------------
def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def post(live, path: str, body: dict | None = None, key: str | None = API_KEY,
         timeout_s: float = 30) -> httpx.Response:
    hdrs = headers(key) if key is not None else {}
    return httpx.post(f"{live.url}{path}", json=body, headers=hdrs, timeout=timeout_s)


def test_bad_parameters_are_400(live, client, lm) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=lm.name, prompt="x", max_tokens=4, n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=lm.name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=MAX_TOKENS_LIMIT + 1)
    assert err.value.body["param"] == "max_tokens"
    error = error_of(post(live, "/v1/completions", {"prompt": "a" * 300, "max_tokens": 4}), 400)
    assert error["code"] == "context_length_exceeded" and "256" in error["message"]
    error = error_of(post(live, "/v1/completions", {"prompt": "a", "presence_penalty": 1}), 400)
    assert error["param"] == "presence_penalty"
    error_of(post(live, "/v1/completions", {"prompt": ["a", "b"]}), 400)
    error_of(post(live, "/v1/completions", {"prompt": [1, 999]}), 400)
    error_of(post(live, "/v1/completions", {"prompt": ""}), 400)
    error_of(post(live, "/metrics?format=xml"), 405)  # GET only
    assert error_of(post(live, "/v1/completions", {"model": "gpt-4", "prompt": "a"}),
                    404)["code"] == "model_not_found"
    nothing = httpx.get(f"{live.url}/v1/nothing", headers=headers())
    assert error_of(nothing, 404)["code"] == "not_found"


def test_odd_bodies_never_get_a_500(live) -> None:
    surrogate = '{"prompt": "a\\ud800b", "max_tokens": 2}'  # valid JSON, not valid Unicode
    raw = httpx.post(f"{live.url}/v1/completions", content=surrogate.encode(),
                     headers={**headers(), "Content-Type": "application/json"})
    assert error_of(raw, 400)["param"] == "prompt"
    odd = [None, [], "text", {}, {"prompt": None}, {"prompt": [[1, 2]]}, {"prompt": [-1]},
           {"prompt": "x", "n": None}, {"prompt": "x", "temperature": None},
           {"prompt": "x", "stop": ["a"] * 17}, {"prompt": "x", "seed": 2**64},
           {"prompt": "x", "top_k": 0}, {"prompt": "x", "best_of": 3}]
    for body in odd:
        response = post(live, "/v1/completions", body)
        assert 400 <= response.status_code < 500, (body, response.text)
        error_of(response, response.status_code)
    chat_odd = [{"messages": []}, {"messages": [{"content": "x"}]},
                {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "f"}]}]
    for body in chat_odd:
        response = post(live, "/v1/chat/completions", body)
        assert 400 <= response.status_code < 500, (body, response.text)
    surrogate = '{"messages": [{"role": "user", "content": "\\udfff"}]}'
    raw = httpx.post(f"{live.url}/v1/chat/completions", content=surrogate.encode(),
                     headers={**headers(), "Content-Type": "application/json"})
    assert error_of(raw, 400)["param"] == "messages"


def test_schema_errors_are_400_as_openai_answers(live, client) -> None:
    """Invalid parameters get 400 invalid_request_error (FastAPI's default is 422, which the
    openai client raises as UnprocessableEntityError instead of BadRequestError)."""
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="x", temperature=5)
    error = error_of(post(live, "/v1/chat/completions", {"max_tokens": 3}), 400)
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    error = error_of(post(live, "/v1/completions", {"prompt": 123}), 400)
    assert error["param"] == "prompt"  # not pydantic's union tag "prompt.str"
    error = error_of(post(live, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
    assert error["param"] == "messages.0.content"
    error_of(post(live, "/v1/chat/completions",
                  {"messages": [{"role": "wizard", "content": "x"}]}), 400)
    error_of(post(live, "/v1/completions", {"prompt": "x", "max_tokens": 0}), 400)
    # Values a lax schema coerced: a boolean is not a number of tokens, nor token ids.
    for body, param in (({"prompt": "x", "max_tokens": True}, "max_tokens"),
                        ({"prompt": [True, False]}, "prompt"),
                        ({"prompt": "x", "model": ""}, "model"),
                        ({"prompt": "x", "max_tokens": "16"}, "max_tokens")):
        assert error_of(post(live, "/v1/completions", body), 400)["param"] == param, body
    bad_json = httpx.post(f"{live.url}/v1/completions", content=b"{not json",
                          headers={**headers(), "Content-Type": "application/json"})
    error_of(bad_json, 400)


def test_a_template_that_cannot_render_the_messages_is_400() -> None:
    lm = endless_lm()
    lm.tokenizer.chat_template = "{{ messages[1].content.upper() }}"  # needs two messages
    with LiveServer(build_app(lm)) as server:
        body = {"messages": [{"role": "user", "content": "only one"}]}
        assert error_of(post(server, "/v1/chat/completions", body), 400)["param"] == "messages"
        body["messages"].append({"role": "user", "content": "two"})
        out = post(server, "/v1/chat/completions", {**body, "max_tokens": 2})
        assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == 3


def test_oversized_body_is_413(live, client) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="m", prompt="x" * (MAX_BODY_BYTES + 1))
    assert err.value.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    response = httpx.post(f"{live.url}/v1/completions", content=chunked(), headers=headers())
    assert error_of(response, 413)["code"] == "request_too_large"


def test_api_key(live, lm) -> None:
    for key in (None, "sk-wrong", API_KEY[:-1]):
        response = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2}, key=key)
        assert error_of(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    # The key is checked before the body is read: no parsing or buffering for strangers.
    garbage = httpx.post(f"{live.url}/v1/completions", content=b"{not json" * 10_000)
    assert error_of(garbage, 401)["code"] == "invalid_api_key"
    assert garbage.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="sk-wrong").models.list()
    ok = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_no_key_needed_when_none_is_set(lm) -> None:
    with LiveServer(build_app(lm)) as server:
        out = server.client(api_key="anything").completions.create(
            model=lm.name, prompt="x", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3


# ---- the queue, disconnects, shutdown ------------------------------------------------------
def gated_generate(gate: threading.Event) -> Callable:
    def run(*args, **kwargs):
        assert gate.wait(30), "test gate never opened"
        return generate(*args, **kwargs)
    return run


def slow_generate(delay_s: float) -> Callable:
    """generate with a pause per streamed delta: a long generation on a tiny model."""
    def run(*args, on_text, **kwargs):
        def slow(delta: str) -> None:
            time.sleep(delay_s)
            on_text(delta)
        return generate(*args, on_text=slow, **kwargs)
    return run


def test_full_queue_is_429_and_waiting_requests_still_finish(lm) -> None:
    gate = threading.Event()
    worker = GenerationWorker(lm, max_queue=1, generate_fn=gated_generate(gate))
    with LiveServer(build_app(lm, worker=worker)) as server, ThreadPoolExecutor(2) as pool:
        body = {"prompt": "q", "max_tokens": 3, "temperature": 0}
        first = pool.submit(post, server, "/v1/completions", body)  # runs (held by the gate)
        wait_until(lambda: worker.in_flight == 1)
        second = pool.submit(post, server, "/v1/completions", body)  # waits in the queue
        wait_until(lambda: worker.queue_depth == 1)
        response = post(server, "/v1/completions", body)
        assert error_of(response, 429)["code"] == "queue_full"
        assert response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            server.client().completions.create(model=lm.name, prompt="q", max_tokens=3)
        gate.set()
        expected = generate(lm, "q", max_new_tokens=3).text
        assert [f.result().json()["choices"][0]["text"] for f in (first, second)] == [expected] * 2
        assert worker.metrics.counts["requests_queue_full_total"] == 2


def test_waiting_clients_that_hang_up_free_their_places(lm) -> None:
    """Queued requests whose clients disconnect leave the queue: with --max-queue 2 and
    both places taken by clients that hung up, the next request is queued, not 429."""
    gate = threading.Event()
    worker = GenerationWorker(lm, max_queue=2, generate_fn=gated_generate(gate))
    with LiveServer(build_app(lm, worker=worker)) as server, ThreadPoolExecutor(2) as pool:
        body = {"prompt": "q", "max_tokens": 3, "temperature": 0}
        first = pool.submit(post, server, "/v1/completions", body)  # runs (held by the gate)
        wait_until(lambda: worker.in_flight == 1)
        for _ in range(2):  # queued, then gone
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/completions", json=body, headers=headers(),
                           timeout=httpx.Timeout(5.0, read=0.5))
        wait_until(lambda: worker.queue_depth == 0)
        assert worker.metrics.counts["requests_cancelled_total"] == 2
        third = pool.submit(post, server, "/v1/completions", body)
        wait_until(lambda: worker.queue_depth == 1)
        gate.set()
        expected = generate(lm, "q", max_new_tokens=3).text
        assert [f.result().json()["choices"][0]["text"] for f in (first, third)] == [expected] * 2
        assert worker.metrics.counts["requests_queue_full_total"] == 0


def test_disconnect_mid_stream_frees_the_model(lm) -> None:
    worker = GenerationWorker(lm, generate_fn=slow_generate(0.02))
    with LiveServer(build_app(lm, worker=worker, max_tokens_limit=200)) as server:
        body = {"prompt": "long", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]  # a few tokens, then hang up
        assert got[0].startswith("data: ")
        wait_until(lambda: worker.metrics.counts["requests_cancelled_total"] == 1)
        wait_until(lambda: worker.in_flight == 0, timeout_s=2)
        out = server.client().completions.create(model=lm.name, prompt="next", max_tokens=5,
                                                 temperature=0)
        assert out.choices[0].text == generate(lm, "next", max_new_tokens=5).text
        assert worker.metrics.counts["requests_completed_total"] == 1  # not the abandoned one


def test_disconnect_while_waiting_cancels_a_non_streamed_request(lm) -> None:
    worker = GenerationWorker(lm, generate_fn=slow_generate(0.02))
    with LiveServer(build_app(lm, worker=worker, max_tokens_limit=200)) as server:
        body = {"prompt": "long", "max_tokens": 200, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", body, timeout_s=0.5)
        wait_until(lambda: worker.metrics.counts["requests_cancelled_total"] == 1)
        assert worker.metrics.counts["requests_completed_total"] == 0


def test_shutdown_lets_in_flight_requests_finish(lm) -> None:
    worker = GenerationWorker(lm, generate_fn=slow_generate(0.01))
    server = LiveServer(build_app(lm, worker=worker)).start()
    body = {"prompt": "bye", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        events = [next(lines)]
        server.server.should_exit = True  # Ctrl-C while the stream is running
        events += [line for line in lines if line]
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1] if e)
    assert events[-1] == "data: [DONE]"
    assert text == generate(lm, "bye", max_new_tokens=40).text
    server.stop()
    assert not server.thread.is_alive() and not worker.alive


def test_shutdown_cancels_what_outlives_the_grace_period(lm) -> None:
    worker = GenerationWorker(lm, generate_fn=slow_generate(0.05))
    app = build_app(lm, worker=worker, max_tokens_limit=200)
    server = LiveServer(app, graceful_timeout_s=1).start()
    body = {"prompt": "slow", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would hang up the client
        next(lines)
        start = time.monotonic()
        server.stop()
        assert 1 <= time.monotonic() - start < 8  # the grace period, not 200 x 50 ms
        with pytest.raises(httpx.RemoteProtocolError):  # the server cut the stream
            list(lines)
    assert not server.thread.is_alive() and not worker.alive
    assert worker.metrics.counts["requests_cancelled_total"] == 1
    assert worker.metrics.counts["requests_completed_total"] == 0


def test_a_stopped_worker_answers_503_not_a_hang(lm) -> None:
    worker = GenerationWorker(lm)
    with LiveServer(build_app(lm, worker=worker)) as server:
        worker.stop()
        assert httpx.get(f"{server.url}/health").status_code == 503
        body = {"prompt": "x", "max_tokens": 2}
        assert error_of(post(server, "/v1/completions", body), 503)["code"] == "shutting_down"


# ---- load ----------------------------------------------------------------------------------
def test_load_16_clients_x_10_requests_equal_generate(live, lm) -> None:
    prompts = [f"prompt number {i}: " for i in range(16)]
    expected = {p: generate(lm, p, max_new_tokens=8).text for p in prompts}
    expected_chat = {p: generate(lm, p, max_new_tokens=8, chat=True).text for p in prompts}

    def client_session(index: int) -> list[bool]:
        client, prompt, results = live.client(), prompts[index], []
        for j in range(10):
            kind = (index + j) % 4
            if kind == 0:
                out = client.completions.create(model=lm.name, prompt=prompt, max_tokens=8,
                                                 temperature=0)
                results.append(out.choices[0].text == expected[prompt])
            elif kind == 1:
                out = client.chat.completions.create(
                    model=lm.name, messages=[{"role": "user", "content": prompt}],
                    max_tokens=8, temperature=0)
                results.append(out.choices[0].message.content == expected_chat[prompt])
            elif kind == 2:
                chunks = client.completions.create(model=lm.name, prompt=prompt, max_tokens=8,
                                                   temperature=0, stream=True)
                results.append("".join(c.choices[0].text for c in chunks) == expected[prompt])
            else:
                chunks = client.chat.completions.create(
                    model=lm.name, messages=[{"role": "user", "content": prompt}],
                    max_tokens=8, temperature=0, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in chunks)
                results.append(text == expected_chat[prompt])
        return results

    with ThreadPoolExecutor(16) as pool:
        outcomes = [r for rs in pool.map(client_session, range(16)) for r in rs]
    assert len(outcomes) == 160 and all(outcomes)


def test_load_script_counts_what_the_server_did(live) -> None:
    path = Path(__file__).parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    serve_load = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = serve_load  # its dataclass looks itself up there
    spec.loader.exec_module(serve_load)
    before = httpx.get(f"{live.url}/metrics", headers=headers()).json()
    for stream in ([], ["--stream", "--chat"]):
        report = serve_load.run(serve_load.parse_args([
            "--base-url", f"{live.url}/v1", "--api-key", API_KEY, "--clients", "3",
            "--requests-per-client", "2", "--max-tokens", "5", *stream]))
        assert (report["requests"], report["failures"]) == (6, 0)
        assert report["completion_tokens"] == 30
        assert 0 < report["latency_p50_s"] <= report["latency_p95_s"]
    assert report["first_token_p50_s"] <= report["latency_p50_s"]
    after = report["server"]["requests_completed_total"]
    assert after == before["requests_completed_total"] + 12 + 2  # + one warm-up per run


# ---- speculative decoding and the CLI ------------------------------------------------------
def test_speculative_server_equals_generate_and_reports_acceptance(lm) -> None:
    drafter = build_drafter(lm, ngram=2, num_draft_tokens=4)
    prompts = ["abcabcabcabc abcabc", "the cat the cat the cat", "xyz"]
    with LiveServer(build_app(lm, drafter)) as server:
        client = server.client()
        for prompt in prompts:
            out = client.completions.create(model=lm.name, prompt=prompt, max_tokens=20,
                                            temperature=0)
            assert out.choices[0].text == generate(lm, prompt, max_new_tokens=20).text
            chunks = client.chat.completions.create(
                model=lm.name, messages=[{"role": "user", "content": prompt}], max_tokens=20,
                temperature=0, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert text == generate(lm, prompt, max_new_tokens=20, chat=True).text
        metrics = httpx.get(f"{server.url}/metrics").json()
    # The same prompts through generate() with the drafter give the server's counts.
    drafted = accepted = 0
    for prompt, chat in [(p, c) for p in prompts for c in (False, True)]:
        stats = generate(lm, prompt, max_new_tokens=20, chat=chat,
                         drafter=build_drafter(lm, ngram=2, num_draft_tokens=4)
                         ).stats
        drafted, accepted = drafted + stats["num_drafted"], accepted + stats["num_accepted"]
    assert metrics["speculative"] is True
    assert (metrics["draft_tokens_total"], metrics["accepted_draft_tokens_total"]) == (
        drafted, accepted)
    assert drafted > 0
    assert metrics["acceptance_rate"] == round(accepted / drafted, 4)


def test_cli_flags_are_the_serve_arguments() -> None:
    args = gather_options(vars(build_parser().parse_args(
        ["serve", "--model", "m", "--ngram", "3", "--port", "9000", "--api-key", "k",
         "--max-queue", "4", "--max-tokens-limit", "32", "--dtype", "float32"])))
    assert args.pop("func") is serve
    args.pop("command")
    bound = inspect.signature(serve).bind(**args)
    assert bound.arguments["host"] == "127.0.0.1"  # loopback unless told otherwise
    assert (bound.arguments["draft_options"].ngram, bound.arguments["max_queue"]) == (3, 4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--draft", "d", "--ngram", "2"])


@pytest.mark.slow
def test_the_serve_command_end_to_end(tmp_path) -> None:
    """`draftlm serve` as a user starts it: loads a folder, serves, stops on Ctrl-C."""
    from draftlm.formats.hf import save_hf_folder

    lm = make_tiny_lm(seed=3)
    folder = tmp_path / "tiny-model"
    save_hf_folder(folder, lm.config, lm.model, lm.tokenizer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "draftlm.cli", "serve", "--model", str(folder),
               "--port", str(port), "--api-key", API_KEY, "--dtype", "float32",
               "--ngram", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert process.poll() is None, process.communicate()[1]
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout_s=120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="hello", max_tokens=8,
                                        temperature=0)
        assert out.choices[0].text == generate(lm, "hello", max_new_tokens=8).text
        metrics = httpx.get(f"{url}/metrics", headers=headers()).json()
        assert metrics["speculative"] is True
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert "Application shutdown complete" in stderr
