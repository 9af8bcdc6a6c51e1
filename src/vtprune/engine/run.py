"""Attaching a method to a model: hooks on the model, its language model and each decoder layer, the
scoring attention entry, and a thin ``generate`` wrapper; all removed on exit, also on an exception.

Per forward call the run decides the phase: a call whose ``input_ids`` hold image tokens and whose
cache is empty is a prefill (a new :class:`Generation`); a one-token call on that generation's cache is
a decode step. Before each decoder layer it lets the method act, then gives the layer the hidden states,
position embeddings, position ids and attention mask of the layer's (possibly pruned or packed)
sequence. Layers whose sequence and cache are the stock ones are left untouched, so with nothing pruned
the model computes exactly what it computes without vtprune.

Masks per attention implementation (``_layer_mask``): SDPA gets None where its causal kernel is exact
(single path, no padding), else a [B, 1, q, k] boolean mask; eager always an additive float mask; a
FlashAttention model (``flash_attention_2`` / ``_3``) None or a [B, k] padding mask of the layer's keys
(left padding), and a [B, 1, q, k] boolean mask only on ParVTS's packed layers, which the scoring entry
runs with SDPA instead (FlashAttention has no arbitrary masks; see ``engine/scoring.py``).
"""

from __future__ import annotations

import functools

import torch

from vtprune.adapters import adapter_for
from vtprune.engine import scoring
from vtprune.engine.calls import find_cache, hidden_states_of, input_ids_of, missing_cache_error
from vtprune.engine.groups import generate_in_groups, merge_reports
from vtprune.engine.layout import (
    PAD,
    Layout,
    build_mask,
    gather_position_embeddings,
    gather_tokens,
    padding_mask,
)
from vtprune.engine.ledger import Dims, Ledger, Timer
from vtprune.engine.state import Generation
from vtprune.methods import Method, make_method

SUPPORTED_ATTENTION = ("sdpa", "eager", *scoring.FLASH)


class Run:
    """A method attached to a model. Use as a context manager (``with vtprune.apply(...) as run``) or
    call :meth:`detach` yourself. :meth:`report` describes the last generation."""

    def __init__(self, model: torch.nn.Module, method: Method):
        self.model = model
        self.adapter = adapter_for(model)  # TypeError for unsupported classes
        self.method = method
        self.dims = Dims.from_config(self.adapter.text_config)
        method.validate(self.dims.layers)
        per_image = self.adapter.tokens_per_image()
        if per_image:
            method.check_visual(per_image)
        self.gen: Generation | None = None
        self.ledger: Ledger | None = None
        self._handles: list = []
        self._attached = False
        self._saliency: list[torch.Tensor] = []
        self._max_new_tokens: int | None = None
        self._generate_ms: float | None = None
        self._generate_kwargs: dict = {}  # of the generate call in progress (adapters read e.g. image_sizes)
        self._calls_in_generate: int | None = None  # model calls so far in the generate call in progress
        self._group_report: dict | None = None  # the merged report of a batch that ran as groups

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> Run:
        if self._attached:
            return self
        cfg = self.adapter.text_config
        impl = cfg._attn_implementation or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {impl!r} is not supported yet; load the model with "
                             f"attn_implementation one of {list(SUPPORTED_ATTENTION)}")
        self._orig_impl = impl
        self._flash = impl in scoring.FLASH
        name = scoring.register(impl)
        try:
            model, lm = self.model, self.adapter.language_model
            self._handles.append(model.register_forward_pre_hook(self._on_call, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._after_call, with_kwargs=True))
            self._handles.append(lm.register_forward_pre_hook(self._on_lm, with_kwargs=True))
            for i, layer in enumerate(self.adapter.decoder_layers):
                self._handles.append(layer.register_forward_pre_hook(functools.partial(self._on_layer, i), with_kwargs=True))
                scoring.listen(layer.self_attn, self._on_attention)
            if self.method.needs_saliency:
                self._handles += self.adapter.attach_saliency(self._saliency.append)
            cfg._attn_implementation = name
            self._had_generate = "generate" in model.__dict__
            self._orig_generate = model.generate
            model.generate = self._generate
        except BaseException:
            self._remove()
            raise
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook, listener and override; the model is the stock model again."""
        if self._attached:
            self._remove()
            self._attached = False

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.adapter.decoder_layers:
            scoring.unlisten(layer.self_attn)
        cfg = self.adapter.text_config
        if getattr(self, "_orig_impl", None) is not None and cfg._attn_implementation != self._orig_impl:
            cfg._attn_implementation = self._orig_impl
        if "generate" in self.model.__dict__ and not getattr(self, "_had_generate", False):
            del self.model.generate

    def __enter__(self) -> Run:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ generate wrapper
    def _generate(self, *args, **kwargs):
        self._group_report = None
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
        self._group_report = merge_reports([(g.samples, r) for g, r in zip(groups, reports, strict=True)], ids.shape[0])
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
        try:
            return self._orig_generate(*args, **kwargs)
        finally:
            timer.stop()
            self._generate_ms = timer.ms()[0]
            self._max_new_tokens = None
            self._generate_kwargs = {}
            self._calls_in_generate = None

    # ------------------------------------------------------------------ hooks
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
            gen.logits = {}
            self._timers["decode"].start()
            return self._stock_decode_positions(cache, args, kwargs)
        if not empty:
            raise ValueError("vtprune: unsupported call: a cache that vtprune did not fill, or more than one new token "
                             "per decode step (speculative / chunked decoding is not supported)")
        self._start_generation(input_ids, kwargs.get("attention_mask"),
                               {**kwargs, "generate_kwargs": self._generate_kwargs})
        self._timers["prefill"].start()
        return None

    def _stock_decode_positions(self, cache, args, kwargs):
        """A decode call without ``position_ids`` makes the model derive them from the length of layer
        0's cache, which pruning may have shortened (ParVTS); give it the stock positions instead
        (``generate`` always passes them: original prompt positions + t)."""
        past = self.gen.prompt_length + self.gen.step - 1  # the stock cache length before this step
        if kwargs.get("position_ids") is not None or cache.get_seq_length() == past:
            return None
        positions = self.adapter.decode_position_ids(past, input_ids_of(args, kwargs))
        if positions is None:
            raise ValueError("vtprune: a decode call without position_ids after layer 0's KV cache was pruned would "
                             "continue at shifted positions; decode with model.generate() or pass position_ids")
        kwargs["position_ids"] = positions
        return args, kwargs

    def _start_generation(self, input_ids, attention_mask, inputs: dict) -> None:
        self._group_report = None
        visual = self.adapter.visual_index(input_ids, inputs)
        self.method.check_visual(visual.shape[-1])
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones_like(input_ids, dtype=torch.bool))
        is_visual = torch.zeros_like(valid)
        is_visual.scatter_(1, visual.flatten(1), True)
        text = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)[~is_visual]
        self.gen = Generation(visual_index=visual, text_index=text.view(input_ids.shape[0], -1), valid=valid,
                              num_layers=self.dims.layers, max_new_tokens=self._max_new_tokens)
        self.gen.grids_source = functools.partial(self.adapter.visual_grids, visual, inputs)  # read by pool / show only
        self.ledger = Ledger(self.dims, self.gen.pads, input_ids.shape[1], visual.shape[1], visual.shape[2])
        self._timers = {"prefill": Timer(input_ids.device), "decode": Timer(input_ids.device)}
        self._generate_ms = None
        self._pe_cache = None
        self._counted = None
        self._mask_cache = {}

    def _after_call(self, module, args, kwargs, output):
        gen = self.gen
        if gen is None:
            return None
        if gen.phase == "prefill":
            self._timers["prefill"].stop()
            for layer in range(gen.num_layers):
                if gen.layouts[layer] is not None and not gen.identity_at[layer]:
                    gen.cache_index[layer] = gen.layouts[layer].index
                    gen.cache_vis[layer] = gen.layer_vis[layer]
            gen.hidden = None
        else:
            self._timers["decode"].stop()
            self.ledger.decode_step([v.shape[-1] * gen.n_images for v in gen.cache_vis])
        return None

    def _on_lm(self, module, args, kwargs):
        gen = self.gen
        if gen is None:
            return None
        mask = kwargs.get("attention_mask")
        if gen.phase == "prefill":
            return None
        gen.valid = (mask.bool() if mask is not None and mask.dim() == 2 else
                     torch.ones(gen.batch_size, gen.prompt_length + gen.step, dtype=torch.bool, device=gen.valid.device))
        self._mask_cache = {}
        if not gen.identity:
            kwargs["attention_mask"] = None  # every layer gets its own mask from _on_layer
            return args, kwargs
        return None

    def _on_layer(self, layer, module, args, kwargs):
        gen = self.gen
        if gen is None:
            return None
        gen.layer = layer
        if gen.phase == "prefill":
            return self._prefill_layer(layer, args, kwargs)
        return self._decode_layer(layer, args, kwargs)

    def _prefill_layer(self, layer, args, kwargs):
        gen = self.gen
        if layer == 0:
            gen.cache = find_cache(args, kwargs)
            gen.orig_pe = kwargs.get("position_embeddings")
            gen.orig_pos = kwargs.get("position_ids")
            if self.method.needs_saliency:
                gen.saliency = self._collect_saliency()
        hidden = hidden_states_of(args, kwargs)
        gen.hidden = hidden
        self.method.on_prefill_layer(gen)
        changed = gen.hidden is not hidden
        if not gen.identity:
            self._apply_layout(kwargs)
        gen.layouts[layer] = gen.layout
        gen.identity_at[layer] = gen.identity
        gen.layer_vis[layer] = gen.vis
        self._record_prefill(layer)
        self._request_scores(layer)
        if changed:
            if args:
                args = (gen.hidden, *args[1:])
            else:
                kwargs["hidden_states"] = gen.hidden
        return args, kwargs

    def _apply_layout(self, kwargs) -> None:
        gen = self.gen
        lay = gen.layout
        if self._pe_cache is None or self._pe_cache[0] is not lay:
            pe = gather_position_embeddings(gen.orig_pe, lay.index) if gen.orig_pe is not None else None
            pos = gather_tokens(gen.orig_pos, lay.index) if gen.orig_pos is not None else None
            self._pe_cache = (lay, pe, pos, self._layer_mask(lay, lay))
        _, pe, pos, mask = self._pe_cache
        kwargs["position_embeddings"] = pe
        if "position_ids" in kwargs:
            kwargs["position_ids"] = pos
        kwargs["attention_mask"] = mask

    def _mask_dtype(self):
        """None (boolean mask) for SDPA and FlashAttention's SDPA fallback; the model dtype (additive mask)
        for eager attention."""
        return self.model.dtype if self._orig_impl == "eager" else None

    def _layer_mask(self, query: Layout, keys: Layout) -> torch.Tensor | None:
        """The attention mask of a layer whose queries / keys are ``query`` / ``keys`` (see the module
        docstring): None, a [B, n_k] padding mask (FlashAttention) or a [B, 1, n_q, n_k] mask."""
        gen = self.gen
        packed = query.group is not None or keys.group is not None
        if self._flash and not packed:
            return padding_mask(keys.index, gen.valid) if gen.has_padding else None
        if packed or gen.has_padding or self._orig_impl != "sdpa":
            return build_mask(query, keys, gen.valid, self._mask_dtype())
        return None

    def _record_prefill(self, layer) -> None:
        gen = self.gen
        lay = gen.layout
        if self._counted is None or self._counted[0] is not lay:
            if lay.group is None:
                n = lay.length
                counts = [(n - p, 0, 0) for p in gen.pads]
            else:
                g = lay.group
                valid = torch.gather(gen.valid, 1, lay.index.to(gen.valid.device)).to(g.device) & (g != PAD)
                p = ((g == 0) & valid).sum(1).tolist()
                a = (g == 1).sum(1).tolist()
                c = (g == 2).sum(1).tolist()
                counts = list(zip(p, a, c, strict=True))
            visual = gen.n_images * (gen.vis.shape[-1] if gen.paths is None else gen.n_visual)
            self._counted = (lay, counts, [visual] * gen.batch_size)
        self.ledger.prefill_layer(*self._counted[1:])

    def _decode_layer(self, layer, args, kwargs):
        gen = self.gen
        self.method.on_decode_layer(gen)
        self._request_scores(layer)
        if gen.identity:
            return None
        mask = None
        if gen.has_padding or self._orig_impl == "eager":
            index = gen.cache_index[layer]
            key = id(index)
            if key not in self._mask_cache:
                keys = Layout(gen.key_index(layer))
                query = Layout(torch.full((gen.batch_size, 1), gen.total_length() - 1, device=keys.index.device))
                self._mask_cache[key] = self._layer_mask(query, keys)
            mask = self._mask_cache[key]
        kwargs["attention_mask"] = mask
        return args, kwargs

    def _request_scores(self, layer) -> None:
        self.gen.score_request[layer] = self.method.score_rows(self.gen)

    def _on_attention(self, module, query, key, mask, scaling):
        gen = self.gen
        if gen is None:
            return
        layer = module.layer_idx
        kind = gen.score_request.get(layer)
        if kind is None:
            return
        if kind == "last":
            rows = torch.full((query.shape[0], 1), query.shape[2] - 1, dtype=torch.long, device=query.device)
        else:
            rows = gen.question_rows()
        gen.logits[layer] = scoring.row_logits(query, key, rows, mask, scaling)

    def _collect_saliency(self) -> torch.Tensor:
        gen = self.gen
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

    # ------------------------------------------------------------------ report
    def kept_visual(self, sample: int = 0, image: int = 0) -> list[list[int]]:
        """Which visual tokens of one image each decoder layer's prefill sequence held in the last
        generation (for ParVTS: path A's, i.e. the subject tokens, in every layer).

        Returns:
            One list per layer l = 0..L-1 of positions among the image's N_v tokens (0 .. N_v-1,
            ascending). A merged token (pooling, VisionZip) is listed at the position it sits at.

        Raises:
            RuntimeError: no generation yet, or the last batch ran as groups of alike samples (mixed
            image sizes; each group was its own generation). IndexError: ``sample`` / ``image`` out of range.
        """
        if self.gen is None:
            raise RuntimeError("no generation has run under this vtprune run yet")
        if self._group_report is not None:
            raise RuntimeError("the last batch mixed image sizes and ran as groups "
                               f"{self._group_report['timing']['groups']}; call kept_visual after a batch of one size")
        gen = self.gen
        if not (0 <= sample < gen.batch_size and 0 <= image < gen.n_images):
            raise IndexError(f"sample {sample} / image {image} out of range ({gen.batch_size} samples, "
                             f"{gen.n_images} images each)")
        all_tokens = gen.visual_index[sample, image]
        return [torch.searchsorted(all_tokens, vis[sample, image].to(all_tokens.device)).tolist()
                for vis in gen.layer_vis]

    def report(self) -> dict:
        """What the last generation kept and what it saved.

        Returns a JSON-serialisable dict: ``method``, ``options``, ``samples`` (per sample: visual
        tokens in, visual tokens per layer at prefill and at the last decode step, equivalent budget
        (mean over layers of visual tokens present, per image), final budget, FLOPs of prefill and
        decode for this run and for the unpruned model in both conventions (see ``engine/ledger.py``),
        KV-cache bytes at the end vs unpruned), ``kv_cache`` (bytes measured on the batch's cache
        tensors vs the unpruned size), ``timing`` (prefill ms = vision encoder + prefill, decode ms
        per token, end-to-end ms, new tokens). A batch that ran as groups of alike samples
        (:mod:`vtprune.engine.groups`) gets the groups' reports merged
        (:func:`~vtprune.engine.groups.merge_reports`). Raises RuntimeError before any generation.
        """
        if self._group_report is not None:
            return self._group_report
        if self.gen is None:
            raise RuntimeError("no generation has run under this vtprune run yet")
        gen, dims = self.gen, self.dims
        cache = gen.cache
        lengths, measured, elsize = [], 0, 0
        if cache is not None:
            for layer in cache.layers[: dims.layers]:
                lengths.append(layer.keys.shape[2])
                measured += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                elsize = layer.keys.element_size()
        # bytes of one token's K and V in one layer
        per_token = 2 * dims.kv_heads * dims.head_dim * elsize
        samples = self.ledger.summary(per_token, lengths)
        steps = self.ledger.steps
        unpruned = dims.layers * gen.batch_size * (gen.prompt_length + steps) * per_token
        prefill_ms, decode_ms = self._timers["prefill"].ms(), self._timers["decode"].ms()
        return {
            "method": self.method.name,
            "options": self.method.options(),
            "samples": samples,
            "kv_cache": {"bytes": measured, "bytes_unpruned": unpruned, "ratio": measured / unpruned if unpruned else 1.0,
                         "entries_per_layer": lengths},
            "timing": {
                "prefill_ms": sum(prefill_ms),
                "decode_ms_per_token": sum(decode_ms) / len(decode_ms) if decode_ms else None,
                "end_to_end_ms": self._generate_ms if self._generate_ms is not None else sum(prefill_ms) + sum(decode_ms),
                "new_tokens": steps + 1,
                "device": str(self.model.device),
            },
        }


def check(model: torch.nn.Module, method: str | Method = "none", **options) -> Method:
    """Build the method and check it against ``model`` (its depth, and its visual tokens per image where
    the config fixes them) without attaching anything. Returns the method; raises as :func:`apply`."""
    m = make_method(method, **options)
    Run(model, m)
    return m


def apply(model: torch.nn.Module, method: str | Method = "none", **options) -> Run:
    """Attach a visual-token method to ``model`` and return the attached :class:`Run`.

    Args:
        model: a supported HF multimodal model (see ``vtprune.adapters``), any dtype / device.
        method: a method name (``none``, ``parvts``, ``st3``, ``fastv``) or a method instance.
        **options: the method's options (e.g. ``budget=64`` visual tokens per image, or
            ``keep_ratio=0.125``), see each method's docstring.

    Raises:
        TypeError: unsupported model class, or an option the method does not have.
        ValueError: unknown method, or an option value out of range (budget vs this model's
            visual tokens per image, layers vs its depth). Nothing is attached then.
    """
    m = make_method(method, **options)
    return Run(model, m).attach()
