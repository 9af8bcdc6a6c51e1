"""Latency / memory benchmark of visual-token methods against the unpruned model (issue 5).

- :mod:`~vtprune.bench.archs`: LLaVA and Qwen2.5-VL architectures with random weights (``llava-1.5-7b``,
  ``llava-1.5-13b``, ``llava-cpu-small``, ``tiny``, ``qwen2.5-vl-7b``, ``qwen2.5-vl-cpu-small``, ``qwen2.5-vl-tiny``);
- :mod:`~vtprune.bench.inputs`: synthetic prompts (text tokens around one image or one video, random pixels);
- :mod:`~vtprune.bench.measure`: synchronized timers, peak memory, matrix-rate / bandwidth ceilings;
- :mod:`~vtprune.bench.ideal`: FLOPs-ideal and roofline-ideal speedups from the ledger;
- :mod:`~vtprune.bench.runner`: the protocol (cases round-robin, medians, overhead, scoring cost);
- :mod:`~vtprune.bench.report`: JSON, Markdown and PNG outputs (and, for videos, the saving vs frames).

The command is ``vtprune bench`` (:mod:`vtprune.cli`).
"""

from vtprune.bench.archs import ARCHS, arch_config, build_model
from vtprune.bench.runner import BenchSpec, default_out_dir, plan_cases, run_bench

__all__ = ["ARCHS", "arch_config", "build_model", "BenchSpec", "default_out_dir", "plan_cases", "run_bench"]
