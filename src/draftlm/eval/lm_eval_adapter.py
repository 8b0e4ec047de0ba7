"""draftlm as an lm-evaluation-harness model: `--model draftlm --model_args model=NAME`.

lm-eval finds models in its registry, which holds only its own models until someone
imports and registers another: it reads no plugin entry points. So draftlm runs the
harness through a thin launcher that registers first and then hands the command line to
lm-eval's own CLI unchanged:

    draftlm eval lm-eval --model draftlm --model_args model=smollm2-135m --tasks arc_easy
    python -m draftlm.eval.lm_eval_adapter --model draftlm --model_args model=... --tasks ...

From Python, `register()` then `lm_eval.simple_evaluate(model="draftlm", ...)`, or pass a
`DraftlmLM(lm=...)` instance as `model`.

Model args: model (registry name, .gguf or HF folder), dtype, device, batch_size,
max_length (tokens per forward pass; default the model's context, at most 4096),
max_gen_toks, add_bos_token (default: what the model's tokenizer does), draft (a draft
model: generate_until then uses speculative decoding, which gives the same greedy text).

lm-eval is imported only when the adapter is used, so `draftlm` starts without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from draftlm.errors import DraftlmError
from draftlm.eval import eval_subparsers
from draftlm.eval.perplexity import context_prefix
from draftlm.generate import generate
from draftlm.load import load
from draftlm.options import DraftOptions, LoadOptions
from draftlm.speculative.factory import drafter_from_options

MODEL_NAME = "draftlm"
DEFAULT_MAX_LENGTH = 4096


def _import_lm_eval() -> Any:
    try:
        import lm_eval.api.model
    except ModuleNotFoundError as err:
        raise DraftlmError("lm-evaluation-harness is not installed: pip install "
                           "'draftlm[eval]' (or pip install lm-eval)") from err
    return lm_eval.api.model


@cache
def adapter_class() -> type:
    """Define the adapter class; deferred so that lm-eval is imported only when needed."""
    template_lm = _import_lm_eval().TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


    class DraftlmLM(template_lm):
        """Scores with one full causal pass per batch of right-padded sequences: padding
        after a sequence cannot change its logits under a causal mask, so no attention
        mask is needed."""

        def __init__(
            self,
            model: str | None = None,
            lm: Any = None,
            dtype: str = "float32",
            device: str | None = None,
            batch_size: int | str = 1,
            max_batch_size: int | None = None,
            max_length: int | None = None,
            max_gen_toks: int = 256,
            add_bos_token: bool | None = None,
            draft: str | None = None,
        ) -> None:
            super().__init__()
            if (model is None) == (lm is None):
                raise DraftlmError("pass exactly one of model=NAME (model_args) or lm=LM")
            load_options = LoadOptions(dtype=dtype, device=_resolve_device(device))
            draft_options = DraftOptions(draft=draft)  # checked before anything loads
            if lm is None:
                lm = load(model, dtype=load_options.dtype, device=load_options.device)
            self.lm = lm
            self.batch_size = _batch_size(batch_size)
            self.max_length = int(max_length or min(lm.config.max_seq_len, DEFAULT_MAX_LENGTH))
            if self.max_length > lm.config.max_seq_len:
                raise DraftlmError(f"max_length {self.max_length} exceeds the model's context "
                                   f"{lm.config.max_seq_len}")
            self.max_gen_toks = int(max_gen_toks)
            self.add_bos = lm.tokenizer.add_bos if add_bos_token is None else bool(add_bos_token)
            self.drafter = drafter_from_options(lm, draft_options, load_options)

        @property
        def eot_token_id(self) -> int:
            eos = (*self.lm.tokenizer.eos_ids, *self.lm.config.eos_ids)
            return eos[0] if eos else context_prefix(self.lm)

        @property
        def prefix_token_id(self) -> int:
            return context_prefix(self.lm)

        @property
        def tokenizer_name(self) -> str:
            return f"{self.lm.name}-{self.lm.tokenizer.fingerprint[:16]}".replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.lm.tokenizer.chat_template if chat_template else None

        def apply_chat_template(self, chat_history: list[dict[str, str]],
                                add_generation_prompt: bool = True) -> str:
            """For `--apply_chat_template`: the model's own template (draftlm's renderer)."""
            return self.lm.tokenizer.apply_chat_template(
                chat_history, add_generation_prompt=add_generation_prompt)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       **kwargs: Any) -> list[int]:
            add = self.add_bos if add_special_tokens is None else add_special_tokens
            return self.lm.tokenizer.encode(string, add_bos=add)

        def _loglikelihood_tokens(
            self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
            **kwargs: Any,
        ) -> list[tuple[float, bool]]:
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            # Longest first: a batch's padding is then small, and memory peaks early.
            order = sorted(range(len(requests)),
                           key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                scored = self._score_batch([requests[i][1:] for i in batch])
                for i, answer in zip(batch, scored, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return results  # type: ignore[return-value]

        @torch.inference_mode()
        def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]]
                         ) -> list[tuple[float, bool]]:
            inputs, targets = [], []
            for context, continuation in pairs:
                if not continuation:
                    raise DraftlmError("lm-eval asked to score an empty continuation")
                # As much context as fits before the continuation (left-truncated).
                whole = (context + continuation)[-(self.max_length + 1) :]
                inputs.append(whole[:-1])
                targets.append(whole[-min(len(continuation), len(whole) - 1) :])
            width = max(len(x) for x in inputs)
            pad = self.eot_token_id
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs],
                               device=self.lm.device)
            logprobs = F.log_softmax(self.lm.model(ids).float(), dim=-1)
            out = []
            for row, (x, y) in enumerate(zip(inputs, targets, strict=True)):
                target = torch.tensor(y, device=ids.device)
                lp = logprobs[row, len(x) - len(y) : len(x)]
                picked = lp.gather(-1, target[:, None]).squeeze(-1)
                out.append((float(picked.double().sum()), bool((lp.argmax(-1) == target).all())))
            return out

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                                  ) -> list[float]:
            """Whole-document log-likelihood, in lm-eval's own disjoint windows (each token
            predicted once, the last window with full context), for its perplexity tasks."""
            results = []
            for request in requests:
                (text,) = request.args
                windows = [
                    make_disjoint_window(w) for w in get_rolling_token_windows(
                        token_list=self.tok_encode(text, add_special_tokens=False),
                        prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                        context_len=1)
                ]
                scored = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
                total = sum(logprob for logprob, _ in scored)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                results.append(total)
            return results

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            results = []
            for request in requests:
                context, gen_kwargs = request.args
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
                if max_new >= self.max_length:
                    raise DraftlmError(f"max_gen_toks {max_new} leaves no room for the context "
                                       f"in max_length {self.max_length}")
                ids = self.tok_encode(context)[-(self.max_length - max_new) :]
                result = generate(self.lm, ids, max_new_tokens=max_new, temperature=temperature,
                                  top_p=kwargs.pop("top_p", None), seed=0, stop=until,
                                  drafter=self.drafter, max_context=self.max_length)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), result.text)
                results.append(result.text)
            return results

    DraftlmLM.__module__ = __name__
    DraftlmLM.__qualname__ = "DraftlmLM"
    return DraftlmLM


def _resolve_device(device: str | None) -> str:
    """lm-eval passes --device, which defaults to cuda:0; like its own HF model, run on the
    CPU when there is no GPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("no CUDA device: running on the CPU")
        return "cpu"
    return device


def _batch_size(value: int | str) -> int:
    if str(value).startswith("auto"):
        return 16  # sequences in these tasks are short; no probing of memory
    size = int(value)
    if size < 1:
        raise DraftlmError(f"batch_size must be >= 1, got {value}")
    return size


def register() -> type:
    """Register the adapter as lm-eval's model `draftlm` (idempotent); returns the class."""
    cls = adapter_class()
    import lm_eval.models  # noqa: F401  (lm-eval's own models first, or they'd never load)
    from lm_eval.api.registry import model_registry, register_model

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(cls)
    return cls


def __getattr__(name: str) -> Any:
    if name == "DraftlmLM":
        return adapter_class()
    raise AttributeError(name)


def cmd_lm_eval(args: Sequence[str]) -> None:
    """`draftlm eval lm-eval ARGS`: lm-eval's CLI with the `draftlm` model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


class _PassThroughParser(argparse.ArgumentParser):
    """Hands every argument to lm-eval untouched: argparse would otherwise reject lm-eval's
    flags (`--model`, `--tasks`, `--help` ...) as unknown to draftlm."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace or argparse.Namespace()
        namespace.args, namespace.func = list(args or []), cmd_lm_eval
        return namespace, []


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `draftlm eval lm-eval`; every argument after it goes to lm-eval."""
    verbs = eval_subparsers(subparsers)
    default_class = verbs._parser_class
    verbs._parser_class = _PassThroughParser  # this one verb parses nothing itself
    try:
        verbs.add_parser("lm-eval", help="lm-evaluation-harness with --model draftlm "
                         "(arguments go to lm-eval)", add_help=False)
    finally:
        verbs._parser_class = default_class


if __name__ == "__main__":
    cmd_lm_eval(sys.argv[1:])
