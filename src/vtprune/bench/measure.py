"""Measuring primitives: synchronized wall-clock timers, peak memory, the machine's two roofline
ceilings (matrix rate and memory bandwidth, measured in the run's dtype on the run's device), FLOPs of
a call (torch's FlopCounterMode) and parameter bytes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels (``torch.cuda.synchronize`` on CUDA; no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device | str):
    """Run ``fn()`` between two device synchronisations. Returns ``(ms, fn's result)`` (wall-clock ms)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1000.0, out


class StepClock(StoppingCriteria):
    """A ``transformers`` stopping criterion that never stops and records, after each generated token, a
    synchronized ``time.perf_counter()`` in ``times`` (seconds; one entry per new token).

    Generate calls its stopping criteria once per step, right after the step's token is chosen, so
    ``times[0]`` marks the first token (vision encoder + prefill + first sampling) and the differences
    the decode steps. The synchronisation adds nothing on CPU; on CUDA, generate already waits for the
    device every step (to test whether all sequences have finished)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        # cast: torch types a bool tensor as Tensor; transformers' signature says BoolTensor
        return cast(torch.BoolTensor, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device))


def timed_generate(model, inputs: dict, generation_config, device: torch.device | str):
    """One ``model.generate(**inputs, generation_config=...)`` between device synchronisations, with a
    :class:`StepClock`.

    Returns:
        ``(timing, output_ids)`` with timing ``{"ttft_ms", "decode_ms_per_token" (None for one new token),
        "end_to_end_ms", "new_tokens"}`` in wall-clock ms; output_ids LongTensor [B, S + new tokens].
    """
    clock = StepClock(device)
    synchronize(device)
    t0 = time.perf_counter()
    ids = model.generate(**inputs, generation_config=generation_config, stopping_criteria=StoppingCriteriaList([clock]))
    synchronize(device)
    t1 = time.perf_counter()
    times = clock.times
    n = len(times)
    return {"ttft_ms": (times[0] - t0) * 1000.0 if times else None,
            "decode_ms_per_token": (times[-1] - times[0]) * 1000.0 / (n - 1) if n > 1 else None,
            "end_to_end_ms": (t1 - t0) * 1000.0, "new_tokens": n}, ids


def median(values):
    """Median of the non-None values, or None if there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def paired_ratios(numerators, denominators) -> list[float]:
    """Round-by-round ratios ``a / b`` of two cases timed in the same rounds (``strict``: one value per
    round each), leaving out rounds where ``a`` is None or ``b`` is None or 0."""
    return [a / b for a, b in zip(numerators, denominators, strict=True) if a is not None and b]


def median_interval(values, level: float = 0.95):
    """Distribution-free confidence interval of the median of ``values`` (the non-None ones).

    The interval between the j-th smallest and the j-th largest value, j the largest rank with
    P(Binomial(n, 1/2) <= j - 1) <= (1 - level) / 2: it covers the true median with probability >= ``level``
    whatever the distribution, for independent values (Conover, Practical Nonparametric Statistics, 3.6).
    Used on per-round paired ratios, so drift shared by the two cases of a round cancels.

    Returns:
        ``(low, high)``, or None when fewer values are given than any such interval needs (6 at 0.95).
    """
    vals = sorted(v for v in values if v is not None)
    n, tail, cdf, j = len(vals), (1.0 - level) / 2.0, 0.0, 0
    while j < n:  # cdf = P(X <= j - 1) before the step
        nxt = cdf + math.comb(n, j) / 2.0 ** n
        if nxt > tail:
            break
        cdf, j = nxt, j + 1
    return (vals[j - 1], vals[n - j]) if j >= 1 else None


# ---------------------------------------------------------------------------------------- memory
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
CPU_MEMORY_NOTE = ("peak resident set size (VmHWM, reset through /proc/self/clear_refs before the call) minus the "
                   "RSS before it; a lower bound of the call's working memory, because pages the allocator kept "
                   "from earlier calls are reused without raising the peak")


def _status_kb(field: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in {_PROC_STATUS}")


class PeakMemory:
    """Peak memory of a block, as a context manager; the result is in ``self.result``:

    - CUDA: ``{"kind": "cuda_max_memory_allocated", "peak_bytes", "delta_bytes", "note"}``: the
      allocator's peak (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) and
      that peak minus the bytes allocated before the block (weights and inputs excluded);
    - CPU (Linux): ``{"kind": "cpu_peak_rss", "peak_bytes", "delta_bytes", "note"}`` (see
      :data:`CPU_MEMORY_NOTE`);
    - otherwise ``{"kind": None, "peak_bytes": None, "delta_bytes": None, "note": <reason>}``.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.result: dict = {"kind": None, "peak_bytes": None, "delta_bytes": None, "note": "not measured"}

    def __enter__(self) -> PeakMemory:
        self._base = None
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            try:
                _CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
                self._base = _status_kb("VmRSS") * 1024
            except OSError as e:
                self.result["note"] = f"CPU peak RSS unavailable: cannot reset it through {_CLEAR_REFS} ({e})"
        else:
            self.result["note"] = f"no peak-memory counter for device type {self.device.type!r}"
        return self

    def __exit__(self, *exc) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"kind": "cuda_max_memory_allocated", "peak_bytes": peak, "delta_bytes": peak - self._base,
                           "note": "torch.cuda.max_memory_allocated; delta = peak minus bytes allocated before the call"}
        else:
            try:
                peak = _status_kb("VmHWM") * 1024
            except OSError as e:
                self.result["note"] = f"CPU peak RSS unavailable ({e})"
                return
            self.result = {"kind": "cpu_peak_rss", "peak_bytes": peak, "delta_bytes": peak - self._base,
                           "note": CPU_MEMORY_NOTE}


# ---------------------------------------------------------------------------------------- ceilings
def default_matmul_size(device: torch.device | str) -> int:
    """Side n of the square matmul used for the matrix rate: 8192 on CUDA, 2048 elsewhere."""
    return 8192 if torch.device(device).type == "cuda" else 2048


def default_copy_bytes(device: torch.device | str) -> int:
    """Bytes of the tensor copied for the bandwidth: 2 GiB on CUDA, 256 MiB elsewhere."""
    return (2 << 30) if torch.device(device).type == "cuda" else (256 << 20)


def matmul_rate(device: torch.device | str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> dict:
    """The machine's matrix rate: ``n x n @ n x n`` in ``dtype`` on ``device``, best of ``repeats`` after one
    warm-up (a ceiling, so the best run).

    Returns:
        ``{"flops_per_s", "n", "dtype", "flops_per_call", "ms": [per repeat]}``; FLOPs = 2 n^3.
    """
    n = n or default_matmul_size(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    ms = [timed(lambda: torch.matmul(a, b, out=out), device)[0] for _ in range(repeats)]
    flops = 2 * n**3
    return {"flops_per_s": flops / (min(ms) / 1000.0), "n": n, "dtype": str(dtype).removeprefix("torch."),
            "flops_per_call": flops, "ms": ms}


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 5) -> dict:
    """The machine's memory bandwidth: ``dst.copy_(src)`` of ``nbytes`` (read ``nbytes`` + write ``nbytes``),
    best of ``repeats`` after one warm-up.

    Returns:
        ``{"bytes_per_s", "size_bytes", "bytes_per_call", "ms": [per repeat]}``; bytes moved = 2 x size.
    """
    nbytes = nbytes or default_copy_bytes(device)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = [timed(lambda: dst.copy_(src), device)[0] for _ in range(repeats)]
    moved = 2 * src.numel() * 4
    return {"bytes_per_s": moved / (min(ms) / 1000.0), "size_bytes": src.numel() * 4, "bytes_per_call": moved, "ms": ms}


# ---------------------------------------------------------------------------------------- work
def count_flops(fn: Callable) -> int:
    """FLOPs of ``fn()`` counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions,
    attention), with SDPA forced to its math backend so that attention is counted on every device
    (the fused CPU kernel has no FLOP formula). Dense attention counts all (query, key) pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return int(counter.get_total_flops())


def param_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` (shared tensors counted once)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def device_name(device: torch.device | str) -> str:
    """A human-readable description of ``device``: the CUDA device name, or the CPU model and core count."""
    import os
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index or 0})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
