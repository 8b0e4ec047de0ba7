"""The one generation thread behind `draftlm serve`, its bounded queue, and its metrics.

The model and its KV cache hold per-sequence state and torch already uses every core for
one sequence, so requests run one at a time on a single thread, in arrival order. The
event loop only validates, enqueues and relays: a full queue is answered at once (429)
rather than letting latency grow without bound, and a request whose client has gone is
cancelled between two tokens so it stops holding the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from draftlm.errors import DraftlmError
from draftlm.generate import generate
from draftlm.load import LM
from draftlm.output import GenerationResult
from draftlm.serving.protocol import APIError

log = logging.getLogger("draftlm.serving.command")


class GenerationCancelled(Exception):
    """Raised from the text callback to stop a generation whose client has gone."""


@dataclass
class Job:
    """One request's generation, handed from the event loop to the worker thread.

    The worker reports back through `events` (always via the loop's thread-safe call):
    ("text", delta) while streaming, then exactly one of ("done", GenerationResult),
    ("error", APIError) or ("cancelled", None)."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Ask the worker to stop this job (or skip it if it has not started)."""
        self.cancelled.set()

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class Metrics:
    """Counters the worker updates and `/metrics` reads (under one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.counts: dict[str, float] = {
            "requests_total": 0,  # accepted into the queue
            "requests_completed_total": 0,
            "requests_cancelled_total": 0,  # client gone or server shutting down
            "requests_failed_total": 0,  # a server-side error (a bug)
            "requests_rejected_total": 0,  # answered 4xx before reaching the queue
            "requests_queue_full_total": 0,  # answered 429
            "prompt_tokens_total": 0,
            "completion_tokens_total": 0,
            "generation_seconds_total": 0.0,
            "queue_wait_seconds_total": 0.0,
            "draft_tokens_total": 0,
            "accepted_draft_tokens_total": 0,
        }
        self.last_tokens_per_second = 0.0

    def add(self, **increments: float) -> None:
        with self._lock:
            for key, value in increments.items():
                self.counts[key] += value

    def record_result(self, result: GenerationResult, queue_wait_s: float) -> None:
        drafted, accepted = speculative_counts(result.stats)
        with self._lock:
            c = self.counts
            c["requests_completed_total"] += 1
            c["prompt_tokens_total"] += result.num_prompt_tokens
            c["completion_tokens_total"] += result.num_new_tokens
            c["generation_seconds_total"] += result.elapsed_s
            c["queue_wait_seconds_total"] += queue_wait_s
            c["draft_tokens_total"] += drafted
            c["accepted_draft_tokens_total"] += accepted
            self.last_tokens_per_second = result.tokens_per_second

    def snapshot(self, queue_depth: int, in_flight: int, speculative: bool) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = dict(self.counts)
            last_tps = self.last_tokens_per_second
        busy_s = snap["generation_seconds_total"]
        snap["tokens_per_second"] = (
            round(snap["completion_tokens_total"] / busy_s, 3) if busy_s > 0 else 0.0
        )
        snap["last_request_tokens_per_second"] = round(last_tps, 3)
        snap["generation_seconds_total"] = round(busy_s, 4)
        snap["queue_wait_seconds_total"] = round(snap["queue_wait_seconds_total"], 4)
        snap["queue_depth"] = queue_depth
        snap["in_flight"] = in_flight
        snap["uptime_seconds"] = round(time.time() - self.started_at, 3)
        if speculative:
            drafted = snap["draft_tokens_total"]
            snap["acceptance_rate"] = (
                round(snap["accepted_draft_tokens_total"] / drafted, 4) if drafted else None
            )
        return snap


def speculative_counts(stats: dict[str, Any]) -> tuple[int, int]:
    """(drafted, accepted) tokens of one speculative run; (0, 0) for plain decoding."""
    return int(stats.get("num_drafted", 0)), int(stats.get("num_accepted", 0))


class GenerationWorker:
    """Runs queued jobs one at a time on a dedicated thread."""

    def __init__(
        self, lm: LM, drafter: Any = None, max_queue: int = 64,
        generate_fn: Callable[..., GenerationResult] = generate,
    ) -> None:
        if max_queue < 1:
            raise DraftlmError(f"max_queue must be >= 1, got {max_queue}")
        self.lm = lm
        self.drafter = drafter
        self.generate_fn = generate_fn
        self.metrics = Metrics()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()  # orders submit() against stop()
        self._stopping = False
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="draftlm-generate", daemon=True)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the model (those whose client left are dropped first)."""
        self._drop_cancelled()
        return self._queue.qsize()

    def _drop_cancelled(self) -> None:
        """Take the waiting jobs whose client hung up out of the queue, so they neither
        hold a place (a full queue of them answered 429 to everyone) nor show as waiting."""
        with self._queue.mutex:
            waiting = self._queue.queue
            gone = [job for job in waiting if job is not None and job.cancelled.is_set()]
            if not gone:
                return
            for job in gone:
                waiting.remove(job)
            self._queue.not_full.notify(len(gone))
        for job in gone:
            self._finish_cancelled(job, shutting_down=False)

    @property
    def in_flight(self) -> int:
        return int(self._current is not None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Enqueue `job`, or answer 429 (queue full) / 503 (shutting down) at once."""
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down", "server_error",
                               code="shutting_down")
            self._drop_cancelled()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.metrics.add(requests_queue_full_total=1)
                raise APIError(
                    429, f"the server is busy: {self._queue.maxsize} requests are already "
                    "waiting; retry shortly", "rate_limit_error", code="queue_full",
                    headers={"Retry-After": "1"},
                ) from None
        self.metrics.add(requests_total=1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, cancel waiting ones and the running one, join the thread."""
        with self._lock:
            self._stopping = True
        current = self._current
        if current is not None:
            current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finish_cancelled(job, shutting_down=True)
        if self._thread.is_alive():
            self._queue.put(None)  # room is certain: nothing can be added after _stopping
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set() or self._stopping:
                self._finish_cancelled(job, shutting_down=self._stopping)
                continue
            self._current = job
            try:
                self._run_job(job)
            finally:
                self._current = None

    def _run_job(self, job: Job) -> None:
        queue_wait_s = time.perf_counter() - job.enqueued_at

        def on_step() -> None:  # every step: also while a stop string holds text back
            if job.cancelled.is_set():
                raise GenerationCancelled

        def on_text(delta: str) -> None:
            on_step()
            if job.stream:
                job.emit("text", delta)

        try:
            result = self.generate_fn(
                self.lm, job.prompt_ids, max_new_tokens=job.max_new_tokens,
                temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, seed=job.seed,
                stop=job.stop, drafter=self.drafter, on_text=on_text, on_step=on_step,
            )
        except GenerationCancelled:
            self._finish_cancelled(job, shutting_down=self._stopping)
            return
        except DraftlmError as err:  # validated before queueing; a drafter may still refuse
            self.metrics.add(requests_failed_total=1)
            job.emit("error", APIError(400, str(err)))
            return
        except Exception:
            log.exception("generation failed")
            self.metrics.add(requests_failed_total=1)
            job.emit("error", APIError(500, "generation failed on the server; see its log",
                                       "server_error", code="internal_error"))
            return
        self.metrics.record_result(result, queue_wait_s)
        job.emit("done", result)

    def _finish_cancelled(self, job: Job, shutting_down: bool) -> None:
        self.metrics.add(requests_cancelled_total=1)
        if shutting_down:
            job.emit("error", APIError(503, "the server is shutting down", "server_error",
                                       code="shutting_down"))
        else:
            job.emit("cancelled", None)
