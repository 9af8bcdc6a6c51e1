"""Per-generation state: one ``generate`` call (the prefill, then one decode step per new token).

It holds where the visual tokens are (per sample and image), which tokens each layer's sequence and KV
cache hold, the attention rows scored this step, and what several packed paths hold while they run
(:mod:`vtprune.engine.paths`). The run (``engine/run.py``) writes it; the per-layer rewrite
(``engine/rewrite.py``) turns it into hidden states, position embeddings, masks and caches; actions
(:mod:`vtprune.engine.decisions`) change it through :meth:`Generation.keep_visual` and the path
functions; methods only read it, through :class:`vtprune.engine.view.GenerationView`.

Shapes: B samples, I images per sample, N_v visual tokens per image, S prompt length (padded),
L decoder layers. Token indices are those of ``engine/layout.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, cast

import torch

from vtprune.adapters.base import saliency_rows
from vtprune.engine.layout import Layout, gather_tokens, locate, select_kv
from vtprune.engine.window import SlidingWindows


@dataclasses.dataclass(frozen=True, eq=False)
class PackedPaths:
    """What the packed paths hold.

    Attributes:
        question_slots: path -> LongTensor [B, Q], the slot of each question token in that path
            (0 where the path holds no copy or the sample has fewer than Q question tokens).
        question_valid: BoolTensor [B, Q], True at a real question token.
        slot_visual: BoolTensor [B, n], True at a slot that holds a visual token.
        visual: path -> LongTensor [B, I, k_g], the visual tokens of that path (original indices).
        question_in: the paths that hold a copy of the question.
    """

    question_slots: dict[int, torch.Tensor]
    question_valid: torch.Tensor
    slot_visual: torch.Tensor
    visual: dict[int, torch.Tensor]
    question_in: tuple[int, ...]

    @property
    def question_count(self) -> int:
        """Q, the question tokens per sample (padded to the batch's longest)."""
        return self.question_valid.shape[1]


class Generation:
    """State of one generation, created by the run at the prefill call.

    Attributes (written by the engine only):
        num_layers (L), batch_size (B), n_images (I), n_visual (N_v, per image), prompt_length (S),
        phase ("prefill" | "decode"), layer (current decoder layer), step (decode: tokens generated so
        far, 1 at the first decode step), max_new_tokens (int or None),
        visual_index: LongTensor [B, I, N_v], original indices of every image's tokens,
        text_index: LongTensor [B, S - I N_v], original indices of the other prompt tokens,
        valid: BoolTensor [B, S + t], False at padding (grows while decoding),
        saliency: FloatTensor [B, I, N_v] or None (per-patch saliency from the adapter),
        visual: LongTensor [B, I, n], the visual tokens of the main sequence at the current layer,
        layout: the current prefill layer's :class:`~vtprune.engine.layout.Layout`,
        stock: True while no layer's sequence or cache differs from the stock model's,
        layouts / layer_visual: per layer, the prefill sequence and its visual tokens,
        cache_index / cache_visual: per layer after the prefill, the prompt tokens in its KV cache
            (None = all) and its visual tokens,
        logits: layer -> [B, H, r, k] attention logits scored this step,
        requests: layer -> the score request of this step (:mod:`vtprune.engine.decisions`),
        hidden: [B, n, d] the current prefill layer's input, cache: the model's KV cache (None once the
            ``generate`` call returned: the engine holds no reference that would keep it, or the
            tensors the caller dropped, alive), kv_measured: what :meth:`Run.report` needs of the cache,
            measured when the engine let it go (``(entries per layer, bytes, bytes per element)``),
        blocks: LongTensor [B, S] of the prompt's bidirectional block ids (the adapter's
            ``attention_blocks``; -1 outside a block) or None when every token is causal,
        offset: tokens of the conversation already in the KV cache when this generation started (0 for a
            fresh prompt; a later turn on a cache an earlier generation of the run filled,
            :mod:`vtprune.engine.conversation`): the prompt of this call is tokens ``offset .. S-1``,
        prior: per layer, the original indices of the entries that layer's cache held before this call
            (LongTensor [B, c_l], None = all ``offset`` of them): earlier turns' tokens, visual or not,
            which this generation never prunes again,
        inert: the prompt holds no visual token (a text-only turn): the method is not asked anything,
        windows: the sliding-window layers' bookkeeping (:mod:`vtprune.engine.window`; what their cache
            layers dropped, from the front of the lists above), or None when the model has none,
        kinds: the kind of each of the I visual units, ``"image"`` or ``"video"`` (the same in every sample;
            a video is one unit: all its frames' tokens, so its budget is per video).
    """

    def __init__(self, *, visual_index: torch.Tensor, text_index: torch.Tensor, valid: torch.Tensor,
                 num_layers: int, max_new_tokens: int | None,
                 grids_source: Callable[[], tuple | None] | None = None, blocks: torch.Tensor | None = None,
                 offset: int = 0, prior: list[torch.Tensor | None] | None = None,
                 windows: SlidingWindows | None = None, kinds: tuple[str, ...] | None = None):
        self.offset = offset
        self.prior: list[torch.Tensor | None] = prior if prior is not None else [None] * num_layers
        self.visual_index = visual_index
        self.text_index = text_index
        self.valid = valid
        self.batch_size, self.n_images, self.n_visual = visual_index.shape
        self.kinds = kinds if kinds is not None else ("image",) * self.n_images
        if len(self.kinds) != self.n_images:
            raise ValueError(f"{len(self.kinds)} visual kinds given for {self.n_images} visual units")
        self.prompt_length = valid.shape[1]
        self.num_layers = num_layers
        self.max_new_tokens = max_new_tokens
        self.grids_source = grids_source
        self.blocks = blocks
        self.windows = windows
        self.saliency: torch.Tensor | None = None
        self.pads = (~valid).sum(1).tolist()  # per-sample left padding (one host sync, prefill only)
        self.has_padding = any(self.pads)
        self.inert = self.n_images == 0
        self.phase = "prefill"
        self.layer = 0
        self.step = 0
        self.layout = Layout(self.call_index())
        # stock while no layer's sequence or cache differs from the stock model's: an earlier turn that
        # pruned left caches that differ
        self.stock = all(p is None for p in self.prior)
        self.stock_at = [True] * num_layers  # per layer: still the stock sequence at prefill
        self.visual = visual_index
        self.paths: PackedPaths | None = None
        self.hidden: torch.Tensor | None = None
        self.logits: dict[int, torch.Tensor] = {}
        self.requests: dict[int, Any] = {}
        self.layouts: list[Layout | None] = [None] * num_layers
        self.layer_visual: list[torch.Tensor | None] = [None] * num_layers
        self.cache_index: list[torch.Tensor | None] = [None] * num_layers
        self.cache_visual: list[torch.Tensor] = [visual_index] * num_layers
        self.cache: Any = None
        self.kv_measured: tuple[list[int], int, int] | None = None

    # ------------------------------------------------------------------ reading
    @functools.cached_property
    def visual_grids(self) -> tuple | None:
        """PatchGrids of each image's visual tokens, if known (from ``grids_source``, read once)."""
        return self.grids_source() if self.grids_source is not None else None

    @property
    def visual_grid(self) -> tuple[int, int] | None:
        """(rows, cols) when each image's visual tokens are exactly one row-major patch grid, else None."""
        grids = self.visual_grids
        if grids and len(grids) == 1 and grids[0].tokens == self.n_visual and not grids[0].separators:
            return grids[0].rows, grids[0].cols
        return None

    def visual_at(self, layer: int | None = None) -> torch.Tensor:
        """The visual tokens present, LongTensor [B, I, n]: in the main sequence (prefill) or in the KV
        cache of ``layer`` (decode; default the current layer)."""
        if self.phase == "prefill":
            return self.visual
        return self.cache_visual[self.layer if layer is None else layer]

    def visual_count(self, layer: int | None = None) -> int:
        """Visual tokens per image present (see :meth:`visual_at`)."""
        return self.visual_at(layer).shape[-1]

    def total_length(self) -> int:
        """Prompt tokens plus tokens fed back so far (the size of the index space)."""
        return self.valid.shape[1]

    def key_index(self, layer: int) -> torch.Tensor:
        """Token indices of ``layer``'s keys at this step, LongTensor [B, n]: the prefill sequence of
        that layer (prefill), or its KV cache after this step's update (decode; without what a
        sliding-window cache layer dropped)."""
        if self.phase == "prefill":
            return self.prefill_keys(layer).index  # a scored prefill layer: its layout is recorded
        prompt = self.cache_prompt_index(layer)
        fed = torch.arange(self.prompt_length, self.total_length(), device=prompt.device)
        listed = torch.cat([prompt, fed.expand(self.batch_size, -1)], dim=1)
        return listed if self.windows is None else self.windows.keys(layer, listed)

    def visual_attention(self, layer: int) -> torch.Tensor:
        """Attention of the last scored query at ``layer`` to the visual tokens currently present
        (softmax over the whole row in fp32, mean over heads).

        Returns FloatTensor [B, I, n] aligned with :meth:`visual_at`, -inf for a token that is not among
        ``layer``'s keys. Raises RuntimeError if ``layer`` was not scored this step.
        """
        logits = self.logits.get(layer)
        if logits is None:
            raise RuntimeError(f"no attention row was scored at layer {layer}; the method must request it")
        probs = torch.softmax(logits[:, :, -1, :], dim=-1).mean(1)  # [B, k]
        keys = self.key_index(layer).to(probs.device)
        by_index = torch.full((self.batch_size, self.total_length()), float("-inf"), device=probs.device)
        by_index.scatter_(1, keys, probs)
        vis = self.visual_at()
        return torch.gather(by_index, 1, vis.flatten(1).to(probs.device)).view(vis.shape)

    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the current visual tokens at the input of the current prefill layer
        (at layer 0: the projected visual embeddings), FloatTensor [B, I, n, d] in the model dtype,
        aligned with :meth:`visual_at`. Raises RuntimeError outside the prefill or while paths run."""
        if self.phase != "prefill" or self.paths is not None:
            raise RuntimeError("visual_hidden is available in the prefill, on a single path")
        assert self.hidden is not None  # set before each prefill layer's stages
        slots = locate(self.layout.index, self.visual.flatten(1))
        return gather_tokens(self.hidden, slots).view(*self.visual.shape, self.hidden.shape[-1])

    def paths_state(self) -> PackedPaths:
        """The packed paths (:mod:`vtprune.engine.paths`). Raises RuntimeError when none run."""
        if self.paths is None:
            raise RuntimeError("no paths run at this layer")
        return self.paths

    def set_saliency(self, chunks: list[torch.Tensor], order: tuple[str, ...] = ("image", "video")) -> None:
        """Set :attr:`saliency` from what the adapter's saliency hooks gave during the vision forward:
        FloatTensors [n, N_v], one per tower run, the runs in the modality ``order`` (the adapter's
        ``saliency_modalities``: all images of the call, sample-major, then all videos), put in the prompt's
        order of images and videos (:attr:`kinds`). When ``generate`` ran the vision
        tower once per sample and then expanded the batch (``num_beams``, ``num_return_sequences``:
        ``repeat_interleave``, so a sample's copies are adjacent), the saliency is expanded the same way.

        Raises:
            RuntimeError: nothing was given (the vision tower did not run under vtprune in this call).
            ValueError: the saliency does not match the prompt's images.
        """
        if not chunks:
            raise RuntimeError("the method needs a visual saliency but the vision tower did not run under vtprune in "
                               "this call (precomputed vision features, e.g. mm_encoder_outputs, carry none): pass "
                               "pixel_values, or choose a method (option) that needs no saliency")
        sal = torch.cat(chunks, dim=0)
        rows = self.batch_size * self.n_images
        given = sal.shape[0]
        if len(set(self.kinds)) > 1 and given % self.n_images == 0:  # images and videos: to prompt order
            sal = sal[saliency_rows(self.kinds, given // self.n_images, order).to(sal.device)]
        if sal.shape[1:] == (self.n_visual,) and 0 < given < rows and given % self.n_images == 0 and rows % given == 0:
            sal = sal.view(-1, self.n_images, self.n_visual).repeat_interleave(rows // given, dim=0).flatten(0, 1)
        if sal.shape != (rows, self.n_visual):
            raise ValueError(f"mismatched images: saliency for {tuple(sal.shape)} image tokens, prompt holds "
                             f"{self.batch_size} x {self.n_images} images of {self.n_visual} tokens")
        self.saliency = sal.view(self.batch_size, self.n_images, self.n_visual)

    # ------------------------------------------------------------------ acting (through actions)
    def keep_visual(self, keep: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """See :class:`vtprune.engine.decisions.KeepVisual`."""
        keep, order = keep.sort(dim=-1)
        if self.phase == "prefill":
            if self.paths is not None:
                raise RuntimeError("keep_visual while paths run: merge the paths first")
            new_vis = torch.gather(self.visual, 2, keep.to(self.visual.device))
            new_index = self.index_with(new_vis)
            self.set_layout(Layout(new_index), locate(self.layout.index, new_index))
            self.visual = new_vis
            if hidden is not None:
                self._replace_visual_hidden(torch.gather(
                    hidden, 2, order.to(hidden.device)[..., None].expand(-1, -1, -1, hidden.shape[-1])))
            return
        if hidden is not None:
            raise ValueError("keep_visual(hidden=...) replaces hidden states, which exist only in the prefill")
        layer = self.layer
        new_vis = torch.gather(self.cache_visual[layer], 2, keep.to(self.cache_visual[layer].device))
        if self.windows is not None and self.windows.hide(self, layer, new_vis):
            self.stock = False  # hidden entries: this layer's mask differs from the stock one
            return
        old_index, new_index = self.cache_prompt_index(layer), self.with_prior(layer, self.index_with(new_vis))
        n_old, fed = old_index.shape[1], self.step - 1  # tokens fed back before this step are cached
        fed_slots = torch.arange(n_old, n_old + fed, device=new_index.device).expand(self.batch_size, -1)
        select_kv(self.cache.layers[layer], torch.cat([locate(old_index, new_index), fed_slots], 1))
        self.cache_index[layer] = new_index
        self.cache_visual[layer] = new_vis
        self.stock = False  # this layer's cache, hence its mask, now differs from the stock one

    def _replace_visual_hidden(self, hidden: torch.Tensor) -> None:
        """Set the hidden states of the current visual tokens ([B, I, n, d], aligned with ``visual``)."""
        assert self.hidden is not None  # prefill only
        if hidden.shape[:3] != self.visual.shape or hidden.shape[-1] != self.hidden.shape[-1]:
            raise ValueError(f"replacement hidden states of shape {tuple(hidden.shape)} do not match the "
                             f"{tuple(self.visual.shape)} kept visual tokens of width {self.hidden.shape[-1]}")
        slots = locate(self.layout.index, self.visual.flatten(1)).to(self.hidden.device)
        h = self.hidden.clone()
        h.scatter_(1, slots[:, :, None].expand(-1, -1, h.shape[-1]), hidden.flatten(1, 2).to(h))
        self.hidden = h

    # ------------------------------------------------------------------ helpers of the engine
    def prompt_index(self) -> torch.Tensor:
        """Every prompt token, earlier turns' included, in order: LongTensor [B, S]."""
        return torch.arange(self.prompt_length, device=self.valid.device).expand(self.batch_size, -1)

    def call_index(self) -> torch.Tensor:
        """The tokens this call's prefill runs (``offset .. S-1``), in order: LongTensor [B, S - offset]."""
        return torch.arange(self.offset, self.prompt_length, device=self.valid.device).expand(self.batch_size, -1)

    def prior_index(self, layer: int) -> torch.Tensor:
        """Original indices of the entries ``layer``'s cache held before this call: LongTensor [B, c_l]."""
        prior = self.prior[layer]
        if prior is not None:
            return prior
        return torch.arange(self.offset, device=self.valid.device).expand(self.batch_size, -1)

    def with_prior(self, layer: int, index: torch.Tensor) -> torch.Tensor:
        """``index`` ([B, n], tokens of this call) preceded by ``layer``'s earlier entries: the layer's keys."""
        if self.offset == 0:
            return index
        return torch.cat([self.prior_index(layer).to(index.device), index], dim=1)

    def prefill_keys(self, layer: int, layout: Layout | None = None) -> Layout:
        """The keys of prefill layer ``layer`` whose sequence is ``layout`` (default: the layer's recorded
        one): the entries of earlier turns (group 0), then the sequence."""
        lay = layout if layout is not None else cast(Layout, self.layouts[layer])
        if self.offset == 0:
            return lay
        index = self.with_prior(layer, lay.index)
        group = None
        if lay.group is not None:
            zeros = torch.zeros(lay.group.shape[0], index.shape[1] - lay.length, dtype=lay.group.dtype,
                                device=lay.group.device)
            group = torch.cat([zeros, lay.group], dim=1)
        return Layout(index, group)

    def prefill_kv_slots(self, layer: int, src: torch.Tensor) -> torch.Tensor:
        """Slots of ``layer``'s cache to keep when its prefill sequence keeps slots ``src`` ([B, m]): the
        earlier turns' entries come first in the cache and are all kept."""
        if self.offset == 0:
            return src
        c = self.prior_index(layer).shape[1]
        head = torch.arange(c, device=src.device).expand(src.shape[0], -1)
        return torch.cat([head, src + c], dim=1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow ``generate``'s reordering of the cache's batch rows (beam search): row i now holds what
        row ``rows[i]`` held (LongTensor [B])."""
        for layer in range(self.num_layers):
            index = self.cache_index[layer]
            if index is not None:
                self.cache_index[layer] = index[rows.to(index.device)]
            vis = self.cache_visual[layer]
            if vis is not self.visual_index:
                self.cache_visual[layer] = vis[rows.to(vis.device)]
        if self.windows is not None:
            self.windows.reorder(rows)

    def cache_prompt_index(self, layer: int) -> torch.Tensor:
        """Prompt tokens in ``layer``'s KV cache after the prefill, LongTensor [B, n_l]."""
        index = self.cache_index[layer]
        return self.prompt_index() if index is None else index

    def index_with(self, vis: torch.Tensor) -> torch.Tensor:
        """All text tokens plus the visual tokens ``vis`` [B, I, n], sorted: LongTensor [B, T + I n]."""
        return torch.cat([self.text_index, vis.flatten(1)], dim=1).sort(dim=1).values

    def set_layout(self, layout: Layout, src: torch.Tensor) -> None:
        """Make ``layout`` the sequence from this layer on; slot i takes the hidden state of slot
        ``src[:, i]`` of the previous sequence."""
        assert self.hidden is not None  # prefill only: the current layer's input
        self.hidden = gather_tokens(self.hidden, src)
        self.layout = layout
        self.stock = False
