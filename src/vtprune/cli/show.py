"""``vtprune show``: draw the image with the visual tokens a method kept (per layer, or the two paths of a
multi-path method) (:mod:`vtprune.eval.show`)."""

from __future__ import annotations

import argparse
from typing import cast

from vtprune.api import apply
from vtprune.cli.common import (
    UsageError,
    add_method_arguments,
    add_model_arguments,
    load_from_args,
    method_options,
    quiet,
    user_errors,
)
from vtprune.methods import make_method


def add_parser(sub) -> None:
    """The ``show`` subcommand's arguments."""
    w = sub.add_parser("show", help="draw the image with the visual tokens a method kept (per layer / ParVTS groups)")
    w.add_argument("--image", required=True, help="image file")
    w.add_argument("--prompt", required=True, help="the question")
    add_method_arguments(w)
    w.add_argument("--out", default="vtprune-show.png", help="PNG to write (default vtprune-show.png)")
    w.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens of the answer (default 8)")
    add_model_arguments(w)
    w.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    """``vtprune show``: generate once under the method, then draw the kept tokens over the image."""
    from vtprune.eval import show
    from vtprune.inputs import build_inputs, load_image
    from vtprune.methods.stages import PathsPlan

    options = method_options(args.budget, args.keep_ratio, args.option)
    with user_errors(ValueError, TypeError):
        make_method(args.method, **options)
    with user_errors():
        image = load_image(args.image)
    model, processor = load_from_args(args)
    with quiet(), user_errors():
        inputs = build_inputs(processor, image, args.prompt, device=model.device, dtype=model.dtype)
    with user_errors(ValueError, TypeError):
        run = apply(model, args.method, **options)
    with run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    kept = run.kept_visual()
    grid = run.visual_grid()  # what the engine got from the adapter for this call
    if grid is None:
        raise UsageError(f"show draws token grids; the visual tokens of {type(model).__name__} do not form one grid")
    plan = run.plan
    paths = isinstance(plan, PathsPlan) and plan.keep < plan.n_visual
    title = f"{args.method} {options or ''}: {args.prompt!r} -> {answer!r}"
    with user_errors(ImportError):
        path = show.draw(show.model_image(inputs["pixel_values"], processor), grid, kept, args.out, title,
                         subject=kept[-1] if paths else None,
                         discard_layer=cast(PathsPlan, plan).merge_layer if paths else None)
    print(f"{answer}\nwrote {path}")
    return 0
