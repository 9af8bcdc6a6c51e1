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


def frame_list(text: str) -> list[int]:
    """An argparse type: comma-separated video frame counts (``4,8,16``), each an int >= 1; returned sorted,
    without repeats."""
    try:
        frames = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        frames = []
    if not frames or frames[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts >= 1 (e.g. 4,8,16), got {text!r}")
    return frames


def add_parser(sub) -> None:
    """The ``bench`` subcommand's arguments (defaults from :class:`vtprune.bench.runner.BenchSpec`)."""
    from vtprune.bench.archs import ARCHS, ATTENTION
    from vtprune.bench.inputs import DEFAULT_FRAME_SIZE
    from vtprune.bench.runner import DEFAULT_BUDGETS, DEFAULT_METHODS, DEFAULT_VIDEO_BUDGETS

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
    b.add_argument("--budgets", type=budget_list, default=None,
                   help="comma-separated budgets: visual tokens kept per image or video (64), a percentage of them "
                        "(12.5%%) or 'default' for each method's own defaults (default "
                        f"{','.join(map(str, DEFAULT_BUDGETS))}; with --video-frames "
                        f"{','.join(DEFAULT_VIDEO_BUDGETS).replace('%', '%%')})")
    b.add_argument("--video-frames", type=frame_list, default=None, metavar="N[,N...]",
                   help="feed one video of N frames per sample instead of the image, one run per N (4,8,16: how the "
                        "saving grows with frames), plus a summary table over N; needs a Qwen2-VL / Qwen2.5-VL "
                        "model (--arch qwen2.5-vl-7b, qwen2.5-vl-cpu-small, qwen2.5-vl-tiny); N a multiple of 2")
    b.add_argument("--frame-size", type=int, default=None, metavar="PX",
                   help="side in px of the square image or video frames of a Qwen2-VL-family model (default: the "
                        f"architecture's, {DEFAULT_FRAME_SIZE} for a --model); a multiple of 28 with 14 px patches")
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
    """``vtprune bench``: validate, build or load the model, run :func:`vtprune.bench.runner.run_bench` (once
    per frame count with ``--video-frames``), write the JSON / Markdown / PNG (and the video summary over frame
    counts) and print the Markdown (the video summary with ``--video-frames``). Returns 0."""
    import dataclasses

    import torch

    from vtprune.bench import archs, inputs, report, runner
    from vtprune.models import DEFAULT_MODEL_ID

    video = args.video_frames is not None
    budgets: list[int | str] = args.budgets if args.budgets is not None else list(
        runner.DEFAULT_VIDEO_BUDGETS if video else runner.DEFAULT_BUDGETS)
    device, dtype = device_and_dtype(args)
    with user_errors(ValueError):
        frame_size = args.frame_size
        if frame_size is None and args.arch:
            frame_size = archs.get_arch(args.arch).frame_size
        base = runner.BenchSpec(methods=tuple(args.methods), budgets=tuple(budgets), batch=args.batch,
                                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                                warmup=args.warmup, seed=args.seed, matmul_size=args.matmul_size,
                                copy_bytes=args.copy_mb << 20 if args.copy_mb else None, frame_size=frame_size)
        specs = [dataclasses.replace(base, video_frames=n) for n in (args.video_frames or [None])]
        for spec in specs:
            spec.validate()
        runner.check_methods(base.methods)
        archs.check_attention(args.attn, device, dtype)  # before building or loading anything
        if video and not args.arch and (args.model is None or is_default_model(args.model)):
            raise ValueError("--video-frames: the bundled model takes images only; video needs a Qwen2-VL / Qwen2.5-VL "
                             "model: --arch qwen2.5-vl-7b, qwen2.5-vl-cpu-small or qwen2.5-vl-tiny, or --model a "
                             "Qwen2-VL / Qwen2.5-VL checkpoint")
        if args.arch:  # check the inputs and budgets against the architecture before allocating it
            cfg = archs.arch_config(args.arch)
            for spec in specs:
                n_visual = inputs.visual_tokens(cfg, spec.video_frames, spec.frame_size)
                runner.plan_cases(spec.methods, spec.budgets, n_visual, cfg.get_text_config().num_hidden_layers,
                                  "video" if video else "image")
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
    out_dir = Path(args.out) if args.out else runner.default_out_dir(label + ("-video" if video else ""))
    results, files = [], []
    for spec in specs:
        if video:
            log(f"one video of {spec.video_frames} frames per sample")
        with quiet(), user_errors(ValueError):
            result = runner.run_bench(model, spec, label=label, log=log,
                                      meta={"command": command, "source": "arch" if args.arch else "model"})
        paths = report.write_results(result, out_dir)
        log("wrote " + ", ".join(str(p) for p in paths.values()))
        results.append(result)
        files.append(paths["md"].name)
    if video:
        paths = report.write_video_summary(results, out_dir, files)
        print(report.video_markdown(results, files))
        log("wrote " + ", ".join(str(p) for p in paths.values()))
    else:
        print(report.markdown(results[0]))
    return 0
