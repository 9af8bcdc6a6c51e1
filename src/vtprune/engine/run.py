"""A method attached to a model: :class:`Run`.

Per model call the run's :class:`~vtprune.engine.lifecycle.Lifecycle` decides the phase: a prefill (a new
:class:`~vtprune.engine.state.Generation`, the method's plan resolved for its visual tokens; also a later
turn on a cache the run filled), or a decode step (one new token on that generation's cache); it also
wraps ``generate`` and lets the cache go when a call ends. Before each decoder layer the run asks the method for its score
request and its actions (:mod:`vtprune.engine.decisions`), given a read-only
:class:`~vtprune.engine.view.GenerationView` and the plan, applies the actions, and rewrites the layer's
call for the sequence or cache it now holds (:mod:`vtprune.engine.rewrite`). Layers whose sequence and
cache are the stock ones are left untouched, so with nothing pruned the model computes exactly what it
computes without vtprune. Every hook is in :mod:`vtprune.engine.hooks`; the report is a
:class:`~vtprune.engine.report.Report`.

Public seams (what tools use): :meth:`Run.report`, ``on_report`` / ``on_error`` callbacks, the opt-in
host-time ``profile`` (:mod:`vtprune.engine.profile`), :attr:`Run.plan`, :meth:`Run.kept_visual` and
:meth:`Run.visual_grid`. ``Run.gen`` is the engine's own state (tests inspect it; tools do not).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch

from vtprune.adapters import adapter_for
from vtprune.engine import attention
from vtprune.engine.calls import find_cache, hidden_states_of, input_ids_of
from vtprune.engine.hooks import Hooks, hub_kernel_replacements
from vtprune.engine.interface import MethodLike, Plan
from vtprune.engine.layout import PAD, Layout
from vtprune.engine.ledger import Dims, Ledger, Timer
from vtprune.engine.lifecycle import Lifecycle
from vtprune.engine.outputs import restore_lm_output
from vtprune.engine.profile import HostProfile
from vtprune.engine.report import Report
from vtprune.engine.rewrite import LayerRewrite
from vtprune.engine.state import Generation
from vtprune.engine.view import GenerationView

SUPPORTED_ATTENTION = ("sdpa", "eager", *attention.FLASH)
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the run attached to it


class Run:
    """A method attached to a model. Use as a context manager (``with vtprune.apply(...) as run``) or call
    :meth:`detach` yourself. :meth:`report` describes the last generation.

    Args:
        model: a supported HF multimodal model (``vtprune.adapters``).
        method: the method (options) to run, an instance of a registered method class.
        on_report: called with the :class:`Report` after every ``model.generate`` under the run.
        on_error: called with the exception raised inside a ``model.generate`` under the run (before it
            propagates), e.g. by a harness whose generate loop swallows errors.
        profile: keep a host-time profile of the run's hooks, wrapper and scoring in :attr:`profile`
            (:mod:`vtprune.engine.profile`; its synchronisations perturb timings: profile untimed runs).

    Raises:
        TypeError: unsupported model class. ValueError: an option out of range for this model (layers vs
            its depth; budget vs its visual tokens per image where the config fixes them).
    """

    def __init__(self, model: torch.nn.Module, method: MethodLike, *,
                 on_report: Callable[[Report], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, profile: bool = False):
        # Any: the run reads dtype, device, generation_config and (re)sets generate, which nn.Module's type
        # does not have (its __getattr__ says Tensor | Module)
        self.model: Any = model
        self.adapter = adapter_for(model)  # TypeError for unsupported classes
        self.method = method
        self.dims = Dims.from_config(self.adapter.text_config)
        method.check_layers(self.dims.layers)
        per_image = self.adapter.tokens_per_image()
        self._plans: dict[int, Plan] = {}
        self.plan: Plan | None = self.plan_for(per_image) if per_image else None
        self.on_report, self.on_error = on_report, on_error
        self.profile: HostProfile | None = HostProfile() if profile else None
        self.gen: Generation | None = None  # the last generation (tests inspect it; tools do not)
        self.view: GenerationView  # what the method sees of it (set with gen)
        self.ledger: Ledger | None = None
        self.timers: dict[str, Timer] = {}
        self.saliency_sink: list[torch.Tensor] = []  # the adapter's saliency hooks append here
        self.life = Lifecycle(self)
        self._hooks: Hooks | None = None
        self._rewrite: LayerRewrite | None = None
        self._counted: tuple | None = None
        self._taken = None  # language-model inputs the adapter re-applies per layer (take_language_model_inputs)
        self._call_mask = None  # the attention mask of the decode call in progress
        self.windows = [self.adapter.sliding_window(i) for i in range(self.dims.layers)]  # W per layer or None

    def plan_for(self, n_visual: int) -> Plan:
        """The method's plan for ``n_visual`` visual tokens per image (resolved once per count)."""
        if n_visual not in self._plans:
            self._plans[n_visual] = self.method.plan(self.dims.layers, n_visual)
        return self._plans[n_visual]

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> Run:
        """Attach every hook (:mod:`vtprune.engine.hooks`) and the ``generate`` wrapper; returns self.

        Raises:
            ValueError: an attention implementation other than sdpa, eager or FlashAttention-2 / -3, or hub
                kernels (transformers' ``use_kernels``) that replaced the forward of a module the run hooks:
                the model, its language model, a decoder layer or its attention module
                (:func:`~vtprune.engine.hooks.hub_kernel_replacements`). Nothing stays attached then.
        """
        if self._hooks is not None:
            return self
        other = _ATTACHED.get(self.model)
        if other is not None or str(self.adapter.text_config._attn_implementation).startswith(attention.PREFIX):
            name = other.method.name if other is not None else "unknown"
            raise ValueError(f"vtprune: a run (method {name!r}) is already attached to this model; one run at a time: "
                             "leave its `with vtprune.apply(...)` block or call its detach() first (nothing was changed)")
        impl = self.adapter.text_config._attn_implementation or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {impl!r} is not supported yet; load the model with "
                             f"attn_implementation one of {list(SUPPORTED_ATTENTION)}")
        model, lm = self.model, self.adapter.language_model
        layers = list(self.adapter.decoder_layers)
        hooked = [model, lm, *layers, *(cast(torch.nn.Module, layer.self_attn) for layer in layers)]
        replaced = hub_kernel_replacements(model, hooked)
        if replaced:
            raise ValueError(f"hub kernels replaced the forward of modules vtprune hooks: {', '.join(replaced)}; "
                             f"load the model with from_pretrained(..., use_kernels=False), or set "
                             f"model.use_kernels = False (kernels on other layers, such as norms, are accepted)")
        hooks = Hooks(self.profile)
        try:
            hooks.pre(model, self._on_call)
            hooks.post(model, self._after_call)
            hooks.pre(lm, self._on_lm)
            hooks.post(lm, self._after_lm)
            for i, layer in enumerate(layers):
                hooks.pre(layer, functools.partial(self._on_layer, i), per_layer=True)
                hooks.listen(cast(torch.nn.Module, layer.self_attn), self._on_attention)
            if self.method.needs_saliency:
                hooks.keep(self.adapter.attach_saliency(self.saliency_sink.append))
            hooks.switch_attention(self.adapter.text_config, impl)
            self.life.wrap()
        except BaseException:
            hooks.remove()
            raise
        self._rewrite = LayerRewrite(impl, self.model.dtype)
        self._hooks = hooks
        _ATTACHED[self.model] = self
        return self

    def detach(self) -> None:
        """Remove every hook, listener and override; the model is the stock model again."""
        if self._hooks is None:
            return
        self._hooks.remove()
        self._hooks = None
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self.life.unwrap()

    def __enter__(self) -> Run:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ model hooks
    def _on_call(self, module, args, kwargs):
        phase, record = self.life.phase(args, kwargs)
        assert self._hooks is not None  # attached: this hook is one of them
        if phase == "decode":
            gen = self.gen
            assert gen is not None  # a decode step of the generation in progress
            gen.phase, gen.step = "decode", gen.step + 1
            self._call_mask = kwargs.get("attention_mask")
            gen.logits = {}
            self._hooks.layers(self._layers_needed(gen))
            self.timers["decode"].start()
            return None
        self._hooks.layers(True)
        input_ids = input_ids_of(args, kwargs)
        self.life.start(input_ids, kwargs.get("attention_mask"),
                        {**kwargs, "generate_kwargs": self.life.generate_kwargs}, record)
        self._counted, self._taken = None, None
        assert self._rewrite is not None  # set by attach(), before any hook runs
        self._rewrite.reset()
        self.timers["prefill"].start()
        return None

    def _layers_needed(self, gen: Generation) -> bool:
        """Whether this decode step needs the per-layer hooks: the method may score or act at it, or some
        layer's cache differs from the stock one and its call needs the engine's mask (padding, eager) or
        window (a sliding window). Otherwise the layers run as stock: with no padding, SDPA and
        FlashAttention need no mask for one query over any cache length, and the language model gets none
        (:meth:`_on_lm`)."""
        if not gen.inert and self.method.acts_at_decode_step(self.view, self.plan):
            return True
        if gen.stock:
            return False
        assert self._rewrite is not None  # set by attach()
        return self._rewrite.decode_mask_needed(gen) or gen.windows is not None

    def _after_call(self, module, args, kwargs, output):
        gen = self.gen
        if gen is None:
            return None
        if gen.phase == "prefill":
            self.timers["prefill"].stop()
            for layer in range(gen.num_layers):
                if gen.layouts[layer] is not None and not gen.stock_at[layer]:
                    # casts: mypy does not narrow list items; layer_visual[layer] is set with layouts[layer]
                    gen.cache_index[layer] = gen.with_prior(layer, cast(Layout, gen.layouts[layer]).index)
                    gen.cache_visual[layer] = cast(torch.Tensor, gen.layer_visual[layer])
            if gen.windows is not None:
                gen.windows.end_prefill(gen)
            gen.hidden = None
            if gen.cache is not None and self.life.calls is None:
                self.life.remember(gen)  # outside generate: a later call may continue from this cache
        else:
            self.timers["decode"].stop()
            assert self.ledger is not None  # set with gen
            self.ledger.decode_step([v.shape[-1] * gen.n_images for v in gen.cache_visual])
            self.life.count_step(gen)
        return None

    def _on_lm(self, module, args, kwargs):
        gen = self.gen
        if gen is None:
            return None
        if gen.phase == "prefill":
            self._taken = self.adapter.take_language_model_inputs(kwargs)
            return (args, kwargs) if self._taken is not None else None
        # the 2-D padding mask of this step: the model call's (generate passes it), else the language model's
        # when it is 2-D (not a prepared 4-D mask or a dict of them, as Gemma 3's), else nothing is padded
        mask = next((m for m in (self._call_mask, kwargs.get("attention_mask")) if torch.is_tensor(m) and m.dim() == 2),
                    None)
        gen.valid = (mask.bool() if mask is not None else
                     torch.ones(gen.batch_size, gen.prompt_length + gen.step, dtype=torch.bool, device=gen.valid.device))
        assert self._rewrite is not None  # set by attach()
        self._rewrite.new_step()
        if not gen.stock:
            kwargs["attention_mask"] = None  # every layer gets its own mask from _on_layer
            return args, kwargs
        return None

    def _after_lm(self, module, args, kwargs, output):
        """Outside ``generate`` (which reads the last position only, so pays nothing here), a pruned
        prefill's last hidden state back at the original positions, NaN at pruned tokens, before the model's
        head (:mod:`vtprune.engine.outputs`)."""
        gen = self.gen
        if gen is None or gen.phase != "prefill" or self.life.calls is not None:
            return None
        layout = gen.layout if not gen.offset else Layout(gen.layout.index - gen.offset, gen.layout.group)
        return restore_lm_output(output, layout, gen.prompt_length - gen.offset)  # this call's positions

    # ------------------------------------------------------------------ layer hooks
    def _on_layer(self, layer, module, args, kwargs):
        gen = self.gen
        if gen is None:
            return None
        gen.layer = layer
        if gen.phase == "prefill":
            return self._prefill_layer(layer, args, kwargs)
        return self._decode_layer(layer, args, kwargs)

    def _act(self, actions) -> None:
        assert self.gen is not None  # called from the layer hooks, inside a generation
        for action in actions or ():
            action.apply(self.gen)

    def _prefill_layer(self, layer, args, kwargs):
        gen = self.gen
        assert gen is not None and self._rewrite is not None  # _on_layer checked gen; attach() set _rewrite
        if layer == 0:
            self._first_layer(gen, args, kwargs)
        hidden = hidden_states_of(args, kwargs)
        if self._taken is not None:  # inputs of the language model that follow the sequence (DeepStack)
            hidden = self.adapter.layer_input(layer, hidden, gen.layout.index, gen.layout.group, self._taken)
        gen.hidden = hidden
        if not gen.inert:
            self._act(self.method.on_prefill_layer(self.view, self.plan))
        if not gen.stock:
            if gen.windows is not None:
                gen.windows.record_packed(gen)
            self._rewrite.prefill(gen, kwargs)
        gen.layouts[layer] = gen.layout
        gen.stock_at[layer] = gen.stock
        gen.layer_visual[layer] = gen.visual
        self._record_prefill()
        gen.requests[layer] = None if gen.inert else self.method.score_request(self.view, self.plan)
        if gen.hidden is not hidden_states_of(args, kwargs):
            if args:
                args = (gen.hidden, *args[1:])
            else:
                kwargs["hidden_states"] = gen.hidden
        return args, kwargs

    def _first_layer(self, gen: Generation, args, kwargs) -> None:
        """Before prefill layer 0: the cache the model writes, and the saliency the vision tower gave."""
        self.life.follow(gen, find_cache(args, kwargs))
        if self.method.needs_saliency and not gen.inert:
            gen.set_saliency(self.saliency_sink, self.adapter.saliency_modalities)
            self.saliency_sink.clear()

    def _record_prefill(self) -> None:
        """Count the current prefill layer's tokens in the ledger: per sample (shared prefix, path-1 tail,
        path-2 tail) real tokens, and the visual tokens present (counted once per layout)."""
        gen = self.gen
        assert gen is not None and self.ledger is not None  # a prefill layer of the current generation
        lay = gen.layout
        if self._counted is None or self._counted[0] is not lay:
            if lay.group is None:
                counts = [(lay.length - p, 0, 0) for p in self.ledger.pads]  # this call's padding
            else:
                g = lay.group
                valid = torch.gather(gen.valid, 1, lay.index.to(gen.valid.device)).to(g.device) & (g != PAD)
                counts = list(zip(((g == 0) & valid).sum(1).tolist(), (g == 1).sum(1).tolist(),
                                  (g == 2).sum(1).tolist(), strict=True))
            visual = gen.n_images * (gen.visual.shape[-1] if gen.paths is None else gen.n_visual)
            self._counted = (lay, counts, [visual] * gen.batch_size)
        self.ledger.prefill_layer(*self._counted[1:])

    def _decode_layer(self, layer, args, kwargs):
        gen = self.gen
        assert gen is not None and self._rewrite is not None  # _on_layer checked gen; attach() set _rewrite
        if gen.windows is not None:
            gen.windows.follow(gen, layer)  # before the method evicts from this layer's cache
        if not gen.inert:
            self._act(self.method.on_decode_layer(self.view, self.plan))
            gen.requests[layer] = self.method.score_request(self.view, self.plan)
        if gen.stock:
            return None
        self._rewrite.decode(gen, layer, kwargs)
        return args, kwargs

    def _on_attention(self, module, query, key, mask, scaling):
        gen = self.gen
        if gen is None:
            return
        layer = module.layer_idx
        request = gen.requests.get(layer)
        if request is None:
            return
        score = attention.row_logits if self.profile is None else self.profile.timed_scoring(attention.row_logits)
        gen.logits[layer] = score(query, key, request.rows(gen, query), mask, scaling)

    # ------------------------------------------------------------------ public seams
    def _check_single_generation(self) -> Generation:
        if self.gen is None:
            raise RuntimeError("no generation has run under this vtprune run yet")
        if self.life.group_report is not None:
            raise RuntimeError("the last batch mixed image sizes and ran as groups "
                               f"{self.life.group_report.timing['groups']}; ask after a batch of one size")
        return self.gen

    def kept_visual(self, sample: int = 0, image: int = 0) -> list[list[int]]:
        """Which visual tokens of one image each decoder layer's prefill sequence held in the last
        generation (with packed paths: path 1's, which continues after the merge, in every layer).

        Returns:
            One list per layer l = 0..L-1 of positions among the image's N_v tokens (0 .. N_v-1,
            ascending). A merged token is listed at the position it sits at.

        Raises:
            RuntimeError: no generation yet, or the last batch ran as groups of alike samples (mixed
            image sizes; each group was its own generation). IndexError: ``sample`` / ``image`` out of range.
        """
        gen = self._check_single_generation()
        if not (0 <= sample < gen.batch_size and 0 <= image < gen.n_images):
            raise IndexError(f"sample {sample} / image {image} out of range ({gen.batch_size} samples, "
                             f"{gen.n_images} images each)")
        all_tokens = gen.visual_index[sample, image]
        kept = [vis for vis in gen.layer_visual if vis is not None]
        if len(kept) != len(gen.layer_visual):
            raise RuntimeError("the last generation's prefill did not run through every decoder layer (it failed "
                               "or was cut short): no kept tokens to report")
        return [torch.searchsorted(all_tokens, vis[sample, image].to(all_tokens.device)).tolist() for vis in kept]

    def visual_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of each image's visual tokens as one row-major patch grid in the last generation
        (from the adapter), or None when they form no single grid. Raises as :meth:`kept_visual`."""
        return self._check_single_generation().visual_grid

    def report(self) -> Report:
        """What the last generation kept and what it saved (:class:`~vtprune.engine.report.Report`): per
        sample the visual tokens per layer at prefill and at the last decode step, equivalent and final
        budget, FLOPs of prefill and decode vs the unpruned model in both conventions
        (:mod:`vtprune.engine.ledger`), KV-cache bytes; for the batch the KV bytes measured on the cache
        tensors and the timings (ms). A batch that ran as groups of alike samples gets the groups'
        reports merged (:meth:`Report.merge`). Raises RuntimeError before any generation."""
        if self.life.group_report is not None:
            return self.life.group_report
        if self.gen is None:
            raise RuntimeError("no generation has run under this vtprune run yet")
        assert self.ledger is not None  # set with gen
        return Report.of(self.method, self.plan, self.gen, self.ledger, self.timers, self.life.generate_ms,
                         str(self.model.device))

def check_model(model: torch.nn.Module, method: MethodLike, visual_tokens: int | None = None) -> Plan | None:
    """The plan of ``method`` on ``model`` without attaching anything: resolved for ``visual_tokens`` per
    image, or for the count the model's config fixes; None when neither is known (the count follows the
    image size: then only the options that depend on the depth are checked). Raises as :class:`Run`."""
    run = Run(model, method)
    if visual_tokens is not None:
        return run.plan_for(visual_tokens)
    return run.plan


__all__ = ["Run", "check_model", "SUPPORTED_ATTENTION"]
