"""The options that several commands share, as dataclasses checked once.

`generate`, `serve`, `bench` and `eval` load a model the same way (`LoadOptions`), and all
but `bench` ask for a drafter the same way (`DraftOptions`). Each option is a field with
its docstring (litgpt's args.py style), which is also the help of its flag; every check
sits in `__post_init__`, so a Python caller and the command line get the same one-line
`DraftlmError`, before any model loads. `add_flags` declares a dataclass's flags on a
sub-command and `gather_options` builds the dataclass from the parsed flags, so that a verb
takes `load_options: LoadOptions` instead of a dozen loose arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from draftlm.errors import DraftlmError
from draftlm.load import DTYPES
from draftlm.quant.layers import QUANTIZE_MODES

# Which models get a compiled one-token step (`compile.CompiledDecoder`). "draft"
# keeps the target eager, so greedy speculative output stays bit-identical to eager AR;
# "all" also speeds up the target's own AR decoding, whose logits then match eager ones to
# float rounding only.
COMPILE_MODES = ("none", "draft", "all")

# The parsed-arguments key under which `add_flags` records which dataclass gathers which
# flags (see `gather_options`).
OPTIONS_KEY = "_options"


def flag(name: str | None = None, *, exclusive: str | None = None,
         **argparse_kwargs: Any) -> dict[str, Any]:
    """Field metadata for `add_flags`: the flag's name when it is not `--field-name`, the
    mutually exclusive group it belongs to, and `add_argument` keywords (type, choices,
    action, metavar, help where the field's docstring would not read as a flag's help)."""
    return {"flag": {"name": name, "exclusive": exclusive, **argparse_kwargs}}


def check_dtype(dtype: Any, flag_name: str) -> None:
    """A dtype flag names one of the dtypes `load` knows (or `auto`)."""
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise DraftlmError(f"{flag_name}: unknown dtype {dtype!r}; use one of auto, "
                           f"{', '.join(DTYPES)}")


def check_quantize(quantize: str | None, flag_name: str) -> None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise DraftlmError(f"unknown {flag_name} {quantize!r}; use one of "
                           f"{', '.join(QUANTIZE_MODES)}")


def check_confidence(p: float) -> None:
    """A --draft-confidence is a probability strictly between 0 and 1."""
    if not 0 < p < 1:
        raise DraftlmError(f"--draft-confidence must be between 0 and 1, got {p}")


@dataclass(frozen=True)
class LoadOptions:
    """How a command loads its model (and its draft models, unless `DraftOptions` says
    otherwise)."""

    dtype: str | torch.dtype = "auto"
    """auto | float32 | bfloat16 | float16"""
    device: str | torch.device = "cpu"
    """where the model runs (cpu, cuda, cuda:1, ...)"""
    quantize: str = field(default="none", metadata=flag(choices=QUANTIZE_MODES))
    """quantize the linear layers (CPU int8 / int4 kernels)"""
    compile_mode: str = field(default="none", metadata=flag("--compile", choices=COMPILE_MODES))
    """torch.compile the one-token decode step of the draft model or of all models (the
    first run on a machine compiles for minutes)"""
    cuda_graphs: bool = field(default=False, metadata=flag(action="store_true"))
    """with --compile on a GPU, record the compiled steps as CUDA graphs (static shapes);
    opt-in until scripts/gpu_check.sh has passed on a GPU"""

    def __post_init__(self) -> None:
        check_dtype(self.dtype, "--dtype")
        check_quantize(self.quantize, "--quantize")
        if self.compile_mode not in COMPILE_MODES:
            raise DraftlmError(f"unknown --compile {self.compile_mode!r}; use one of "
                               f"{', '.join(COMPILE_MODES)}")
        if self.cuda_graphs and self.compile_mode == "none":
            raise DraftlmError("--cuda-graphs records compiled steps: add --compile draft "
                               "or --compile all")

    @property
    def compile_target(self) -> bool:
        """The target's own step is compiled only under `--compile all`."""
        return self.compile_mode == "all"

    @property
    def compile_drafts(self) -> bool:
        return self.compile_mode != "none"

    def check_draft_model(self, draft: str | None) -> None:
        """`--compile draft` compiles a draft model's step, so it needs one (prompt lookup
        has no model to compile); checked before any model loads."""
        if self.compile_mode == "draft" and draft is None:
            raise DraftlmError("--compile draft needs a draft model (--draft)")


@dataclass(frozen=True)
class DraftOptions:
    """Which drafter proposes tokens for speculative decoding, and how it runs. With
    neither `draft` nor `ngram` there is no drafter: plain decoding."""

    draft: str | None = field(default=None, metadata=flag(exclusive="drafter"))
    """draft model for speculative decoding"""
    ngram: int | None = field(default=None, metadata=flag(type=int, exclusive="drafter"))
    """prompt-lookup drafting with n-grams of this size"""
    num_draft_tokens: int = field(default=5, metadata=flag(type=int))
    """draft length k"""
    adaptive: bool = field(default=True, metadata=flag(
        "--fixed", action="store_false", help="keep the draft length fixed (default: adaptive)"))
    """adapt the draft length to how much of each draft the target accepts"""
    draft_dtype: str | None = None
    """dtype of the draft model (default: --dtype)"""
    draft_quantize: str | None = field(default=None, metadata=flag(choices=QUANTIZE_MODES))
    """quantization of the draft model (default: --quantize)"""
    cross_tokenizer: bool = False
    """the draft has another tokenizer: draft through re-tokenized text"""
    min_confidence: float | None = field(default=None, metadata=flag(
        "--draft-confidence", type=float, metavar="P"))
    """stop a draft once the draft model's top probability falls under P (a token it is
    unsure of is likely rejected; default: never)"""

    def __post_init__(self) -> None:
        if self.draft is not None and self.ngram is not None:
            raise DraftlmError("speculative decoding takes exactly one of --draft or --ngram, "
                               "not both")
        if self.ngram is not None and self.ngram < 1:
            raise DraftlmError(f"--ngram must be >= 1, got {self.ngram}")
        if self.num_draft_tokens < 1:
            raise DraftlmError(f"--num-draft-tokens: the number of draft tokens must be >= 1, "
                               f"got {self.num_draft_tokens}")
        check_dtype(self.draft_dtype, "--draft-dtype")
        check_quantize(self.draft_quantize, "--draft-quantize")
        if self.cross_tokenizer and self.draft is None:
            raise DraftlmError("--cross-tokenizer needs a draft model (--draft)")
        if self.min_confidence is not None:
            check_confidence(self.min_confidence)
            if self.ngram is not None or self.cross_tokenizer:
                raise DraftlmError("--draft-confidence applies to a draft model with the "
                                   "target's tokenizer (--draft), not to --ngram or "
                                   "cross-tokenizer drafts")
            if self.draft is None:
                raise DraftlmError("--draft-confidence needs a draft model (--draft)")

    @property
    def speculative(self) -> bool:
        """Whether a drafter is asked for at all."""
        return self.draft is not None or self.ngram is not None


LOAD_DEFAULTS = LoadOptions()
"""The default loading: the machine's fast dtype, on the CPU, unquantized, eager."""
NO_DRAFTER = DraftOptions()
"""Plain decoding."""


# ---- command-line flags ----------------------------------------------------------------------
@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, on one line: its flag's help."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except OSError:  # no source next to the bytecode: the flags work, without help
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_flags(
    parser: argparse.ArgumentParser,
    options_class: type,
    into: str | None,
    *,
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    skip: Collection[str] = (),
) -> None:
    """Declare a flag for each field of `options_class` (but those in `skip`, which keep the
    dataclass default); the verb then receives `into=options_class(...)`, or with `into`
    None each flag as its own keyword argument.

    `defaults` and `helps` replace a field's default or help text for this one command."""
    defaults, helps = defaults or {}, helps or {}
    docs = field_docs(options_class)
    groups: dict[str, Any] = {}
    names = []
    for f in dataclasses.fields(options_class):
        if f.name in skip:
            continue
        spec = dict(f.metadata.get("flag", {}))
        name = spec.pop("name", None) or "--" + f.name.replace("_", "-")
        exclusive = spec.pop("exclusive", None)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name, default)
        if isinstance(default, bool) and "action" not in spec:
            spec["action"] = "store_true" if not default else "store_false"
        if spec.get("action") == "append":
            default = list(default)  # argparse appends to the default it is given
        if spec.get("action") not in ("store_true", "store_false") and "choices" not in spec:
            spec.setdefault("metavar", name.lstrip("-").replace("-", "_").upper())
        help_text = helps.get(f.name, spec.pop("help", docs.get(f.name)))
        target = parser
        if exclusive is not None:
            if exclusive not in groups:
                groups[exclusive] = parser.add_mutually_exclusive_group()
            target = groups[exclusive]
        target.add_argument(name, dest=f.name, default=default,
                            help=help_text and help_text.replace("%", "%%"), **spec)
        names.append(f.name)
    if into is not None:
        recorded = dict(parser.get_default(OPTIONS_KEY) or {})
        recorded[into] = (options_class, tuple(names))
        parser.set_defaults(**{OPTIONS_KEY: recorded})


def gather_options(args: dict[str, Any]) -> dict[str, Any]:
    """Parsed arguments -> the verb's keyword arguments: the flags that `add_flags` declared
    become their dataclass, whose `__post_init__` checks them (a `DraftlmError` here is the
    user's)."""
    for into, (options_class, names) in args.pop(OPTIONS_KEY, {}).items():
        args[into] = options_class(**{name: args.pop(name) for name in names})
    return args


def add_load_flags(p: argparse.ArgumentParser, dtype: str = "auto",
                   compile_flag: bool = True) -> None:
    """The `LoadOptions` flags as separate arguments, for a verb that takes them one by one
    (--dtype, --device, --quantize, and --compile unless `compile_flag` is False)."""
    add_flags(p, LoadOptions, None, defaults={"dtype": dtype},
              skip=() if compile_flag else ("compile_mode", "cuda_graphs"))
