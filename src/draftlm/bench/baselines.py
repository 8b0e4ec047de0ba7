"""Peers for `draftlm bench --peer`: HF transformers' plain and assisted greedy generation,
and llama.cpp's (llama-cpp-python), on the same models (read from the same GGUF files or
folders) and the same prompt tokens, so that their rows sit in the same table as ours.

Each peer runs in a child process (`run_isolated`): native code that crashes (llama.cpp's
repacked-weights path segfaults on some CPUs) loses only its own rows, reported as such,
never the rows already measured. draftlm itself never imports transformers or llama_cpp;
only these optional peers do.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from draftlm.bench.records import BenchConfig, BenchRow
from draftlm.errors import DraftlmError
from draftlm.formats.registry import REAL_MODELS, gguf_path


def hf_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(folder, from_pretrained kwargs) for a registry name, a .gguf file or a HF folder."""
    path = Path(name_or_path)
    if name_or_path in REAL_MODELS and not path.exists():
        path = gguf_path(name_or_path)
    if path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def run_hf_peer(
    model: str, drafts: Sequence[str], prompt_ids: Sequence[list[int]], max_new_tokens: int,
    dtype: torch.dtype, log: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """HF transformers' plain and assisted greedy generation on the same prompt tokens."""
    try:
        from transformers import AutoModelForCausalLM
    except ModuleNotFoundError as err:
        raise DraftlmError("--peer hf needs HF transformers: pip install 'draftlm[peer]'") from err

    def hf_load(source: str) -> Any:
        folder, kwargs = hf_source(source)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()

    target = hf_load(model)
    eos = target.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    jobs: list[tuple[BenchConfig, Any]] = [(BenchConfig("hf"), None)]
    jobs += [(BenchConfig("hf-assisted", d, adaptive=True), hf_load(d)) for d in drafts]
    rows = []
    for config, assistant in jobs:
        row = BenchRow(config)
        extra = {"assistant_model": assistant} if assistant is not None else {}
        for i, ids in enumerate([prompt_ids[0], *prompt_ids]):
            inputs = torch.tensor([ids])
            start = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(
                    inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                    max_new_tokens=4 if i == 0 else max_new_tokens, **extra,
                )
            if i == 0:
                continue  # warm-up
            row.elapsed_s += time.perf_counter() - start
            new = out[0, inputs.shape[1] :].tolist()
            if new and new[-1] in eos_ids:  # we count tokens before EOS: so does this row
                new.pop()
            row.num_new_tokens += len(new)
            row.num_prompts += 1
            row.outputs.append(new)
        rows.append(row)
        if log:
            log(f"{config.label}: {row.tokens_per_second:.2f} tok/s")
    return rows


def gguf_file_of(name_or_path: str) -> Path:
    """The GGUF file behind a registry name or a .gguf path (llama.cpp reads nothing else)."""
    folder, kwargs = hf_source(name_or_path)
    if "gguf_file" not in kwargs:
        raise DraftlmError(f"--peer llama.cpp needs a GGUF model; {name_or_path} is a folder")
    return Path(folder) / kwargs["gguf_file"]


def run_llama_cpp_peer(
    model: str, prompt_ids: Sequence[list[int]], max_new_tokens: int, threads: int,
    log: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """llama.cpp's greedy AR decoding (llama-cpp-python) of the same GGUF file, prompt
    tokens and thread count; its tokens/s counts prefill too, as ours does, and its time to
    the first token gives the decode-only rate."""
    try:
        from llama_cpp import Llama
    except ModuleNotFoundError as err:
        raise DraftlmError(
            "--peer llama.cpp needs llama-cpp-python (it compiles llama.cpp): "
            "pip install llama-cpp-python"
        ) from err
    longest = max(len(ids) for ids in prompt_ids) + max_new_tokens + 8
    llm = Llama(model_path=str(gguf_file_of(model)), n_ctx=longest, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    eos = llm.token_eos()
    row = BenchRow(BenchConfig("llama.cpp"), first_token_s=0.0)
    for i, ids in enumerate([prompt_ids[0], *prompt_ids]):
        limit = 4 if i == 0 else max_new_tokens
        new: list[int] = []
        start = time.perf_counter()
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
            if token == eos:
                break
            new.append(int(token))
            if len(new) == 1 and i > 0:
                row.first_token_s += time.perf_counter() - start
            if len(new) == limit:
                break
        if i == 0:
            continue  # warm-up
        row.elapsed_s += time.perf_counter() - start
        row.num_new_tokens += len(new)
        row.num_prompts += 1
        row.outputs.append(new)
    if log:
        log(f"llama.cpp: {row.tokens_per_second:.2f} tok/s")
    return [row]


def _peer_child(conn: Any, peer: Callable[..., list[BenchRow]], args: tuple) -> None:
    """The child's side of `run_isolated`: the rows, or the one-line error, down the pipe."""
    try:
        conn.send(("rows", peer(*args)))
    except DraftlmError as err:
        conn.send(("error", str(err)))
    finally:
        conn.close()


def run_isolated(peer: Callable[..., list[BenchRow]], args: tuple, kind: str,
                 log: Callable[[str], None] | None = None) -> list[BenchRow]:
    """`peer(*args)` in a fresh child process (spawned: no copy of the parent's models or
    threads). A user error in the child is raised here as the same `DraftlmError`; a crash
    (a signal, or an exit without a result) becomes one row of `kind` with its `error`."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_peer_child, args=(send, peer, args), daemon=True)
    child.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:  # the child died before sending anything
        status, payload = "crashed", None
    child.join()
    if status == "error":
        raise DraftlmError(payload)
    if status == "crashed":
        code = child.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        row = BenchRow(BenchConfig(kind), error=f"the {kind} peer crashed ({how}); the rows "
                                               "measured before it are kept")
        if log:
            log(f"{kind}: {row.error}")
        return [row]
    if log:
        for row in payload:
            log(f"{row.config.label}: {row.tokens_per_second:.2f} tok/s")
    return payload
