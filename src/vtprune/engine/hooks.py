"""Every hook a run attaches, in one place, and removed together (also on an exception).

A run attaches: a forward pre-hook and a forward hook on the model (phase detection, timers), a forward
pre-hook on the language model (the decode mask) and a forward hook on it (outside ``generate``, a pruned
prefill's output back at the original positions), a forward pre-hook on each decoder layer (the method's
stages and the layer's rewrite), a listener on each decoder layer's attention module (scoring beside
the kernel, :mod:`vtprune.engine.attention`), the adapter's saliency hooks on the vision tower when the
method needs them, and the language model's attention implementation switched to the scoring entry.
They compose with other hooks on the same modules (accelerate's ``AlignDevicesHook`` included): a
pre-hook that returns nothing leaves the call as it came.

The per-layer part (the decoder layers' pre-hooks and the scoring entry) can be taken off and put back
between model calls (:meth:`Hooks.layers`): a decode step on which the method neither scores nor acts,
and whose layers need no mask of the engine's, runs the stock decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vtprune.engine import attention
from vtprune.engine.profile import HostProfile


def hub_kernel_replacements(model: nn.Module, hooked: list[nn.Module]) -> list[str]:
    """The modules among ``hooked`` (those a run hooks) whose ``forward`` a hub kernel replaced, as
    ``"name (repository)"`` with the name ``model.named_modules()`` gives it; empty when none did.

    Hub kernels (the ``kernels`` package; transformers >= 5.25's ``from_pretrained`` attaches them by
    default, ``use_kernels=True``) replace the ``forward`` of layers whose class is marked for it with one
    downloaded for the model's device; ``kernels.get_kernelized_layers`` lists them. A replaced decoder layer
    or attention module need not call the attention implementation the run scores through, nor take the
    arguments the run rewrites. Kernels on other modules (norms, activations, the rotary function) leave
    those seams as they are. Without the ``kernels`` package (transformers < 5.25) no module is replaced.
    """
    try:
        from kernels import get_kernelized_layers
    except ImportError:
        return []
    ids = {id(m) for m in hooked}
    return [f"{name or '(the model)'} ({layer.repo})" for name, layer in get_kernelized_layers(model).layers.items()
            if id(layer.module) in ids]


class Hooks:
    """The handles of one run's hooks. With a :class:`~vtprune.engine.profile.HostProfile`, every hook's
    host time is added to it."""

    def __init__(self, profile: HostProfile | None = None):
        self.profile = profile
        self._handles: list = []
        self._listened: list[nn.Module] = []
        self._attention: tuple[Any, str, str] | None = None  # (the LM's config, its attention, the scoring entry)
        self._layer_hooks: list[tuple[nn.Module, Callable]] = []  # per-layer pre-hooks, put on by layers(True)
        self._layer_handles: list = []
        self._layers_on = False

    def _timed(self, fn: Callable) -> Callable:
        return self.profile.timed_hook(fn) if self.profile is not None else fn

    def pre(self, module: nn.Module, fn: Callable, *, per_layer: bool = False) -> None:
        """``fn(module, args, kwargs)`` before each forward of ``module`` (may return new (args, kwargs)).
        ``per_layer``: one of the hooks :meth:`layers` takes off and puts back (attached now)."""
        if not per_layer:
            self._handles.append(module.register_forward_pre_hook(self._timed(fn), with_kwargs=True))
            return
        hook = self._timed(fn)
        self._layer_hooks.append((module, hook))
        self._layer_handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self._layers_on = True

    def post(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs, output)`` after each forward of ``module``."""
        self._handles.append(module.register_forward_hook(self._timed(fn), with_kwargs=True))

    def listen(self, attention_module: nn.Module, fn: Callable) -> None:
        """``fn(module, query, key, mask, scaling)`` after each attention call of ``attention_module``."""
        attention.listen(attention_module, self._timed(fn))
        self._listened.append(attention_module)

    def keep(self, handles: list) -> None:
        """Remove ``handles`` (from ``register_*_hook``) with the others."""
        self._handles.extend(handles)

    def switch_attention(self, config, original: str) -> None:
        """Make the language model (whose config is ``config``) run the scoring entry of its ``original``
        attention implementation, ``vtprune_<original>`` (:func:`vtprune.engine.attention.register`);
        undone by :meth:`remove`. The config's attention field is set directly, as transformers' model
        code reads it, not through ``set_attn_implementation``: that also re-checks the kernels' install
        (FlashAttention's) on every switch, and the switch is transient. Raises ValueError for an
        implementation transformers does not know."""
        name = attention.register(original)
        config._attn_implementation = name
        self._attention = (config, original, name)

    def layers(self, on: bool) -> None:
        """Put the per-layer hooks and the scoring entry on (True) or take them off (False; the language
        model runs its own attention implementation, the listeners are not called). Nothing happens
        when they already are so. Put back, the pre-hooks run after any pre-hook registered on the same
        layer since."""
        if on == self._layers_on:
            return
        if on:
            self._layer_handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in self._layer_hooks]
        else:
            for handle in self._layer_handles:
                handle.remove()
            self._layer_handles = []
        if self._attention is not None:
            config, original, scoring = self._attention
            config._attn_implementation = scoring if on else original
        self._layers_on = on

    def remove(self) -> None:
        """Remove every hook and listener and restore the attention implementation."""
        for handle in self._handles + self._layer_handles:
            handle.remove()
        self._handles.clear()
        self._layer_handles, self._layer_hooks, self._layers_on = [], [], False
        for module in self._listened:
            attention.unlisten(module)
        self._listened.clear()
        if self._attention is not None:
            config, original, _ = self._attention
            config._attn_implementation = original
            self._attention = None
