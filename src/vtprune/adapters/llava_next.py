"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, llava-hf/llava-v1.6-* checkpoints).

LLaVA-NeXT encodes each image as several CLIP tiles ("any resolution"): a base tile (the whole image
resized, 576 tokens at 336 px) plus a grid of high-resolution tiles chosen from
``config.image_grid_pinpoints``. The model packs their features per image as: the base tile's patches,
then the high-resolution grid as one feature map, unpadded to the image's aspect ratio, row by row with
the learned ``image_newline`` token after every row (``LlavaNextModel.pack_image_features``). The number
of visual tokens of an image therefore depends on its ``image_sizes`` entry, and the processor expands
``<image>`` into exactly that many image tokens (newline positions included).

This adapter finds the visual positions from ``input_ids == config.image_token_id``, splits them into
images with the token count the model computes for each image, and maps the CLIP [CLS] attention of
every tile through the model's own packing so that saliency[i] scores the i-th visual token.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vtprune.adapters.base import (
    PatchGrid,
    SampleGroup,
    images_per_sample,
    register_adapter,
    select_rows,
    visual_spans,
)
from vtprune.adapters.llava import LlavaAdapter

NEWLINE = -1  # marks an ``image_newline`` token in a packing map


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: CLIP ViT tower run on every tile, MLP projector, any-resolution packing, Llama /
    Mistral / Vicuna language model (the decoder, text config and image token id sit where LLaVA-1.5
    keeps them, so those answers are inherited from :class:`LlavaAdapter`).

    Visual tokens per image: not fixed by the config (:meth:`tokens_per_image` is None); they follow
    each image's size. vtprune schedules a batch with the same number of images per sample and the
    same number of visual tokens per image: :meth:`batch_groups` splits a ``generate`` batch of mixed
    sizes into groups that satisfy this (:mod:`vtprune.engine.groups` runs and merges them); two images
    of different counts in one prompt, or a mixed batch in a direct forward, make :meth:`visual_index`
    raise ValueError. Budgets are per image (``budget`` tokens) or a ``keep_ratio`` resolved per call,
    as ``ceil(keep_ratio * N_v)`` of that call's images.

    Saliency (``attach_saliency``): for every tile (the tower runs all tiles of all images as one batch)
    the [CLS] query attention to each patch in the encoder layer whose output LLaVA-NeXT projects
    (``vision_feature_layer``), summed over heads (:func:`vtprune.adapters.llava.cls_attention`), then
    packed by the model's own ``pack_image_features`` (base tile, unpadded high-resolution grid, one
    newline per row). A newline token has no [CLS] attention of its own (it is a learned embedding, not
    a patch): its saliency is ``-inf``, so saliency-ranked selection (ParVTS subjects, VisionZip
    dominant tokens) never spends budget on it; it stays with the non-selected tokens. Source: ParVTS
    (arXiv 2511.18875) Fig. 4 ([CLS] attention); the per-tile computation and the newline value are
    reconstructed (ParVTS describes LLaVA-1.5's single tile).

    Patch grids (``visual_grids``, for ``pool``): the base tile's grid and the unpadded high-resolution
    grid (one newline closing each row), read off the same packing map.

    Only ``vision_feature_select_strategy="default"`` (every llava-hf LLaVA-NeXT checkpoint) is
    supported where the packing is needed: with ``"full"`` the model's own packing does not line up.
    """

    model_classes = ("LlavaNextForConditionalGeneration",)
    family = "llava_next"

    def __init__(self, model):
        super().__init__(model)
        self._maps: dict[tuple, tuple[torch.Tensor, int]] = {}  # packing maps by image layout

    def visual_grid(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[int, int] | None:
        """None: a base tile plus unpadded high-resolution rows with newline tokens is not one grid
        (:meth:`visual_grids` gives the two grids)."""
        return None

    def visual_grids(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[PatchGrid, ...] | None:
        """The two grids of each image's visual tokens, from its ``image_sizes`` entry through
        :meth:`packing`: the base tile (side x side patches, tokens 0..P-1) and the unpadded
        high-resolution grid (R x C patches from token P on, stride C + 1: one newline closing each row).

        ``image_sizes`` is read from the prefill call or, inside ``generate`` (which consumes it before
        the prefill), from ``inputs["generate_kwargs"]``. None when neither has it, the images' grids
        differ (sizes that give equal token counts but different shapes), the grids do not cover
        ``visual``'s N_v tokens, or ``vision_feature_select_strategy`` is not :attr:`packed_strategy`.
        """
        inputs = inputs or {}
        if self.model.config.vision_feature_select_strategy != self.packed_strategy:
            return None
        packings = self.image_packings(inputs)
        if packings is None:
            packings = self.image_packings(inputs.get("generate_kwargs") or {})
        if packings is None:
            return None
        layouts = {(self.grids_of(source), source.numel()) for source, _ in packings}
        if len(layouts) != 1:
            return None
        grids, n_visual = layouts.pop()
        return grids if n_visual == visual.shape[-1] else None

    @property
    def tile_side(self) -> int:
        """Patches per side of one tile (``vision_config.image_size // patch_size``)."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def grids_of(self, source: torch.Tensor) -> tuple[PatchGrid, ...] | None:
        """Base and high-resolution grids read off a packing map (:meth:`packing`'s ``source``); None if
        it is not base tile + rows closed by one newline each."""
        side = self.tile_side
        base = side * side
        if source.numel() <= base or not torch.equal(source[:base], torch.arange(base)):
            return None
        rest = source[base:]
        rows = int((rest == NEWLINE).sum())
        if rows == 0 or rest.numel() % rows or rest.numel() // rows < 2:
            return None
        hires = PatchGrid(rows, rest.numel() // rows - 1, start=base, stride=rest.numel() // rows)
        if not torch.equal((rest == NEWLINE).nonzero().flatten(), torch.arange(rows) * hires.stride + hires.cols):
            return None
        return PatchGrid(side, side), hires

    def tokens_per_image(self) -> int | None:
        """None: LLaVA-NeXT's visual tokens per image depend on each image's size."""
        return None

    # ------------------------------------------------------------------ packing
    packed_strategy = "default"
    """The ``vision_feature_select_strategy`` whose features the model's packing lines up with (LLaVA-NeXT's
    CLIP towers: ``"default"``, [CLS] dropped)."""

    def image_packings(self, inputs: dict) -> list[tuple[torch.Tensor, int]] | None:
        """:meth:`packing` of every image of a call (``inputs``: its keyword arguments), in the order of
        its ``image_sizes``; None when it has no ``image_sizes``. Raises ValueError as :meth:`packing`."""
        sizes = inputs.get("image_sizes")
        return None if sizes is None else [self.packing(s) for s in sizes]

    def packing(self, image_size) -> tuple[torch.Tensor, int]:
        """Where each visual token of an image comes from, in the model's packing order.

        Args:
            image_size: the image's (height, width) in pixels, as in ``image_sizes`` (list, tuple or
                tensor).

        Returns:
            (source LongTensor [N_v] on the CPU, n_tiles): ``source[i] = t * P + p`` when token i is
            patch p of tile t (tile 0 the base image, tiles 1.. the high-resolution grid in the
            processor's row-major order; P patches per tile after dropping [CLS]), ``NEWLINE`` (-1) for
            an ``image_newline`` token; n_tiles the tiles the model encodes for this image.

        Computed by running the model's ``pack_image_features`` on tile-patch numbers instead of
        features, so it follows the model exactly (grid choice, unpadding, newlines).

        Raises:
            ValueError: ``vision_feature_select_strategy`` other than ``"default"``, or an image size
                that is not two positive ints.
        """
        size = _size_tuple(image_size)
        if size not in self._maps:
            cfg = self.model.config
            self.check_strategy()
            n_tiles = image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            per_tile = self.tile_side**2
            numbers = torch.arange(n_tiles * per_tile, dtype=torch.float64).view(n_tiles, per_tile, 1)
            packed, _ = self.model.model.pack_image_features(
                [numbers], [size], cfg.vision_feature_select_strategy,
                image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64))
            self._maps[size] = (packed[0][:, 0].long(), n_tiles)
        return self._maps[size]

    def check_strategy(self) -> None:
        """Raise ValueError unless the model's ``vision_feature_select_strategy`` is :attr:`packed_strategy`."""
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != self.packed_strategy:
            raise ValueError(f"vtprune supports {type(self.model).__name__} with vision_feature_select_strategy="
                             f"{self.packed_strategy!r} (every llava-hf checkpoint); this model uses {strategy!r}")

    def image_token_counts(self, inputs: dict | None) -> list[int] | None:
        """Visual tokens of every image of a call, in the order of ``image_sizes`` (sample-major).

        From ``mm_encoder_outputs["image"].pooler_output`` (the per-image packed features that
        ``generate`` computes before the prefill) when present, else from ``image_sizes`` through
        :meth:`packing`. None when the call carries no images (no ``pixel_values``, or an empty one).

        Raises:
            ValueError: ``pixel_values`` without ``image_sizes``.
        """
        inputs = inputs or {}
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return [int(f.shape[0]) for f in encoded.pooler_output]
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.shape[0] == 0:
            return None
        packings = self.image_packings(inputs)
        if packings is None:
            raise ValueError(f"{type(self.model).__name__} needs image_sizes (one (height, width) per image) with "
                             "pixel_values; pass the processor's output unchanged")
        return [source.numel() for source, _ in packings]

    # ------------------------------------------------------------------ visual positions
    def visual_index(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """Original indices of every image's visual tokens (newline tokens included, in place).

        Args:
            input_ids: LongTensor [B, S] of the prefill call.
            inputs: the call's other kwargs: ``image_sizes`` and ``pixel_values`` (a direct forward), or
                ``mm_encoder_outputs`` (``generate`` encodes the images first). Without any, images are
                the contiguous runs of image tokens.

        Returns:
            LongTensor [B, I, N_v] (ascending), on the device of ``input_ids``.

        Raises:
            ValueError: a sample without image tokens; image tokens that disagree with the images'
                token counts (their number, or an image boundary inside a run); images of different
                token counts in one batch or prompt, or samples with different numbers of images
                ("mismatched images").
        """
        counts = self.image_token_counts(inputs)
        if counts is None:
            return visual_spans(input_ids, self.image_token_id)
        return split_images(input_ids, self.image_token_id, counts)

    # ------------------------------------------------------------------ batches of mixed image sizes
    image_inputs = ("pixel_values", "image_sizes")

    def image_counts_per_sample(self, input_ids: torch.Tensor, inputs: dict) -> list[list[int]] | None:
        """Each sample's images' token counts, from ``image_sizes`` (None without it or without
        ``pixel_values``). Raises ValueError as :func:`~vtprune.adapters.base.images_per_sample`."""
        if inputs.get("image_sizes") is None or inputs.get("pixel_values") is None:
            return None
        counts = self.image_token_counts(inputs)
        if counts is None:  # an empty pixel_values: no images, nothing to group
            return None
        return images_per_sample(input_ids, self.image_token_id, counts)

    def select_samples(self, inputs: dict, group: SampleGroup) -> dict:
        """``inputs`` (a ``generate`` call's keyword arguments) restricted to ``group``: per-sample tensors
        by sample, ``pixel_values`` / ``image_sizes`` by the group's images."""
        images = torch.tensor(group.images)
        return select_rows(inputs, group.samples, {k: images for k in self.image_inputs})

    # ------------------------------------------------------------------ saliency
    def attach_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        """Register what calls ``sink(saliency)`` once per image (or video) of each vision forward, with saliency
        a FloatTensor [1, N_v] in packing order (``-inf`` at newline tokens). Returns removable handles.

        The per-tile saliency comes from :meth:`attach_tile_saliency` (LLaVA-NeXT: the [CLS] attention of
        :meth:`LlavaAdapter.attach_saliency`); packing it needs the call's ``image_sizes``, which reaches only
        the model's ``get_image_features`` (``generate`` calls it before the prefill, a direct forward from
        inside the model's forward). So this wraps that method, and every other encoder method of
        :meth:`saliency_encoders`, on the model instance (an instance attribute with the same signature,
        removed by the handle; the class and other instances are untouched).
        """
        tiles: list[torch.Tensor] = []
        handles = self.attach_tile_saliency(tiles.append)
        try:
            inner = self.model.model
            for name, pack in self.saliency_encoders().items():
                handles.append(InstanceOverride(inner, name, self._packing_encoder(getattr(inner, name), pack,
                                                                                   tiles, sink)))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    def saliency_encoders(self) -> dict[str, Callable[[torch.Tensor | None, dict], list[torch.Tensor]]]:
        """The inner model's encoder methods whose tower runs give saliency, each with what packs a call's
        per-tile saliency (``pack(per_tile, bound arguments)`` -> one FloatTensor [N_v] per unit). LLaVA-NeXT:
        ``get_image_features`` with :meth:`pack_call_saliency`."""
        return {"get_image_features": self.pack_call_saliency}

    @staticmethod
    def _packing_encoder(original: Callable, pack: Callable, tiles: list[torch.Tensor],
                         sink: Callable[[torch.Tensor], None]) -> Callable:
        """``original`` (an encoder method) wrapped to pack the tiles its tower run captured and sink them."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encoder(*args, **kwargs):
            tiles.clear()
            out = original(*args, **kwargs)
            arguments = signature.bind(*args, **kwargs).arguments
            per_tile = torch.cat(tiles) if tiles else None
            tiles.clear()
            for unit in pack(per_tile, arguments):
                sink(unit[None])
            return out

        return encoder

    def attach_tile_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        """Hooks that call ``sink`` with the per-patch saliency of every tile the tower encodes, FloatTensor
        [n_tiles, P] (LLaVA-NeXT: :meth:`LlavaAdapter.attach_saliency`'s [CLS] attention). Returns the handles."""
        return super().attach_saliency(sink)

    def pack_call_saliency(self, per_tile: torch.Tensor | None, arguments: dict) -> list[torch.Tensor]:
        """:meth:`pack_saliency` for one ``get_image_features`` call, given its bound ``arguments``."""
        return self.pack_saliency(per_tile, arguments["image_sizes"])

    def pack_saliency(self, per_tile: torch.Tensor | None, image_sizes) -> list[torch.Tensor]:
        """Map per-tile patch saliency to each image's visual tokens.

        Args:
            per_tile: FloatTensor [n_tiles_total, P], tiles of all images in ``image_sizes`` order.
            image_sizes: (height, width) of every image ([n_images, 2] tensor or list).

        Returns:
            one FloatTensor [N_v] per image, ``-inf`` at newline tokens.

        Raises:
            RuntimeError: no saliency was captured, or it covers a different number of tiles than the
                images need.
        """
        maps = [self.packing(s) for s in image_sizes]
        need = sum(n for _, n in maps)
        if per_tile is None or per_tile.shape[0] != need:
            got = 0 if per_tile is None else per_tile.shape[0]
            raise RuntimeError(f"LLaVA-NeXT saliency: captured [CLS] attention for {got} tiles, the images need {need}")
        out, start = [], 0
        for source, n_tiles in maps:
            flat = per_tile[start:start + n_tiles].float().flatten()
            start += n_tiles
            source = source.to(flat.device)
            out.append(torch.where(source == NEWLINE, float("-inf"), flat[source.clamp(min=0)]))
        return out


def split_images(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> torch.Tensor:
    """Split the image-token positions of a batch into images of known token counts.

    Args:
        input_ids: LongTensor [B, S].
        image_token_id: the image placeholder id.
        counts: visual tokens of every image of the batch, sample-major (sample 0's images first).

    Returns:
        LongTensor [B, I, N_v] as :func:`vtprune.adapters.base.visual_spans`.

    Raises:
        ValueError: as :func:`images_per_sample`; images of different token counts, or different
            numbers of images per sample ("mismatched images").
    """
    per_sample = images_per_sample(input_ids, image_token_id, counts)
    sizes = {c for mine in per_sample for c in mine}
    if len(sizes) != 1 or any(len(m) != len(per_sample[0]) for m in per_sample):
        raise ValueError("mismatched images: vtprune needs every image of a prompt to give the same number of visual "
                         "tokens and every sample the same number of images; the count follows each image's size "
                         f"(any-resolution tiles); got visual tokens per image per sample {per_sample}")
    return visual_spans(input_ids, image_token_id, sizes.pop())


class InstanceOverride:
    """Shadow a method on one object with an instance attribute; ``remove()`` restores it."""

    def __init__(self, obj, name: str, value):
        self.obj, self.name = obj, name
        self.had = name in obj.__dict__
        self.previous = obj.__dict__.get(name)
        obj.__dict__[name] = value

    def remove(self) -> None:
        if self.had:
            self.obj.__dict__[self.name] = self.previous
        else:
            self.obj.__dict__.pop(self.name, None)


def _size_tuple(image_size) -> tuple[int, int]:
    values = image_size.tolist() if hasattr(image_size, "tolist") else list(image_size)
    if len(values) != 2 or any(int(v) != v or v <= 0 for v in values):
        raise ValueError(f"an image size must be (height, width) in pixels, two positive ints; got {values}")
    return int(values[0]), int(values[1])
