"""``vtprune bench``: latency / memory of methods x budgets against the unpruned model (:mod:`vtprune.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vtprune.cli import common
from vtprune.cli.common import (
    add_model_arguments,
    budget_list,
    device_and_dtype,
    log,
    method_list,
    quiet,
    user_errors,
)
from vtprune.inputs import is_default_model


def add_parser(sub) -> None:
    """The ``bench`` subcommand's arguments (defaults from :class:`vtprune.bench.runner.BenchSpec`)."""
    from vtprune.bench.archs import ARCHS, ATTENTION
    from vtprune.bench.runner import DEFAULT_BUDGETS, DEFAULT_METHODS

    b = sub.add_parser("bench", help="latency / memory of methods x budgets against the unpruned model",
                       description="Benchmark visual-token methods x budgets against the unpruned model in one "
                                   "process on synthetic inputs: TTFT, decode ms/token, end-to-end ms, tokens/s, "
                                   "peak memory, KV bytes, with FLOPs-ideal and roofline-ideal speedups beside the "
                                   "measured ones. Writes JSON + Markdown + PNG under --out and prints the Markdown.")
    add_model_arguments(b, model=False)
    src = b.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="local path or HuggingFace id; default: the bundled model")
    src.add_argument("--arch", default=None,
                     help=f"build this architecture with random weights (no download): {', '.join(ARCHS)}")
    b.add_argument("--methods", type=method_list, default=list(DEFAULT_METHODS),
                   help=f"comma-separated method specs (default {','.join(DEFAULT_METHODS)}), each optionally with "
                        "fixed options after colons and its own budget after @ (st3:anneal_every=4, fastv@25%%); "
                        "the stock model always runs")
    b.add_argument("--budgets", type=budget_list, default=list(DEFAULT_BUDGETS),
                   help="comma-separated budgets: visual tokens kept per image (64), a percentage of them (12.5%%) "
                        f"or 'default' for each method's own defaults (default {','.join(map(str, DEFAULT_BUDGETS))})")
    b.add_argument("--batch", type=int, default=1, help="batch size B, identical rows (default 1)")
    b.add_argument("--prompt-tokens", type=int, default=60, help="text tokens around the image (default 60)")
    b.add_argument("--new-tokens", type=int, default=16, help="new tokens per generation, exactly (default 16)")
    b.add_argument("--attn", choices=ATTENTION, default="sdpa",
                   help="attention implementation (default sdpa); flash_attention_2 needs flash_attn and a CUDA device, "
                        "and runs the packed two-path layers of a multi-path method with SDPA")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--matmul-size", type=int, default=None,
                   help="side of the square matmul measuring the matrix rate (default 2048 CPU, 8192 GPU)")
    b.add_argument("--copy-mb", type=int, default=None,
                   help="MiB copied to measure the memory bandwidth (default 256 CPU, 2048 GPU)")
    b.add_argument("--out", default=None,
                   help="output directory (default benchmarks/results/<date>-<host>-bench-<arch or model>/)")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """``vtprune bench``: validate, build or load the model, run :func:`vtprune.bench.runner.run_bench`,
    write the JSON / Markdown / PNG and print the Markdown. Returns 0."""
    import torch

    from vtprune.bench import archs, report, runner
    from vtprune.models import DEFAULT_MODEL_ID

    spec = runner.BenchSpec(methods=tuple(args.methods), budgets=tuple(args.budgets), batch=args.batch,
                            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                            warmup=args.warmup, seed=args.seed, matmul_size=args.matmul_size,
                            copy_bytes=args.copy_mb << 20 if args.copy_mb else None)
    device, dtype = device_and_dtype(args)
    with user_errors(ValueError):
        spec.validate()
        runner.check_methods(spec.methods)
        archs.check_attention(args.attn, device, dtype)  # before building or loading anything
        if args.arch:  # check budgets against the architecture before allocating it
            cfg = archs.arch_config(args.arch)
            runner.plan_cases(spec.methods, spec.budgets, archs.image_tokens(cfg), cfg.text_config.num_hidden_layers)
    if args.threads:
        torch.set_num_threads(args.threads)
    label = args.arch or (Path(args.model).name if args.model and not is_default_model(args.model)
                          else DEFAULT_MODEL_ID.split("/")[-1])
    log(f"{'building' if args.arch else 'loading'} {label} ({str(dtype).removeprefix('torch.')}, {device}, {args.attn})")
    with quiet(), user_errors():
        if args.arch:
            model = archs.build_model(args.arch, dtype, device, args.attn, args.seed)
        else:
            model, _ = common.load_model(args.model, dtype, device)
            model.set_attn_implementation({"text_config": args.attn})
    command = " ".join(["vtprune", *getattr(args, "argv", [])])
    with quiet(), user_errors(ValueError):
        result = runner.run_bench(model, spec, label=label, log=log,
                                  meta={"command": command, "source": "arch" if args.arch else "model"})
    out_dir = Path(args.out) if args.out else runner.default_out_dir(label)
    paths = report.write_results(result, out_dir)
    print(report.markdown(result))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
