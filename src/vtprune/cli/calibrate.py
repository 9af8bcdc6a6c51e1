"""``vtprune calibrate``: sweep a method's layer (ParVTS's discard layer, VTW's withdrawal layer) by the
KL divergence of the first answer token (:mod:`vtprune.eval.calibrate`)."""

from __future__ import annotations

import argparse

from vtprune.cli.common import (
    UsageError,
    add_model_arguments,
    load_from_args,
    log,
    parse_list,
    quiet,
    user_errors,
)


def add_parser(sub) -> None:
    """The ``calibrate`` subcommand's arguments."""
    c = sub.add_parser("calibrate", help="sweep ParVTS's discard layer / VTW's withdrawal layer by first-token KL",
                       description="Run a few samples under every layer (and ParVTS fusion), compare the first "
                                   "answer token's distribution with the unpruned model's, and pick the smallest "
                                   "layer whose mean KL divergence stays within --threshold.")
    c.add_argument("--method", choices=("parvts", "vtw"), required=True)
    c.add_argument("--samples", type=int, default=16, help="samples to calibrate on (default 16)")
    c.add_argument("--data", default="imagenet-pope", help="data set the samples come from (default imagenet-pope)")
    c.add_argument("--split", default="test", help="data split (default test)")
    c.add_argument("--threshold", type=float, default=0.05, help="mean KL threshold in nats (default 0.05)")
    c.add_argument("--layers", type=parse_list(int), default=None, help="layers to try (default 1 .. L-1)")
    c.add_argument("--budget", type=int, default=None, help="parvts: subject tokens per image")
    c.add_argument("--keep-ratio", type=float, default=None, help="parvts: subject fraction (default 0.25)")
    c.add_argument("--fusion", type=parse_list(str), default=None,
                   help="parvts: fusion options to sweep (default attention_mass,fixed,size)")
    add_model_arguments(c)
    c.add_argument("--batch", type=int, default=8, help="samples per generate call (default 8)")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``vtprune calibrate``: load samples and the model, sweep, print the table and the choice."""
    from vtprune.adapters import adapter_for
    from vtprune.eval import calibrate, datasets
    from vtprune.inputs import build_batch

    if args.samples < 1 or args.batch < 1:
        raise UsageError(f"--samples and --batch must be >= 1, got {args.samples} and {args.batch}")
    fixed = {}
    if args.method == "vtw" and (args.budget is not None or args.keep_ratio is not None or args.fusion):
        raise UsageError("vtw withdraws every visual token: --budget, --keep-ratio and --fusion are parvts options")
    if args.budget is not None:
        fixed["budget"] = args.budget
    if args.keep_ratio is not None:
        fixed["keep_ratio"] = args.keep_ratio
    with user_errors(ValueError, FileNotFoundError):
        samples = datasets.load_dataset(args.data, args.split, args.samples)
    model, processor = load_from_args(args)
    layers = adapter_for(model).text_config.num_hidden_layers
    settings = []
    for fusion in args.fusion or [None]:
        extra = dict(fixed, **({"fusion": fusion} if fusion else {}))
        settings += calibrate.sweep_settings(args.method, layers, args.layers, extra)
    batches = [build_batch(processor, [s.load_image() for s in samples[i:i + args.batch]],
                           [s.question for s in samples[i:i + args.batch]], device=model.device, dtype=model.dtype)
               for i in range(0, len(samples), args.batch)]
    log(f"{len(settings)} settings x {len(samples)} samples of {args.data}")
    with quiet(), user_errors(ValueError, TypeError):
        rows, chosen = calibrate.calibrate(model, batches, args.method, settings, args.threshold, log=log)
    print(calibrate.markdown(rows, chosen, args.threshold))
    return 0
