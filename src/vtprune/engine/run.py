"""A method attached to a model: :class:`Run`.

Per model call the run decides the phase: a call whose cache is empty is a prefill (a new
:class:`~vtprune.engine.state.Generation`, the method's plan resolved for its visual tokens); a one-token
call on that generation's cache is a decode step. The cache is found by its type among the call's
arguments (:mod:`vtprune.engine.calls`). Before each decoder layer the run asks the method for its score
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
from collections.abc import Callable
from typing import Any, cast

import torch

from vtprune.adapters import adapter_for
from vtprune.engine import attention
from vtprune.engine.calls import (
    find_cache,
    hidden_states_of,
    input_ids_of,
    missing_cache_error,
    without_cache,
)
from vtprune.engine.groups import generate_in_groups
from vtprune.engine.hooks import Hooks, hub_kernel_replacements
from vtprune.engine.interface import MethodLike, Plan
from vtprune.engine.layout import PAD, Layout
from vtprune.engine.ledger import Dims, Ledger, Timer
from vtprune.engine.profile import HostProfile
from vtprune.engine.report import Report
from vtprune.engine.rewrite import LayerRewrite
from vtprune.engine.state import Generation
from vtprune.engine.view import GenerationView

SUPPORTED_ATTENTION = ("sdpa", "eager", *attention.FLASH)


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
        self.plan: Plan | None = self._plan_for(per_image) if per_image else None
        self.on_report, self.on_error = on_report, on_error
        self.profile: HostProfile | None = HostProfile() if profile else None
        self.gen: Generation | None = None
        self.ledger: Ledger | None = None
        self._hooks: Hooks | None = None
        self._saliency: list[torch.Tensor] = []
        self._max_new_tokens: int | None = None
        self._generate_ms: float | None = None
        self._generate_kwargs: dict = {}  # of the generate call in progress (adapters read e.g. image_sizes)
        self._calls_in_generate: int | None = None  # model calls so far in the generate call in progress
        self._group_report: Report | None = None  # the merged report of a batch that ran as groups
        self._timers: dict[str, Timer] = {}
        self._rewrite: LayerRewrite | None = None
        self._counted: tuple | None = None
        self._taken = None  # language-model inputs the adapter re-applies per layer (take_language_model_inputs)
        self._call_mask = None  # the attention mask of the decode call in progress
        windows = [w for w in (self.adapter.sliding_window(i) for i in range(self.dims.layers)) if w]
        self._window: int | None = min(windows) if windows else None

    def _plan_for(self, n_visual: int) -> Plan:
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
            for i, layer in enumerate(layers):
                hooks.pre(layer, functools.partial(self._on_layer, i), per_layer=True)
                hooks.listen(cast(torch.nn.Module, layer.self_attn), self._on_attention)
            if self.method.needs_saliency:
                hooks.keep(self.adapter.attach_saliency(self._saliency.append))
            hooks.switch_attention(self.adapter.text_config, impl)
            self._had_generate = "generate" in model.__dict__
            self._orig_generate = model.generate
            model.generate = self._generate
        except BaseException:
            hooks.remove()
            raise
        self._rewrite = LayerRewrite(impl, self.model.dtype)
        self._hooks = hooks
        return self

    def detach(self) -> None:
        """Remove every hook, listener and override; the model is the stock model again."""
        if self._hooks is None:
            return
        self._hooks.remove()
        self._hooks = None
        if "generate" in self.model.__dict__ and not self._had_generate:
            del self.model.generate

    def __enter__(self) -> Run:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ generate wrapper
    def _generate(self, *args, **kwargs):
        """The model's ``generate`` under the run: mixed-size batches as groups, then the callbacks."""
        self._group_report = None
        try:
            out = self._generate_grouped(*args, **kwargs)
        except BaseException as e:
            if self.on_error is not None:
                self.on_error(e)
            raise
        if self.on_report is not None:
            self.on_report(self.report())
        return out

    def _generate_grouped(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        groups = self.adapter.batch_groups(ids, {**kwargs, "input_ids": ids}) if torch.is_tensor(ids) else None
        if not groups:
            return self._generate_batch(*args, **kwargs)
        if len(args) > 1:
            raise ValueError("vtprune: pass generate's arguments after input_ids by keyword")
        kwargs = {**kwargs, "input_ids": ids}
        reports = []

        def one_group(**sub):
            out = self._generate_batch(**sub)
            reports.append(self.report())
            return out

        merged = generate_in_groups(one_group, self.adapter, groups, kwargs, self._pad_token_id(kwargs))
        assert ids is not None  # a tensor: groups come only from tensor input_ids
        self._group_report = Report.merge([(g.samples, r) for g, r in zip(groups, reports, strict=True)], ids.shape[0])
        return merged

    def _pad_token_id(self, kwargs) -> int:
        cfg = kwargs.get("generation_config") or self.model.generation_config
        pad = kwargs.get("pad_token_id", getattr(cfg, "pad_token_id", None))
        if pad is None:
            eos = kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None))
            pad = eos[0] if isinstance(eos, list | tuple) and eos else eos
        return 0 if pad is None else int(pad)

    def _generate_batch(self, *args, **kwargs):
        cfg = kwargs.get("generation_config") or self.model.generation_config
        self._max_new_tokens = kwargs.get("max_new_tokens") or getattr(cfg, "max_new_tokens", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        max_length = kwargs.get("max_length") or getattr(cfg, "max_length", None)
        if self._max_new_tokens is None and ids is not None and max_length:
            self._max_new_tokens = max(1, max_length - ids.shape[1])
        self._saliency.clear()  # generate may run the vision tower before the prefill forward
        timer = Timer(self.model.device)
        timer.start()
        self._generate_kwargs = kwargs
        self._calls_in_generate = 0
        inner = Timer(self.model.device) if self.profile is not None else None
        try:
            if inner is not None:
                inner.start()
            return self._orig_generate(*args, **kwargs)
        finally:
            if inner is not None:
                inner.stop()
            timer.stop()
            self._generate_ms = timer.ms()[0]
            if inner is not None and self.profile is not None:
                self.profile.wrapper_ms += self._generate_ms - inner.ms()[0]
            self._max_new_tokens = None
            self._generate_kwargs = {}
            self._calls_in_generate = None
            self._release()

    def _release(self) -> None:
        """Let go of the finished generation's KV cache (measured first, for :meth:`report`) and the last
        step's scores. Holding the cache kept it alive between generate calls (at batch 16 on
        llava-cpu-small, 667 MiB until the next call replaced it)."""
        gen = self.gen
        if gen is None:
            return
        if gen.cache is not None:
            gen.kv_measured = _kv_of(gen.cache, self.dims.layers)
            gen.cache = None
        gen.logits = {}

    # ------------------------------------------------------------------ model hooks
    def _on_call(self, module, args, kwargs):
        input_ids = input_ids_of(args, kwargs)
        cache = find_cache(args, kwargs)
        if input_ids is None:
            raise ValueError("vtprune needs input_ids (it finds the visual tokens from the image token id); got inputs_embeds only")
        empty = cache is None or cache.get_seq_length() == 0
        gen = self.gen
        if self._calls_in_generate is not None:
            self._calls_in_generate += 1
            # a later call of this generate that is shorter than its prompt can only be a decode step
            if cache is None and self._calls_in_generate > 1 and gen is not None and input_ids.shape[1] < gen.prompt_length:
                raise missing_cache_error(kwargs)
        if not empty and gen is not None and cache is gen.cache and input_ids.shape[1] == 1:
            gen.phase, gen.step = "decode", gen.step + 1
            self._call_mask = kwargs.get("attention_mask")
            gen.logits = {}
            assert self._hooks is not None  # attached: this hook is one of them
            self._hooks.layers(self._layers_needed(gen))
            self._timers["decode"].start()
            return self._stock_decode_positions(cache, args, kwargs)
        if not empty:
            raise ValueError("vtprune: unsupported call: a cache that vtprune did not fill, or more than one new token "
                             "per decode step (speculative / chunked decoding is not supported)")
        assert self._hooks is not None  # attached: this hook is one of them
        self._hooks.layers(True)
        self._start_generation(input_ids, kwargs.get("attention_mask"),
                               {**kwargs, "generate_kwargs": self._generate_kwargs})
        self._timers["prefill"].start()
        return None

    def _layers_needed(self, gen: Generation) -> bool:
        """Whether this decode step needs the per-layer hooks: the method may score or act at it, or some
        layer's cache differs from the stock one and its call needs the engine's mask (padding, eager) or
        check (a sliding window). Otherwise the layers run as stock: with no padding, SDPA and
        FlashAttention need no mask for one query over any cache length, and the language model gets none
        (:meth:`_on_lm`)."""
        if self.method.acts_at_decode_step(self._view, self.plan):
            return True
        if gen.stock:
            return False
        assert self._rewrite is not None  # set by attach()
        return self._rewrite.decode_mask_needed(gen) or self._window is not None

    def _stock_decode_positions(self, cache, args, kwargs):
        """A decode call without ``position_ids`` makes the model derive them from the length of layer
        0's cache, which pruning may have shortened; give it the stock positions instead (``generate``
        always passes them: original prompt positions + t)."""
        assert self.gen is not None  # a decode step of the current generation
        past = self.gen.prompt_length + self.gen.step - 1  # the stock cache length before this step
        if kwargs.get("position_ids") is not None or cache.get_seq_length() == past:
            return None
        input_ids = input_ids_of(args, kwargs)
        assert input_ids is not None  # _on_call checked it
        positions = self.adapter.decode_position_ids(past, input_ids)
        if positions is None:
            raise ValueError("vtprune: a decode call without position_ids after layer 0's KV cache was pruned would "
                             "continue at shifted positions; decode with model.generate() or pass position_ids")
        kwargs["position_ids"] = positions
        return args, kwargs

    def _start_generation(self, input_ids, attention_mask, inputs: dict) -> None:
        self._group_report = None
        visual = self.adapter.visual_index(input_ids, inputs)
        self.plan = self._plan_for(visual.shape[-1])
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones_like(input_ids, dtype=torch.bool))
        is_visual = torch.zeros_like(valid)
        is_visual.scatter_(1, visual.flatten(1), True)
        text = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)[~is_visual]
        self.gen = Generation(visual_index=visual, text_index=text.view(input_ids.shape[0], -1), valid=valid,
                              num_layers=self.dims.layers, max_new_tokens=self._max_new_tokens,
                              grids_source=functools.partial(self.adapter.visual_grids, visual, without_cache(inputs)),
                              blocks=self.adapter.attention_blocks(input_ids, inputs))
        self._view = GenerationView(self.gen)
        self.ledger = Ledger(self.dims, self.gen.pads, input_ids.shape[1], visual.shape[1], visual.shape[2])
        self._timers = {"prefill": Timer(input_ids.device), "decode": Timer(input_ids.device)}
        self._generate_ms = None
        self._counted = None
        self._taken = None
        assert self._rewrite is not None  # set by attach(), before any hook runs
        self._rewrite.reset()

    def _after_call(self, module, args, kwargs, output):
        gen = self.gen
        if gen is None:
            return None
        if gen.phase == "prefill":
            self._timers["prefill"].stop()
            for layer in range(gen.num_layers):
                if gen.layouts[layer] is not None and not gen.stock_at[layer]:
                    # casts: mypy does not narrow list items; layer_visual[layer] is set with layouts[layer]
                    gen.cache_index[layer] = cast(Layout, gen.layouts[layer]).index
                    gen.cache_visual[layer] = cast(torch.Tensor, gen.layer_visual[layer])
            gen.hidden = None
        else:
            self._timers["decode"].stop()
            assert self.ledger is not None  # set with gen
            self.ledger.decode_step([v.shape[-1] * gen.n_images for v in gen.cache_visual])
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
            gen.cache = find_cache(args, kwargs)
            if self.method.needs_saliency:
                gen.saliency = self._collect_saliency()
        hidden = hidden_states_of(args, kwargs)
        if self._taken is not None:  # inputs of the language model that follow the sequence (DeepStack)
            hidden = self.adapter.layer_input(layer, hidden, gen.layout.index, gen.layout.group, self._taken)
        gen.hidden = hidden
        self._act(self.method.on_prefill_layer(self._view, self.plan))
        if not gen.stock:
            self._check_window(layer)
            self._rewrite.prefill(gen, kwargs)
        gen.layouts[layer] = gen.layout
        gen.stock_at[layer] = gen.stock
        gen.layer_visual[layer] = gen.visual
        self._record_prefill()
        gen.requests[layer] = self.method.score_request(self._view, self.plan)
        if gen.hidden is not hidden_states_of(args, kwargs):
            if args:
                args = (gen.hidden, *args[1:])
            else:
                kwargs["hidden_states"] = gen.hidden
        return args, kwargs

    def _check_window(self, layer: int) -> None:
        """Refuse a sequence or cache that is not the stock one where a sliding-window layer's cache would
        drop entries (the engine keeps each layer's cache contents in its own bookkeeping): every prefill
        layer's sequence (packed paths are longer than the prompt) plus the new tokens (``max_new_tokens``,
        or outside ``generate`` those fed so far) must fit in the window. Checked at every layer whose
        sequence or cache is not the stock one, prefill and decode (a method may evict only while decoding)."""
        if self._window is None:
            return
        gen, window = self.gen, self._window
        assert gen is not None  # called from a pruned layer
        longest, new = max(gen.prompt_length, gen.layout.length), gen.max_new_tokens or gen.step
        if longest + new > window:
            raise ValueError(
                f"vtprune: this model's sliding-window layers attend within {window} tokens and keep only the last "
                f"{window - 1} in their KV cache; a sequence of {longest} tokens (prompt {gen.prompt_length}) plus "
                f"{new} new tokens under pruning (from layer {layer}, {gen.phase}) would outgrow it, which vtprune "
                "does not support: shorten the prompt or max_new_tokens, or use method none")

    def _record_prefill(self) -> None:
        """Count the current prefill layer's tokens in the ledger: per sample (shared prefix, path-1 tail,
        path-2 tail) real tokens, and the visual tokens present (counted once per layout)."""
        gen = self.gen
        assert gen is not None and self.ledger is not None  # a prefill layer of the current generation
        lay = gen.layout
        if self._counted is None or self._counted[0] is not lay:
            if lay.group is None:
                counts = [(lay.length - p, 0, 0) for p in gen.pads]
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
        self._act(self.method.on_decode_layer(self._view, self.plan))
        gen.requests[layer] = self.method.score_request(self._view, self.plan)
        if gen.stock:
            return None
        self._check_window(layer)
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

    def _collect_saliency(self) -> torch.Tensor:
        gen = self.gen
        assert gen is not None  # called at prefill layer 0
        if not self._saliency:
            raise RuntimeError("the method needs a visual saliency but the vision tower did not run under vtprune in "
                               "this call (precomputed vision features, e.g. mm_encoder_outputs, carry none): pass "
                               "pixel_values, or choose a method (option) that needs no saliency")
        sal = torch.cat(self._saliency, dim=0)
        self._saliency.clear()
        if sal.shape != (gen.batch_size * gen.n_images, gen.n_visual):
            raise ValueError(f"mismatched images: saliency for {tuple(sal.shape)} image tokens, prompt holds "
                             f"{gen.batch_size} x {gen.n_images} images of {gen.n_visual} tokens")
        return sal.view(gen.batch_size, gen.n_images, gen.n_visual)

    # ------------------------------------------------------------------ public seams
    def _check_single_generation(self) -> Generation:
        if self.gen is None:
            raise RuntimeError("no generation has run under this vtprune run yet")
        if self._group_report is not None:
            raise RuntimeError("the last batch mixed image sizes and ran as groups "
                               f"{self._group_report.timing['groups']}; ask after a batch of one size")
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
        if self._group_report is not None:
            return self._group_report
        if self.gen is None:
            raise RuntimeError("no generation has run under this vtprune run yet")
        gen, dims = self.gen, self.dims
        lengths, measured, elsize = gen.kv_measured if gen.kv_measured is not None else _kv_of(gen.cache, dims.layers)
        per_token = 2 * dims.kv_heads * dims.head_dim * elsize  # bytes of one token's K and V in one layer
        assert self.ledger is not None  # set with gen
        samples = self.ledger.summary(per_token, lengths)
        steps = self.ledger.steps
        unpruned = dims.layers * gen.batch_size * (gen.prompt_length + steps) * per_token
        prefill_ms, decode_ms = self._timers["prefill"].ms(), self._timers["decode"].ms()
        return Report(
            method=self.method.name,
            options=self.method.options(),
            plan=self.plan.to_dict() if self.plan is not None else None,
            samples=samples,
            kv_cache={"bytes": measured, "bytes_unpruned": unpruned, "ratio": measured / unpruned if unpruned else 1.0,
                      "entries_per_layer": lengths},
            timing={
                "prefill_ms": sum(prefill_ms),
                "decode_ms_per_token": sum(decode_ms) / len(decode_ms) if decode_ms else None,
                "end_to_end_ms": self._generate_ms if self._generate_ms is not None else sum(prefill_ms) + sum(decode_ms),
                "new_tokens": steps + 1,
                "device": str(self.model.device),
            },
        )


def _kv_of(cache, layers: int) -> tuple[list[int], int, int]:
    """(entries per layer, bytes of K and V, bytes per element) of the first ``layers`` layers of ``cache``
    that hold tensors (a prefill that raised leaves the later layers empty)."""
    lengths, measured, elsize = [], 0, 0
    if cache is not None:
        for layer in cache.layers[:layers]:
            if getattr(layer, "keys", None) is None:
                continue
            lengths.append(layer.keys.shape[2])
            measured += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            elsize = layer.keys.element_size()
    return lengths, measured, elsize


def check_model(model: torch.nn.Module, method: MethodLike, visual_tokens: int | None = None) -> Plan | None:
    """The plan of ``method`` on ``model`` without attaching anything: resolved for ``visual_tokens`` per
    image, or for the count the model's config fixes; None when neither is known (the count follows the
    image size: then only the options that depend on the depth are checked). Raises as :class:`Run`."""
    run = Run(model, method)
    if visual_tokens is not None:
        return run._plan_for(visual_tokens)
    return run.plan


__all__ = ["Run", "check_model", "SUPPORTED_ATTENTION"]
