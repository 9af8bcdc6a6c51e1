"""An opt-in host-time profile of a run (``vtprune.apply(..., profile=True)``): what vtprune itself costs.

It times, with ``time.perf_counter``, every call of the engine's hooks (the model, language-model and
decoder-layer pre-hooks, the model's and the language model's forward hooks and the attention listener;
the method's own work in them included) and of the ``generate`` wrapper outside the model's own
``generate``; and every partial-attention scoring call (:func:`vtprune.engine.attention.row_logits`)
between two device synchronisations, so that its time on a GPU is the kernels' and not only their launch.
Those synchronisations perturb a timed run: profile an extra, untimed generation (as ``vtprune bench``
does).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class HostProfile:
    """Accumulated host time of one attached run, over every generation since attach or :meth:`reset`.

    Attributes:
        hook_calls: calls of the engine's hooks.
        hook_ms: host ms inside them (scoring included).
        wrapper_ms: host ms in vtprune's ``generate`` wrapper outside the model's own ``generate``.
        scoring: one ``(query rows of the layer's call, ms)`` per scoring call: query length > 1 in the
            prefill, 1 per decode step.
    """

    hook_calls: int = 0
    hook_ms: float = 0.0
    wrapper_ms: float = 0.0
    scoring: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        """Forget everything measured so far."""
        self.hook_calls, self.hook_ms, self.wrapper_ms = 0, 0.0, 0.0
        self.scoring.clear()

    def timed_hook(self, fn: Callable) -> Callable:
        """``fn`` with its host time added to ``hook_ms`` (one ``hook_calls`` per call)."""
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.hook_ms += (time.perf_counter() - t0) * 1000.0
                self.hook_calls += 1
        return wrapper

    def timed_scoring(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``row_logits`` timed between device synchronisations (see the module docstring)."""
        @functools.wraps(fn)
        def wrapper(query: torch.Tensor, *args: Any) -> torch.Tensor:
            sync = torch.cuda.synchronize if query.is_cuda else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = fn(query, *args)
            sync()
            self.scoring.append((query.shape[2], (time.perf_counter() - t0) * 1000.0))
            return out
        return wrapper
