"""The lifecycle of a run's generations: the ``generate`` wrapper, phase detection, the start of a
generation, and what is let go or kept when a ``generate`` call ends.

* **The wrapper** (:meth:`Lifecycle.generate`): refuses the modes vtprune cannot run
  (:mod:`vtprune.engine.modes`) before anything runs, splits a batch of mixed image sizes into groups of
  alike samples (:mod:`vtprune.engine.groups`), times the call, and calls the run's ``on_report`` /
  ``on_error``.
* **Phase detection** (:meth:`Lifecycle.phase`), per model call: a *decode step* is one new token on the
  cache of the generation in progress; a *prefill* is a call whose cache is empty; a *continuation* is a
  prefill of new tokens on a cache the run filled earlier (a later turn,
  :mod:`vtprune.engine.conversation`). The first model call of a ``generate`` is never a decode step.
  Anything else (several new tokens per step on the cache in progress; a cache no run or another run
  filled) is refused with a clear error.
* **A new generation** (:meth:`Lifecycle.start`): the prompt's visual tokens from the adapter (none for a
  text-only prompt, which then runs as stock), the method's plan, the ledger.
* **The end of a generate call** (:meth:`Lifecycle.release`): the cache is recorded for a later turn,
  measured for the report and let go (the engine keeps no reference that would keep it alive); the
  following of beam search's reordering is undone.

:class:`Lifecycle` is the run's own part (``engine/run.py`` creates one per run): it reads and writes the
run's generation state, as the run's layer hooks do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from vtprune.engine import conversation
from vtprune.engine.calls import find_cache, input_ids_of, missing_cache_error, without_cache
from vtprune.engine.groups import generate_in_groups
from vtprune.engine.ledger import Ledger, Timer
from vtprune.engine.modes import refuse_unsupported_modes
from vtprune.engine.report import Report, kv_of
from vtprune.engine.state import Generation
from vtprune.engine.view import GenerationView
from vtprune.engine.window import SlidingWindows


class Lifecycle:
    """The generate calls and generations of one run (module docstring). ``run`` is the
    :class:`vtprune.engine.run.Run` that owns it.

    Attributes:
        max_new_tokens: of the generate call in progress (None outside one or when it does not say).
        generate_kwargs: the keyword arguments of the generate call in progress, as the user passed them
            (adapters read e.g. ``image_sizes``, which ``generate`` consumes before the prefill call).
        calls: model calls so far in the generate call in progress; None outside ``generate``.
        generate_ms: wall clock of the last generate call (ms), None before one ended.
        group_report: the merged report of a batch that ran as groups, else None.
    """

    def __init__(self, run: Any):
        self.run = run
        self.max_new_tokens: int | None = None
        self.generate_kwargs: dict = {}
        self.calls: int | None = None
        self.generate_ms: float | None = None
        self.group_report: Report | None = None
        self._unfollow: Callable[[], None] | None = None  # undoes following the cache's beam reordering
        self._record: conversation.CacheRecord | None = None  # of the cache the generation in progress writes
        self._original: Callable | None = None
        self._had_generate = False

    # ------------------------------------------------------------------ the generate wrapper
    def wrap(self) -> None:
        """Make the model's ``generate`` this lifecycle's :meth:`generate` (undone by :meth:`unwrap`)."""
        model = self.run.model
        self._had_generate = "generate" in model.__dict__
        self._original = model.generate
        model.generate = self.generate

    def unwrap(self) -> None:
        """Give the model its own ``generate`` back."""
        model = self.run.model
        if "generate" in model.__dict__ and not self._had_generate:
            del model.generate

    def generate(self, *args, **kwargs):
        """The model's ``generate`` under the run: unsupported modes refused, mixed-size batches as groups,
        then the callbacks."""
        run = self.run
        self.group_report = None
        try:
            refuse_unsupported_modes(kwargs, kwargs.get("generation_config") or run.model.generation_config)
            out = self._grouped(*args, **kwargs)
        except BaseException as e:
            if run.on_error is not None:
                run.on_error(e)
            raise
        if run.on_report is not None:
            run.on_report(run.report())
        return out

    def _grouped(self, *args, **kwargs):
        run = self.run
        ids = kwargs.get("input_ids", args[0] if args else None)
        groups = run.adapter.batch_groups(ids, {**kwargs, "input_ids": ids}) if torch.is_tensor(ids) else None
        if not groups:
            return self._batch(*args, **kwargs)
        if len(args) > 1:
            raise ValueError("vtprune: pass generate's arguments after input_ids by keyword")
        kwargs = {**kwargs, "input_ids": ids}
        reports = []

        def one_group(**sub):
            out = self._batch(**sub)
            reports.append(run.report())
            return out

        merged = generate_in_groups(one_group, run.adapter, groups, kwargs, self._pad_token_id(kwargs))
        assert ids is not None  # a tensor: groups come only from tensor input_ids
        self.group_report = Report.merge([(g.samples, r) for g, r in zip(groups, reports, strict=True)], ids.shape[0])
        return merged

    def _pad_token_id(self, kwargs) -> int:
        cfg = kwargs.get("generation_config") or self.run.model.generation_config
        pad = kwargs.get("pad_token_id", getattr(cfg, "pad_token_id", None))
        if pad is None:
            eos = kwargs.get("eos_token_id", getattr(cfg, "eos_token_id", None))
            pad = eos[0] if isinstance(eos, list | tuple) and eos else eos
        return 0 if pad is None else int(pad)

    def _batch(self, *args, **kwargs):
        run = self.run
        cfg = kwargs.get("generation_config") or run.model.generation_config
        self.max_new_tokens = kwargs.get("max_new_tokens") or getattr(cfg, "max_new_tokens", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        max_length = kwargs.get("max_length") or getattr(cfg, "max_length", None)
        if self.max_new_tokens is None and ids is not None and max_length:
            self.max_new_tokens = max(1, max_length - ids.shape[1])
        run.saliency_sink.clear()  # generate may run the vision tower before the prefill forward
        timer = Timer(run.model.device)
        timer.start()
        self.generate_kwargs = kwargs
        self.calls = 0
        inner = Timer(run.model.device) if run.profile is not None else None
        try:
            if inner is not None:
                inner.start()
            assert self._original is not None  # set by wrap()
            return self._original(*args, **kwargs)
        finally:
            if inner is not None:
                inner.stop()
            timer.stop()
            self.generate_ms = timer.ms()[0]
            if inner is not None and run.profile is not None:
                run.profile.wrapper_ms += self.generate_ms - inner.ms()[0]
            self.max_new_tokens = None
            self.generate_kwargs = {}
            self.calls = None
            self.release()

    # ------------------------------------------------------------------ the end of a generate call
    def release(self) -> None:
        """Let go of the finished generation's KV cache (recorded for a later turn and measured for the
        report first) and the last step's scores. Holding the cache kept it alive between generate calls
        (at batch 16 on llava-cpu-small, 667 MiB until the next call replaced it)."""
        gen = self.run.gen
        if gen is None:
            return
        if gen.cache is not None:
            self.remember(gen)
            gen.kv_measured = kv_of(gen.cache, gen.num_layers)
            gen.cache = None
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
        gen.logits = {}

    def remember(self, gen: Generation) -> None:
        """Record what ``gen``'s cache holds (:mod:`vtprune.engine.conversation`), so that a later call on it
        continues the conversation: per layer the prompt entries plus the tokens fed back."""
        fed = torch.arange(gen.prompt_length, gen.prompt_length + gen.step, device=gen.valid.device)
        index: list[torch.Tensor | None] = []
        for layer in range(gen.num_layers):
            own = gen.cache_index[layer]
            listed = (None if own is None and gen.stock_at[layer] and gen.prior[layer] is None else
                      torch.cat([gen.cache_prompt_index(layer), fed.expand(gen.batch_size, -1)], dim=1))
            held = getattr(gen.cache.layers[layer], "keys", None) if layer < len(gen.cache.layers) else None
            length = gen.prompt_length + gen.step if listed is None else listed.shape[1]
            if held is not None and held.shape[-2] < length:  # a sliding-window layer dropped its oldest entries
                full = torch.arange(length, device=gen.valid.device).expand(gen.batch_size, -1) if listed is None else listed
                listed = full[:, length - held.shape[-2]:]
            index.append(listed)
        record = conversation.CacheRecord(owner=id(self.run), method=self.run.method.name, batch=gen.batch_size,
                                          length=gen.prompt_length + gen.step, index=index)
        conversation.keep(gen.cache, record)
        self._record = record  # later decode steps on this cache (outside generate) count on it

    def follow(self, gen: Generation, cache) -> None:
        """Before prefill layer 0: ``cache`` is the one the model writes (or None): record it as ``gen``'s and,
        inside ``generate``, follow its beam reordering for ``gen``."""
        gen.cache = cache
        if cache is None:
            self._record = None
            return
        record = conversation.record_of(cache)
        if record is None:  # a fresh cache; a continuation's keeps its entries until this call ends (remember)
            record = conversation.CacheRecord(owner=id(self.run), method=self.run.method.name, batch=gen.batch_size,
                                              length=gen.prompt_length, index=[None] * gen.num_layers)
            conversation.keep(cache, record)
        record.length = gen.prompt_length
        self._record = record
        if self.calls is not None:
            if self._unfollow is not None:
                self._unfollow()
            self._unfollow = conversation.follow_reorder(cache, gen.reorder)

    def count_step(self, gen: Generation) -> None:
        """After a decode step of ``gen``: its cache has seen one more token (what ``get_seq_length`` says)."""
        if self._record is not None:
            self._record.length = gen.prompt_length + gen.step

    # ------------------------------------------------------------------ phase detection
    def phase(self, args, kwargs) -> tuple[str, conversation.CacheRecord | None]:
        """The phase of a model call (module docstring): ``("decode", None)``, ``("prefill", None)`` or
        ``("prefill", record)`` for a continuation of the cache ``record`` describes.

        Raises:
            ValueError: no ``input_ids``; several new tokens per step on the cache of the generation in
                progress; a later generate call without a cache; a non-empty cache no run, or another
                run, filled.
        """
        run, gen = self.run, self.run.gen
        input_ids = input_ids_of(args, kwargs)
        cache = find_cache(args, kwargs)
        if input_ids is None:
            raise ValueError("vtprune needs input_ids (it finds the visual tokens from the image token id); got inputs_embeds only")
        record = conversation.record_of(cache)
        empty = cache is None or (record is None and cache.get_seq_length() == 0)
        first = True  # the first model call of a generate call, or a call outside generate
        if self.calls is not None:
            self.calls += 1
            first = self.calls == 1
            # a later call of this generate that is shorter than its prompt can only be a decode step
            if cache is None and not first and gen is not None and input_ids.shape[1] < gen.prompt_length - gen.offset:
                raise missing_cache_error(kwargs)
        ours = gen is not None and cache is not None and cache is gen.cache
        if ours and not first and input_ids.shape[1] != 1:
            raise ValueError("vtprune: unsupported call: more than one new token per decode step (speculative / "
                             "assisted / chunked decoding is not supported)")
        if ours and input_ids.shape[1] == 1 and not (first and self.calls is not None):
            return "decode", None
        if empty:
            return "prefill", None
        if ours:  # outside generate: several new tokens on the cache of the generation in progress
            self.remember(gen)
            record = conversation.record_of(cache)
        error = conversation.continuation_error(record, id(run), run.method.name)
        if error is not None:
            raise error
        return "prefill", record

    # ------------------------------------------------------------------ a new generation
    def start(self, input_ids, attention_mask, inputs: dict, record: conversation.CacheRecord | None) -> None:
        """A new :class:`Generation` (and its view, ledger and timers) for a prefill call: of a fresh prompt,
        or (``record``) of the new tokens of a later turn on a cache this run filled (their indices continue
        after the ``record.length`` tokens the cache has seen; the cache's entries come first among every
        layer's keys). A prompt without image tokens runs as stock (the method is not asked).

        Raises:
            ValueError: a batch mixing prompts with and without images; a continuation whose batch or
                attention mask does not match the cache; what the adapter raises for the prompt's images.
        """
        run = self.run
        self.group_report = None
        offset = record.length if record is not None else 0
        batch, n = input_ids.shape
        if record is not None and record.batch != batch:
            raise ValueError(f"vtprune: the cache holds {record.batch} sequences, the call {batch}: continue a "
                             "conversation with the same batch (beam search and num_return_sequences > 1 cannot "
                             "start from a cache)")
        device = input_ids.device
        if attention_mask is not None and attention_mask.shape[1] not in (n, offset + n):
            raise ValueError(f"vtprune: the attention mask covers {attention_mask.shape[1]} tokens; a call of {n} new "
                             f"tokens on a cache of {offset} needs {offset + n} (the whole conversation)")
        valid = torch.ones(batch, offset + n, dtype=torch.bool, device=device)
        if attention_mask is not None:
            valid[:, offset + n - attention_mask.shape[1]:] = attention_mask.bool()
        ids = torch.tensor(run.adapter.visual_token_ids, device=device)
        has_image = torch.isin(input_ids, ids).any(dim=1).tolist()
        if any(has_image) and not all(has_image):
            raise ValueError(f"vtprune: a batch mixes prompts with images or videos (samples "
                             f"{[b for b, h in enumerate(has_image) if h]}) and without; vtprune schedules a batch's "
                             "visual tokens together: run text-only prompts in their own generate call")
        kinds = None
        if any(has_image):
            local = run.adapter.visual_index(input_ids, inputs)
            kinds = run.adapter.visual_kinds(input_ids, inputs)
            run.plan = run.plan_for(local.shape[-1])
        else:  # a text-only prompt (or turn): it runs as stock
            local = torch.zeros(batch, 0, 0, dtype=torch.long, device=device)
        is_visual = torch.zeros(batch, n, dtype=torch.bool, device=device)
        is_visual.scatter_(1, local.flatten(1), True)
        text = (torch.arange(n, device=device) + offset).expand(batch, -1)[~is_visual]
        blocks = run.adapter.attention_blocks(input_ids, inputs) if any(has_image) else None
        if blocks is not None and offset:
            blocks = torch.cat([torch.full((batch, offset), -1, dtype=blocks.dtype, device=blocks.device), blocks], 1)
        gen = Generation(visual_index=local + offset, text_index=text.view(batch, -1), valid=valid,
                         num_layers=run.dims.layers, max_new_tokens=self.max_new_tokens,
                         grids_source=functools.partial(run.adapter.visual_grids, local, without_cache(inputs)),
                         blocks=blocks, offset=offset, prior=list(record.index) if record is not None else None,
                         windows=SlidingWindows(run.windows) if any(run.windows) else None, kinds=kinds)
        run.gen, run.view = gen, GenerationView(gen)
        run.ledger = self._ledger(gen, n)
        run.timers = {"prefill": Timer(device), "decode": Timer(device)}
        self.generate_ms = None

    def _ledger(self, gen: Generation, n: int) -> Ledger:
        """The ledger of ``gen``, whose call prefills ``n`` tokens (after ``gen.offset`` of earlier turns)."""
        dims = self.run.dims
        if not gen.offset:
            return Ledger(dims, gen.pads, n, gen.n_images, gen.n_visual, kinds=gen.kinds)
        valid = gen.valid
        pads = (~valid[:, gen.offset:]).sum(1).tolist()
        context_pads = (~valid[:, :gen.offset]).sum(1).tolist()
        context = [torch.gather(valid, 1, gen.prior_index(layer).to(valid.device)).sum(1).tolist()
                   for layer in range(gen.num_layers)]
        return Ledger(dims, pads, n, gen.n_images, gen.n_visual, context, [gen.offset - p for p in context_pads],
                      context_pads, kinds=gen.kinds)


__all__ = ["Lifecycle"]
