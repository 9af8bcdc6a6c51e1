"""InternVL 2.5 / 3 / 3.5 in transformers' own format (``InternVLForConditionalGeneration``,
``OpenGVLab/InternVL3-*-hf`` and ``OpenGVLab/InternVL3_5-*-HF`` checkpoints).

How the model lays out an image (transformers' ``modeling_internvl.py`` and ``processing_internvl.py``):
the image processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``) cuts each image into a grid of
square tiles whose aspect follows the image's, plus a thumbnail (the whole image resized to one tile)
when there is more than one tile; the processor then pops ``num_patches`` (the tiles per image), so the
model sees only the flat ``pixel_values`` [all tiles of all images, 3, H, W]. The InternViT tower encodes
every tile ([CLS] + side x side patches), drops [CLS], and ``pixel_shuffle`` concatenates each 2 x 2 group
of patches (``1 / downsample_ratio`` per side) into one feature: a row-major (side / 2) x (side / 2) grid
per tile, ``P`` tokens per tile (``config.image_seq_length`` in the processor, 256 at 448 px with 14 px
patches). In the prompt an image is ``<img>`` + ``<IMG_CONTEXT>`` x (P x tiles) + ``</img>``, the
context tokens (``config.image_token_id``) filled with the tiles' features in order. A video's frames
are written the same way, one tile per frame, so each frame counts as an image here.

vtprune reads all of it from the token ids and the config: the images are the runs of
``<IMG_CONTEXT>`` (``<img>`` / ``</img>`` separate adjacent images), an image's tiles are its run's length
over P (P from the vision config and ``downsample_ratio``, checked against the model's own
``pixel_shuffle``), and the tiles of every image sit consecutively in ``pixel_values``. Positions are 1-D
(the language model's own RoPE), so the engine keeps each kept token's original position; decode positions
follow the base adapter's default (stock cache length + step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from vtprune.adapters.base import (
    Adapter,
    PatchGrid,
    SampleGroup,
    register_adapter,
    select_rows,
    token_runs,
    visual_spans,
)
from vtprune.adapters.llava import cls_attention, feature_block


@register_adapter
class InternVLAdapter(Adapter):
    """InternVL: InternViT tower with [CLS], pixel shuffle (2 x 2 patches -> one token), MLP projector,
    Qwen2 / Qwen3 language model; any-resolution tiles plus a thumbnail.

    Visual tokens per image: ``P x tiles``, where the tiles follow the image's size (not fixed by the
    config: :meth:`tokens_per_image` is None). A budget (``budget`` tokens, or ``keep_ratio`` of N_v) is
    per image, over all its tiles and its thumbnail. vtprune needs the same number of images per sample
    and of tiles per image within a batch: a ``generate`` batch of mixed tile counts runs as groups
    (:meth:`batch_groups`, :meth:`select_samples`); two images of different tile counts in one prompt,
    or a mixed batch in a direct forward, raise ValueError ("mismatched images").

    Saliency (``attach_saliency``, for ParVTS' subjects and VisionZip's dominant tokens): for every tile,
    the tower's [CLS] query attention to each patch in the encoder block whose output the model projects
    (``vision_feature_layer``, the last block for every released checkpoint), summed over heads and
    computed from that block's own q / k projections and q / k norms
    (:func:`vtprune.adapters.llava.cls_attention`); then summed over the patches that ``pixel_shuffle``
    merges into each LLM token (:meth:`merge_groups`), and the tiles of an image concatenated in their
    order (thumbnail last), so ``saliency[i]`` scores the image's i-th visual token. The merged tokens
    have no [CLS] of their own (the tower's [CLS] is dropped before the shuffle): the sum over each
    token's patches is reconstructed, as is the per-tile use (ParVTS, arXiv 2511.18875, Fig. 4, and
    VisionZip use [CLS] attention on a single CLIP image). Each tile's [CLS] attention is normalised over
    that tile only, so tiles compare on the same scale (each tile's values sum to at most the number of
    heads: [CLS]'s own share is dropped).

    Patch grids (``visual_grids``, for ``pool``): one grid per tile, the thumbnail included, each
    (side / 2) x (side / 2) merged tokens, row-major as the shuffle emits them; ``pool`` splits the
    budget over the tiles in proportion to their tokens and pools each tile on its own.
    """

    model: Any  # a transformers model whose config and submodules are read by name
    model_classes = ("InternVLForConditionalGeneration",)
    family = "internvl"

    # ------------------------------------------------------------------ tiles
    @property
    def tile_side(self) -> int:
        """Patches per side of one tile (``vision_config.image_size // patch_size``).

        Raises:
            ValueError: non-square tiles (the model's own reshape assumes square ones).
        """
        vision = self.model.config.vision_config
        rows, cols = (s // p for s, p in zip(_pair(vision.image_size), _pair(vision.patch_size), strict=True))
        if rows != cols:
            raise ValueError(f"vtprune supports InternVL with square tiles; this model's tiles are {rows} x {cols} "
                             "patches")
        return rows

    @functools.cached_property
    def _merge_groups(self) -> torch.Tensor:
        side = self.tile_side
        numbers = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
        merged = self.model.model.pixel_shuffle(numbers, scale_factor=self.model.config.downsample_ratio)
        return merged.reshape(-1, merged.shape[-1]).long()

    def merge_groups(self) -> torch.Tensor:
        """Which patches of a tile each LLM token concatenates: LongTensor [P, k] (CPU), row t the k =
        ``1 / downsample_ratio**2`` patch indices (row-major among the tile's side x side patches, [CLS]
        dropped) that ``pixel_shuffle`` puts into token t. Computed by running the model's own
        ``pixel_shuffle`` on patch numbers, so it follows the model exactly."""
        return self._merge_groups

    @property
    def tokens_per_tile(self) -> int:
        """P: LLM tokens per tile (``(side * downsample_ratio) ** 2``, e.g. 256 at 448 px / 14 px patches)."""
        return self.merge_groups().shape[0]

    def tokens_per_image(self) -> int | None:
        """None: InternVL's visual tokens per image follow its tiles, hence its size."""
        return None

    # ------------------------------------------------------------------ visual positions
    def visual_index(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """Original indices of every image's visual tokens: each run of ``<IMG_CONTEXT>`` tokens is one
        image (see :meth:`Adapter.visual_index`).

        Args:
            input_ids: LongTensor [B, S] of the prefill call.
            inputs: its other keyword arguments: ``pixel_values`` (a direct forward) or
                ``mm_encoder_outputs`` (``generate`` encodes the tiles first), used to check the tile count.

        Returns:
            LongTensor [B, I, N_v] (ascending), on the device of ``input_ids``.

        Raises:
            ValueError: a sample without image tokens; an image whose tokens are not a whole number of
                tiles, or image tokens that disagree with the tiles given ("disagree"); images of different
                tile counts in one batch or prompt, or samples with different numbers of images
                ("mismatched images").
        """
        self.image_counts(input_ids, inputs or {})  # the checks
        return visual_spans(input_ids, self.image_token_id)

    def image_counts(self, input_ids: torch.Tensor, inputs: dict) -> list[list[int]]:
        """Visual tokens of each sample's images (the runs of image tokens), checked against the tiles
        of the call: every run a whole number of tiles, and all runs together the tiles in
        ``pixel_values`` (or in ``mm_encoder_outputs["image"].pooler_output`` [tiles, P, D]) when given.

        Raises:
            ValueError: as :meth:`visual_index` ("disagree").
        """
        per_sample = [[r.numel() for r in runs] for runs in token_runs(input_ids, self.image_token_id)]
        p = self.tokens_per_tile
        counts = [c for mine in per_sample for c in mine]
        if any(c % p for c in counts):
            raise ValueError(f"image tokens disagree with the tiles: an InternVL image is {p} image tokens "
                             f"(image_token_id={self.image_token_id}) per tile, got runs of {per_sample} per sample; "
                             "build the prompt with the model's processor (image_seq_length = tokens per tile)")
        tiles = self.tiles_in_call(inputs)
        if tiles is not None and tiles * p != sum(counts):
            raise ValueError(f"image tokens disagree with the images: input_ids hold {sum(counts)} image tokens "
                             f"({sum(counts) // p} tiles of {p}), the call carries {tiles} tiles; build the prompt "
                             "with the model's processor from the same images")
        return per_sample

    @staticmethod
    def tiles_in_call(inputs: dict) -> int | None:
        """Tiles a call encodes: rows of ``pixel_values``, or of the precomputed
        ``mm_encoder_outputs["image"].pooler_output``; None when it carries neither."""
        pixels = inputs.get("pixel_values")
        if pixels is not None:
            return int(pixels.shape[0])
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        return int(features.shape[0]) if torch.is_tensor(features) else None

    # ------------------------------------------------------------------ batches of mixed tile counts
    def image_counts_per_sample(self, input_ids: torch.Tensor, inputs: dict) -> list[list[int]] | None:
        """Each sample's images' token counts (:meth:`image_counts`); None without ``pixel_values``."""
        if inputs.get("pixel_values") is None:
            return None
        return self.image_counts(input_ids, inputs)

    def select_samples(self, inputs: dict, group: SampleGroup) -> dict:
        """``inputs`` restricted to ``group``: per-sample tensors by sample, ``pixel_values`` by the tiles
        of the group's images (each image's tiles are consecutive rows, images sample-major)."""
        counts = [c for mine in self.image_counts(inputs["input_ids"], inputs) for c in mine]
        tiles = [c // self.tokens_per_tile for c in counts]
        rows = torch.arange(sum(tiles)).split(tiles)
        return select_rows(inputs, group.samples, {"pixel_values": torch.cat([rows[i] for i in group.images])})

    # ------------------------------------------------------------------ patch grids
    def visual_grids(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[PatchGrid, ...] | None:
        """One (side / 2) x (side / 2) grid per tile of each image (tile t's tokens ``t * P`` to
        ``(t + 1) * P - 1``; the thumbnail is the last tile); None when N_v is not a whole number of
        tiles or the merged tokens of a tile do not form a square."""
        p, n_visual = self.tokens_per_tile, visual.shape[-1]
        side = math.isqrt(p)
        if side * side != p or n_visual % p:
            return None
        return tuple(PatchGrid(side, side, start=t * p) for t in range(n_visual // p))

    # ------------------------------------------------------------------ saliency
    def attach_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        """Hooks that call ``sink`` once per image of each prefill with FloatTensor [1, N_v]: the merged
        per-tile [CLS] attention of the class docstring, tiles in order. Returns removable handles.

        The tower runs on the flat tiles (inside ``generate`` before the prefill call, in a direct
        forward inside it), and the tiles per image are known only from the prompt; so a pre-hook on
        the feature block's attention keeps the tiles' saliency, a pre-hook on the model keeps the
        call's ``input_ids``, and a pre-hook on the language model (after the tower, before layer 0)
        deals the tiles out to the images.

        Raises:
            ValueError: ``vision_feature_select_strategy`` other than ``"default"`` (the model then keeps
                [CLS] among the features), or a feature layer that is the tower's embeddings.
        """
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError("vtprune's InternVL saliency needs vision_feature_select_strategy='default' (every "
                             f"released checkpoint); this model uses {cfg.vision_feature_select_strategy!r}")
        layers = self.model.model.vision_tower.encoder.layer
        attn = layers[feature_block(cfg.vision_feature_layer, len(layers))].attention
        groups = self.merge_groups()
        pending: dict = {}

        def on_attention(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            per_patch = cls_attention(module, hidden, drop_cls=True)  # [tiles, side * side]
            pending["tiles"] = per_patch[:, groups.to(per_patch.device)].sum(-1)  # [tiles, P]

        def on_model(module, args, kwargs):
            pending["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

        def on_language_model(module, args, kwargs):
            tiles, ids = pending.pop("tiles", None), pending.get("input_ids")
            if tiles is None or ids is None:
                return
            counts = [c // self.tokens_per_tile for mine in self.image_counts(ids, {}) for c in mine]
            if sum(counts) > tiles.shape[0] and sum(counts) % tiles.shape[0] == 0:
                # generate ran the tower once per prompt, then expanded the batch (beams, several
                # sequences: each row repeated, adjacent): deal the tiles over the prompts once
                repeat = sum(counts) // tiles.shape[0]
                counts = [c // self.tokens_per_tile for mine in self.image_counts(ids[::repeat], {}) for c in mine]
            if sum(counts) != tiles.shape[0]:
                raise RuntimeError(f"InternVL saliency: captured [CLS] attention for {tiles.shape[0]} tiles, the "
                                   f"prompt's images need {sum(counts)}")
            for image in tiles.split(counts):
                sink(image.reshape(1, -1))

        return [attn.register_forward_pre_hook(on_attention, with_kwargs=True),
                self.model.register_forward_pre_hook(on_model, with_kwargs=True),
                self.language_model.register_forward_pre_hook(on_language_model, with_kwargs=True)]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
