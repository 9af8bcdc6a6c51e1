"""The benchmark runner: methods x budgets against the unpruned model, in one process, on the same inputs.

Protocol (:func:`run_bench`):

1. Synthetic inputs (:mod:`vtprune.bench.inputs`): B identical rows of ``prompt_tokens`` text tokens
   around one image, or one video of ``video_frames`` frames (Qwen2-VL family). Every generation is greedy with ``eos_token_id = None`` and
   ``min_new_tokens = max_new_tokens = new_tokens``, so every case decodes exactly as many tokens
   (checked on the output).
2. Cases: ``stock`` (the model without vtprune: the baseline of every speedup), ``none`` (vtprune
   attached, nothing pruned: the machinery's overhead) and each pruning method x budget.
3. One forward checks that the random weights give finite logits; ``warmup`` rounds run every case
   once and are discarded; then ``repeats`` rounds run every case, round-robin (the order rotated
   each round, so slow drift of a shared machine spreads over all cases). The matrix rate and
   bandwidth ceilings (:mod:`vtprune.bench.measure`, best of 10 on CPU, 5 on GPU) are measured before
   and after the rounds; the better pass is the ceiling (both are kept in the JSON).
4. Per case and round, one generation timed between device synchronisations (wall-clock ms), with a
   stopping criterion that stamps a synchronized clock after every new token
   (:class:`vtprune.bench.measure.StepClock`): **TTFT** = start to first token (vision encoder +
   prefill + first sampling, with generate's own set-up), **decode ms per token** = first to last
   token / (new_tokens - 1), **end-to-end** = the whole call; peak memory around it. Medians over
   rounds. The engine's own timers (``run.report()["timing"]``: CUDA events / perf_counter around the
   model forward of the prefill and of each decode step, without generate's set-up, sampling and
   loop) are kept beside them as ``engine_prefill_ms`` / ``engine_decode_ms_per_token``; they do not
   measure the same span and the stock model has none, so the comparisons use the external clock.
5. Work and ideals from the ledger of the last round (:mod:`vtprune.bench.ideal`): FLOPs-ideal and
   roofline-ideal speedups per phase, beside the measured ones and the ratios measured / ideal.
6. Scoring cost: after the timed rounds, one extra generation per vtprune case under the run's opt-in
   host-time profile (``vtprune.apply(..., profile=True)``, :mod:`vtprune.engine.profile`): every
   partial-attention scoring call (``vtprune.engine.attention.row_logits``, once per scored layer and
   forward) timed between device synchronisations; timing a scoring method against ``none`` would mix
   the scoring with the pruning it enables. This pass is not part of the timed rounds (its
   synchronisations would perturb them); it reports calls, ms per call (= per scored layer) and their
   share of the end-to-end time. The same profile times the engine's hooks on the host (the model,
   language-model and per-layer pre-hooks, the model's forward hook and the attention listener;
   perf_counter, no synchronisation) and its ``generate`` wrapper outside the model's own ``generate``:
   host ms per generation that vtprune adds, the method's own work in them included. For ``none`` that
   is the machinery alone; on CPU, where every op runs on the host, it adds to the wall clock one for
   one, so it measures the overhead without the rounds' noise.

Attaching and detaching vtprune (hook registration, microseconds to milliseconds) is outside the timers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from vtprune import __version__
from vtprune.api import apply
from vtprune.bench import measure
from vtprune.bench.ideal import ModelWork, ideal_speedups, phase_work
from vtprune.bench.inputs import frame_size_of, synthetic_inputs, vision_call, vision_modules, visual_tokens
from vtprune.methods.spec import DEFAULT  # a budget that runs a method with its own defaults

STOCK = "stock"
DEFAULT_METHODS = ("none", "parvts", "st3", "fastv")
DEFAULT_BUDGETS = (192, 128, 64)
DEFAULT_VIDEO_BUDGETS = ("50%", "25%", "12.5%")  # a share of each video's tokens: comparable across frame counts
OVERHEAD_TARGET = 1.02  # issue 5: `none` attached within 2 % of the stock model end-to-end


@dataclasses.dataclass
class BenchSpec:
    """What to run. Counts are tokens; ``copy_bytes`` bytes; ``matmul_size`` the side of the square
    matmul; None picks the device default (:mod:`vtprune.bench.measure`). ``video_frames``: feed one video of
    that many frames instead of the image (None: the image); ``frame_size``: side in px of the square image or
    frames of a model whose visual tokens follow the picture's size (None: :mod:`vtprune.bench.inputs`' default)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[int | str, ...] = DEFAULT_BUDGETS
    batch: int = 1
    prompt_tokens: int = 60
    new_tokens: int = 16
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    matmul_size: int | None = None
    copy_bytes: int | None = None
    video_frames: int | None = None
    frame_size: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the field and its accepted range."""
        for name, lo in (("batch", 1), ("prompt_tokens", 2), ("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if not self.methods:
            raise ValueError("methods is empty; accepted: " + ", ".join(_method_names()))
        for name, value in (("matmul_size", self.matmul_size), ("copy_bytes", self.copy_bytes),
                            ("video_frames", self.video_frames), ("frame_size", self.frame_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked configuration: ``method`` None is the stock model (no vtprune)."""

    name: str
    method: str | None
    options: tuple[tuple[str, Any], ...] = ()


def _method_names() -> list[str]:
    from vtprune.methods import METHODS

    return sorted(METHODS)


def check_methods(methods) -> None:
    """Raise ValueError naming the accepted methods if one of ``methods`` is unknown (a method may carry
    fixed options and a budget: ``"st3:anneal_every=4"``, ``"fastv@25%"``; :mod:`vtprune.methods.spec`)."""
    from vtprune.methods import parse_spec

    for label in methods:
        parse_spec(label)


def plan_cases(methods, budgets, n_visual: int, num_layers: int, unit: str = "image") -> list[Case]:
    """The cases of a run: ``stock``, then ``none`` if asked, then each other method x budget: a budget is
    an int (visual tokens kept per image, or per video: ``unit``), a percentage of them (``"25%"``) or
    ``"default"`` (the method's own default options); a method spec may name its own (``"st3@64"``,
    :func:`vtprune.methods.expand`).

    Each method is built and planned against the model (``n_visual`` visual tokens per image or video,
    ``num_layers`` decoder layers) before anything runs.

    Raises:
        ValueError: unknown method (naming the accepted ones), no budgets for a pruning method, or a
            budget / option out of range for this model (the method's own message, naming the range).
    """
    from vtprune.methods import expand, parse_spec

    cases = [Case(STOCK, None)]
    for text in methods:
        if parse_spec(text).name == "none":
            if Case("none", "none") not in cases:
                cases.append(Case("none", "none"))
            continue
        specs = expand([text], budgets)
        if not specs or any(s.budget is None for s in specs):
            raise ValueError(f"method {parse_spec(text).name!r} needs at least one budget (visual tokens per {unit}, "
                             f"1..{n_visual}, a percentage, or {DEFAULT!r})")
        for spec in specs:
            options = spec.options
            b = options.get("budget")
            if b is not None and not (1 <= b <= n_visual):
                raise ValueError(f"budget {b!r} out of range: budgets are ints in [1, {n_visual}] "
                                 f"(visual tokens per {unit} of this model), percentages or {DEFAULT!r} "
                                 "(the method's defaults)")
            spec.build().plan(num_layers, n_visual)
            case = Case(spec.text, spec.name, tuple(sorted(options.items())))
            if case not in cases:
                cases.append(case)
    return cases


def model_work(model, inputs: dict) -> ModelWork:
    """The method-independent work of one batch (see :class:`ModelWork`); the vision FLOPs are counted
    by running the vision tower + projector (Qwen: the merger) once on the batch's images or videos under
    FlopCounterMode (:func:`vtprune.bench.inputs.vision_call`)."""
    from vtprune.adapters import adapter_for
    from vtprune.engine.ledger import Dims

    adapter = adapter_for(model)
    vision_flops = measure.count_flops(vision_call(model, inputs))
    head = model.get_output_embeddings()
    batch = inputs["input_ids"].shape[0]
    dims = Dims.from_config(adapter.text_config)
    elsize = torch.empty((), dtype=model.dtype).element_size()
    return ModelWork(
        vision_flops=vision_flops,
        lm_head_flops=2 * batch * head.in_features * head.out_features,
        vision_bytes=measure.param_bytes(*vision_modules(model)),
        decoder_bytes=measure.param_bytes(*adapter.decoder_layers, getattr(adapter.language_model, "norm", None)),
        lm_head_bytes=measure.param_bytes(head),
        kv_bytes_per_token=2 * dims.kv_heads * dims.head_dim * elsize,
    )


def generation_config(model, new_tokens: int):
    """A copy of the model's generation config: greedy, exactly ``new_tokens`` new tokens (no EOS)."""
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.eos_token_id = None
    gc.max_new_tokens = gc.min_new_tokens = new_tokens
    gc.max_length = None
    if gc.pad_token_id is None:
        pad = getattr(model.config.text_config, "pad_token_id", None)
        gc.pad_token_id = pad if pad is not None else 0
    for name in ("temperature", "top_p", "top_k"):  # silence "sampling flag without do_sample" warnings
        if hasattr(gc, name):
            setattr(gc, name, None)
    return gc


def _check_logits(model, inputs) -> None:
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the model gives non-finite logits in {model.dtype} on these inputs; "
                           "try float32 or bfloat16")


def _one_round(model, case: Case, inputs: dict, gc, device, work: ModelWork | None) -> dict:
    """Run ``case`` once: one timed generation (TTFT, decode ms/token, end-to-end ms), its peak memory,
    the run's report and its work (:func:`vtprune.bench.ideal.phase_work`)."""
    n_new = gc.max_new_tokens
    expected = inputs["input_ids"].shape[1] + n_new
    ctx = apply(model, case.method, **dict(case.options)) if case.method else contextlib.nullcontext()
    with ctx as run:
        with measure.PeakMemory(device) as mem:
            out, ids = measure.timed_generate(model, inputs, gc, device)
        if ids.shape[1] != expected or out["new_tokens"] != n_new:
            raise RuntimeError(f"{case.name}: generated {ids.shape[1] - inputs['input_ids'].shape[1]} new tokens, "
                               f"expected {n_new} (min_new_tokens was not honoured)")
        out["memory"] = mem.result
        if run is not None:
            report = run.report().to_dict()
            out["report"] = report
            out["engine_prefill_ms"] = report["timing"]["prefill_ms"]
            out["engine_decode_ms_per_token"] = report["timing"]["decode_ms_per_token"]
            out["work"] = phase_work(run, work) if work is not None else None
    return out


def scoring_cost(model, case: Case, inputs: dict, gc, device) -> dict:
    """One extra generation of ``case`` under the run's host-time profile
    (:mod:`vtprune.engine.profile`): every partial-attention scoring call timed between device
    synchronisations, the engine's hooks and its ``generate`` wrapper on the host (see the module
    docstring).

    Returns:
        ``{"calls_prefill", "calls_decode", "ms_per_call_prefill", "ms_per_call_decode" (medians, ms per
        scored layer and forward), "total_ms", "layers_scored_per_decode_step", "hook_calls", "hook_ms"
        (host ms inside the engine's hooks over the generation, scoring included), "wrapper_ms" (host ms in
        vtprune's ``generate`` wrapper outside the model's own ``generate``)}``.
    """
    # cast: run_bench scores the cases of a method only
    with apply(model, cast(str, case.method), profile=True, **dict(case.options)) as run:
        model.generate(**inputs, generation_config=gc)
    profile = run.profile
    assert profile is not None  # profile=True
    pre = [ms for q, ms in profile.scoring if q > 1]
    dec = [ms for q, ms in profile.scoring if q == 1]
    steps = gc.max_new_tokens - 1
    return {"calls_prefill": len(pre), "calls_decode": len(dec),
            "ms_per_call_prefill": measure.median(pre), "ms_per_call_decode": measure.median(dec),
            "total_ms": sum(pre) + sum(dec),
            "layers_scored_per_decode_step": len(dec) / steps if steps else None,
            "hook_calls": profile.hook_calls, "hook_ms": profile.hook_ms, "wrapper_ms": profile.wrapper_ms}


def _ceilings(device, dtype, spec: BenchSpec) -> dict:
    repeats = 5 if torch.device(device).type == "cuda" else 10
    return {"matmul": measure.matmul_rate(device, dtype, spec.matmul_size, repeats),
            "copy": measure.copy_bandwidth(device, spec.copy_bytes, repeats)}


def _best(a: dict, b: dict, key: str) -> dict:
    """The better of two ceiling measurements (a ceiling is the best rate seen), with both passes' rates."""
    out = dict(a if a[key] >= b[key] else b)
    out["passes"] = {"before_rounds": a[key], "after_rounds": b[key]}
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def _summarise(case: Case, rounds: list[dict], batch: int, n_new: int) -> dict:
    series = {key: [r.get(key) for r in rounds] for key in
              ("ttft_ms", "decode_ms_per_token", "end_to_end_ms", "engine_prefill_ms", "engine_decode_ms_per_token")}
    series["peak_memory_delta_bytes"] = [r["memory"]["delta_bytes"] for r in rounds]
    series["peak_memory_bytes"] = [r["memory"]["peak_bytes"] for r in rounds]
    med = {key: measure.median(values) for key, values in series.items() if not key.startswith("peak")}
    e2e, dec = med["end_to_end_ms"], med["decode_ms_per_token"]
    med["tokens_per_s"] = batch * n_new / (e2e / 1000.0) if e2e else None
    med["decode_tokens_per_s"] = batch / (dec / 1000.0) if dec else None
    mem = dict(rounds[-1]["memory"])
    peaks = [v for v in series["peak_memory_bytes"] if v is not None]
    deltas = [v for v in series["peak_memory_delta_bytes"] if v is not None]
    mem["peak_bytes"], mem["delta_bytes"] = (max(peaks) if peaks else None), (max(deltas) if deltas else None)
    out = {"name": case.name, "method": case.method or STOCK, "budget": dict(case.options).get("budget"),
           "repeats": series, "median": med, "peak_memory": mem}
    last = rounds[-1]
    report = last.get("report")
    if report is not None:
        sample = report["samples"][0]
        out["options"] = report["options"]
        out["visual"] = {key: sample[key] for key in ("visual_tokens_in", "equivalent_budget", "final_budget",
                                                      "visual_tokens_per_layer_prefill",
                                                      "visual_tokens_per_layer_last_decode")}
        out["flops_per_sample"] = sample["flops"]
        out["kv_cache"] = report["kv_cache"]
        out["work"] = last.get("work")
    return out


def _speedups(case: dict, base: dict, flops_per_s: float, bytes_per_s: float) -> None:
    m, b = case["median"], base["median"]
    measured = {"prefill": _ratio(b["ttft_ms"], m["ttft_ms"]),
                "decode": _ratio(b["decode_ms_per_token"], m["decode_ms_per_token"]),
                "end_to_end": _ratio(b["end_to_end_ms"], m["end_to_end_ms"])}
    case["speedup"] = {"measured": measured}
    if case.get("work") is None:
        return
    ideal = ideal_speedups(case["work"], flops_per_s, bytes_per_s)
    case["roofline_ms"] = ideal["roofline_ms"]
    case["speedup"].update({
        "flops_ideal": ideal["flops"], "roofline_ideal": ideal["roofline"],
        "measured_over_flops_ideal": {k: _ratio(v, ideal["flops"][k]) for k, v in measured.items()},
        "measured_over_roofline": {k: _ratio(v, ideal["roofline"][k]) for k, v in measured.items()},
    })


def _overhead(cases: dict[str, dict]) -> dict | None:
    """``none`` attached vs the stock model: ratios of medians, the median of per-round ratios and its 95 %
    distribution-free interval (:func:`measure.median_interval`; None below 6 rounds); ``within_target``
    compares the ratio of medians with the target, ``target_resolved`` says whether the interval lies wholly
    on one side of it (False: the run's noise cannot tell)."""
    stock, none = cases.get(STOCK), cases.get("none")
    if stock is None or none is None:
        return None
    out: dict[str, Any] = {"target_end_to_end_ratio": OVERHEAD_TARGET}
    for key, name in (("end_to_end_ms", "end_to_end"), ("ttft_ms", "ttft"), ("decode_ms_per_token", "decode_per_token")):
        out[name + "_ratio"] = _ratio(none["median"][key], stock["median"][key])
        paired = measure.paired_ratios(none["repeats"][key], stock["repeats"][key])
        out[name + "_ratio_paired_median"] = measure.median(paired)
        out[name + "_ratio_paired_interval"] = measure.median_interval(paired)
    out["within_target"] = (out["end_to_end_ratio"] is not None and out["end_to_end_ratio"] <= OVERHEAD_TARGET)
    interval = out["end_to_end_ratio_paired_interval"]
    out["target_resolved"] = interval is not None and (interval[1] <= OVERHEAD_TARGET or interval[0] > OVERHEAD_TARGET)
    return out


def run_bench(model, spec: BenchSpec, label: str = "model", meta: dict | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Benchmark ``spec``'s methods x budgets on ``model`` against the same model unpruned.

    Args:
        model: a supported ``LlavaForConditionalGeneration``, or a Qwen2-VL / Qwen2.5-VL model
            (:data:`vtprune.bench.inputs.LAYOUTS`), in eval mode, on its device and dtype.
        spec: what to run (:class:`BenchSpec`).
        label: the model's name in the outputs.
        meta: extra fields for the result's ``meta`` (e.g. the command line).
        log: called with progress lines (default: silent).

    Returns:
        A JSON-serialisable dict: ``meta`` (date, host, device, versions, dtype, attention, shapes),
        ``spec``, ``ceilings`` (matrix rate FLOPs/s, bandwidth bytes/s), ``model_work`` (constant FLOPs and
        bytes), ``cases`` (per case: raw repeats and medians in ms, tokens/s, peak memory bytes, KV bytes,
        visual tokens, work, ``speedup`` measured / FLOPs-ideal / roofline-ideal / their ratios),
        ``overhead`` (none vs stock) and ``scoring`` (per case, ms per scored layer).

    Raises:
        ValueError: invalid spec, unknown method, budget out of range for this model, a video for a model
            that takes images only, frames or frame size the model cannot take
            (:func:`vtprune.bench.inputs.visual_tokens`).
        RuntimeError: non-finite logits, or a generation that did not produce ``new_tokens`` tokens.
    """
    import transformers

    from vtprune.adapters import adapter_for

    log = log or (lambda message: None)
    spec.validate()
    adapter = adapter_for(model)
    text_cfg = adapter.text_config
    n_visual = visual_tokens(model.config, spec.video_frames, spec.frame_size)
    unit = "image" if spec.video_frames is None else "video"
    cases = plan_cases(spec.methods, spec.budgets, n_visual, text_cfg.num_hidden_layers, unit)
    device = model.device
    inputs = synthetic_inputs(model, spec.batch, spec.prompt_tokens, spec.seed, device, spec.video_frames,
                              spec.frame_size)
    gc = generation_config(model, spec.new_tokens)
    started = datetime.datetime.now(datetime.UTC)
    load_start = _loadavg()

    case: Case | dict  # the loops below bind a Case, then a case's summary
    log(f"checking logits and counting the constant work ({len(cases)} cases)")
    _check_logits(model, inputs)
    work = model_work(model, inputs)
    for r in range(spec.warmup):
        for case in cases:
            log(f"warm-up {r + 1}/{spec.warmup}: {case.name}")
            _one_round(model, case, inputs, gc, device, None)
    log("measuring the ceilings (matmul rate, copy bandwidth)")
    before = _ceilings(device, model.dtype, spec)

    rounds: dict[str, list[dict]] = {c.name: [] for c in cases}
    for r in range(spec.repeats):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            log(f"round {r + 1}/{spec.repeats}: {case.name}")
            rounds[case.name].append(_one_round(model, case, inputs, gc, device, work))
    log("measuring the ceilings again")
    after = _ceilings(device, model.dtype, spec)
    ceilings = {key: _best(before[key], after[key], rate_key)
                for key, rate_key in (("matmul", "flops_per_s"), ("copy", "bytes_per_s"))}
    rate, bw = ceilings["matmul"]["flops_per_s"], ceilings["copy"]["bytes_per_s"]

    summary = {c.name: _summarise(c, rounds[c.name], spec.batch, spec.new_tokens) for c in cases}
    for case in summary.values():
        _speedups(case, summary[STOCK], rate, bw)
    reference = next((c for c in summary.values() if c.get("work")), None)
    if reference is not None:  # the stock model does the unpruned work
        summary[STOCK]["work"] = {"pruned": reference["work"]["unpruned"], "unpruned": reference["work"]["unpruned"],
                                  "decode_steps": reference["work"]["decode_steps"]}
        _speedups(summary[STOCK], summary[STOCK], rate, bw)

    scoring = {}
    for case in cases:
        if case.method is not None:
            log(f"scoring cost: {case.name}")
            scoring[case.name] = scoring_cost(model, case, inputs, gc, device)
            e2e = summary[case.name]["median"]["end_to_end_ms"]
            scoring[case.name]["share_of_end_to_end"] = _ratio(scoring[case.name]["total_ms"], e2e)
            scoring[case.name]["host_share_of_stock_end_to_end"] = _ratio(
                scoring[case.name]["hook_ms"] + scoring[case.name]["wrapper_ms"],
                summary[STOCK]["median"]["end_to_end_ms"])

    meta_out = {
        "label": label,
        "date": started.isoformat(timespec="seconds"),
        "host": platform.node() or "host",
        "device": str(device),
        "device_name": measure.device_name(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": text_cfg._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vtprune": __version__,
        "python": sys.version.split()[0],
        "visual_tokens_per_image": n_visual if unit == "image" else None,
        "visual_kind": unit,
        "visual_tokens_per_unit": n_visual,
        "video_frames": spec.video_frames,
        "frame_size": frame_size_of(model.config, spec.frame_size),
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "decoder": {"hidden": text_cfg.hidden_size, "layers": text_cfg.num_hidden_layers,
                    "heads": text_cfg.num_attention_heads, "intermediate": text_cfg.intermediate_size,
                    "vocab": text_cfg.vocab_size},
        "wall_s": None,
        "loadavg_1min": {"start": load_start, "end": _loadavg(),
                         "note": "system load average (os.getloadavg); above the cores used, other processes "
                                 "competed for the CPU during the run"},
        **(meta or {}),
    }
    meta_out["wall_s"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    return {"meta": meta_out, "spec": dataclasses.asdict(spec), "ceilings": ceilings, "model_work": work.to_dict(),
            "cases": list(summary.values()), "overhead": _overhead(summary), "scoring": scoring}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def default_out_dir(label: str, root: str | Path | None = None, date: str | None = None) -> Path:
    """``<root>/benchmarks/results/<date>-<host>-bench-<label>`` (root: the current directory; date: today UTC)."""
    date = date or datetime.datetime.now(datetime.UTC).date().isoformat()
    host = (platform.node() or "host").split(".")[0]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)
    return Path(root or Path.cwd()) / "benchmarks" / "results" / f"{date}-{host}-bench-{safe}"
