"""``vtprune generate``: one image + one prompt through a method (optionally against the unpruned model)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vtprune.api import apply
from vtprune.cli.common import (
    UsageError,
    add_method_arguments,
    add_model_arguments,
    load_from_args,
    log,
    method_options,
    quiet,
    user_errors,
)
from vtprune.cli.output import print_human
from vtprune.inputs import build_inputs, load_image
from vtprune.methods import make_method

WARMUP_NEW_TOKENS = 2  # new tokens of each warm-up generation (tokens)


def add_parser(sub) -> None:
    """The ``generate`` subcommand's arguments."""
    g = sub.add_parser("generate", help="answer one prompt about one image under a method",
                       description="Answer one prompt about one image with greedy decoding under a visual-token "
                                   "method; print the answer, the visual tokens kept, FLOPs, KV-cache and timings.")
    g.add_argument("--image", required=True, help="image file")
    g.add_argument("--prompt", required=True, help="question / instruction about the image")
    add_model_arguments(g)
    add_method_arguments(g)
    g.add_argument("--max-new-tokens", type=int, default=32, help="new tokens to generate, greedy (default 32)")
    g.add_argument("--compare", action="store_true",
                   help="also run the unpruned model (method none) on the same input and print the speedups")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help=f"run a {WARMUP_NEW_TOKENS}-token generation under each method first so one-time overhead "
                        "does not enter the timings (default: on with --compare, off otherwise)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (logs go to stderr)")
    g.set_defaults(func=cmd_generate)


def generate_once(model, processor, inputs, method: str = "none", options: dict[str, Any] | None = None,
                  max_new_tokens: int = 32) -> tuple[str, Any]:
    """Run one greedy generation under ``method`` and return ``(answer, report)``.

    ``answer`` is the decoded new text (special tokens skipped, whitespace stripped) of the first
    sample; ``report`` is the run's :class:`vtprune.Report` (visual tokens per layer, equivalent budget,
    FLOPs, KV bytes, timings in ms).

    Raises:
        UsageError: unknown method / option or an option value out of range for this model.
    """
    with user_errors(ValueError, TypeError):
        run = apply(model, method, **(options or {}))
    with run:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    answer = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    return answer, run.report()


def speedups(pruned_timing: dict, baseline_timing: dict) -> dict:
    """Speedups of the pruned run over the unpruned one (unpruned ms / pruned ms; None when unknown):
    ``end_to_end``, ``prefill``, ``decode_per_token``."""
    def ratio(key):
        a, b = baseline_timing.get(key), pruned_timing.get(key)
        return a / b if a is not None and b else None
    return {"end_to_end": ratio("end_to_end_ms"), "prefill": ratio("prefill_ms"),
            "decode_per_token": ratio("decode_ms_per_token")}


def cmd_generate(args: argparse.Namespace) -> int:
    """``vtprune generate``: validate the input, load the model, generate, print. Returns 0."""
    from vtprune.models import DEFAULT_MODEL_ID

    options = method_options(args.budget, args.keep_ratio, args.option)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    with user_errors(ValueError, TypeError):  # unknown method / option, before the slow model load
        method = make_method(args.method, **options)
    with user_errors():
        image = load_image(args.image)
    model, processor = load_from_args(args, args.json)
    with quiet(args.json), user_errors(ValueError, TypeError):
        inputs = build_inputs(processor, image, args.prompt, device=model.device, dtype=model.dtype)

    warmup = args.compare if args.warmup is None else args.warmup
    methods = [(method.name, options)] + ([("none", {})] if args.compare else [])
    with quiet(args.json):
        if warmup:
            for name, opts in methods:
                log(f"warm-up ({name})")
                generate_once(model, processor, inputs, name, opts, WARMUP_NEW_TOKENS)
        results = []
        for name, opts in methods:
            log(f"generating ({name})")
            results.append(generate_once(model, processor, inputs, name, opts, args.max_new_tokens))

    answer, report = results[0]
    result = {"answer": answer, "prompt": args.prompt, "image": str(args.image),
              "model": args.model or DEFAULT_MODEL_ID, **report.flatten()}
    if args.compare:
        base_answer, base_report = results[1]
        result["baseline"] = {"answer": base_answer, **base_report.flatten()}
        result["speedup"] = speedups(report.timing, base_report.timing)
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result)
    return 0
