"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, llava-hf/llava-onevision-* checkpoints).

OneVision packs an image as LLaVA-NeXT does (:mod:`vtprune.adapters.llava_next`: the base tile, then the
high-resolution grid unpadded to the image's aspect ratio, row by row, each row closed by the learned
``image_newline``), with three differences that this adapter handles on top of NeXT's:

* the tower is SigLIP (no [CLS]; ``vision_feature_select_strategy="full"``: every patch is a feature);
* ``vision_aspect_ratio="anyres_max_N"``: when the unpadded grid holds more than about ``N`` tiles' worth
  of patches (``sqrt(h * w / (N * side**2)) > 1.1``), ``pack_image_features`` downsamples it bilinearly to
  ``floor(h / ratio) x floor(w / ratio)`` before adding the newlines, so those tokens are mixtures of
  several patches, not single patches;
* a sample with several images (``batch_num_images`` > 1, from the processor) gets each image as one tile,
  its side x side patches followed by a single trailing newline (no high-resolution grid).

Video inputs (``pixel_values_videos``, video tokens) are refused: vtprune schedules image tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from vtprune.adapters.base import PatchGrid, refuse_video, register_adapter
from vtprune.adapters.llava import attention_received
from vtprune.adapters.llava_next import NEWLINE, LlavaNextAdapter, _size_tuple

MIXED = -2
"""Marks, in a packing map, a token that the ``anyres_max`` downsampling interpolated from several patches."""

VIDEO_KEYS = ("pixel_values_videos", "image_sizes_videos")
NEVER_DOWNSAMPLE = "anyres_max_1000000000"  # a vision_aspect_ratio under which no grid is downsampled


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP tower run on every tile, MLP projector, NeXT's any-resolution packing with
    ``anyres_max_N`` downsampling, Qwen2 language model. Visual positions, mixed-size batches (as groups)
    and the packing by the model's own ``pack_image_features`` are LLaVA-NeXT's
    (:class:`~vtprune.adapters.llava_next.LlavaNextAdapter`); an image's token count follows its size,
    and, in a sample of several images, is side x side + 1 whatever the size.

    Saliency (``attach_saliency``): SigLIP has no [CLS], so for every tile the attention each patch
    receives in the encoder layer whose output OneVision projects (``vision_feature_layer``, the last
    one for every llava-hf checkpoint), averaged over heads and over the tile's queries
    (``1 / (H P) * sum_h sum_i A_h[i, p]``, :func:`vtprune.adapters.llava.attention_received`; each
    tile's values sum to 1), computed from that layer's own q / k projections in a forward pre-hook (the
    tower keeps its kernel); then packed by the model's own ``pack_image_features``, exactly as the
    features are: base tile, unpadded grid, bilinearly downsampled where ``anyres_max_N`` downsamples
    the features (a mixed token's saliency is the same mixture of its patches' saliencies), and ``-inf``
    at every newline token (a learned embedding, not a patch: saliency-ranked selection never spends
    budget on it). Source: reconstructed: ParVTS (arXiv 2511.18875) Fig. 4 and VisionZip use [CLS]
    attention; the attention a patch receives from all patches is its [CLS]-free counterpart (as for
    Qwen2-VL), and the packing and downsampling follow the model.

    Patch grids (``visual_grids``, for ``pool``): a single-image sample's tokens are NeXT's two grids,
    the base tile and the unpadded high-resolution grid with one newline per row; where ``anyres_max``
    downsampled that grid, the second grid is the downsampled one (each token a mixture of patches, but
    still one cell of a row-major grid with a newline per row, so pooling it is exact pooling of the
    tokens the model sees). In a multi-image sample each image is one side x side grid; its trailing
    newline is in no grid, and ``pool`` keeps it unchanged.
    """

    model: Any  # a transformers model whose config and submodules are read by name
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    family = "llava_onevision"
    packed_strategy = "full"

    # ------------------------------------------------------------------ packing
    def image_packings(self, inputs: dict) -> list[tuple[torch.Tensor, int]] | None:
        """:meth:`packing` of every image of a call, from its ``image_sizes`` and ``batch_num_images``
        (images per sample; an image is tiled only in a sample of one image, as the model and its
        processor decide; without ``batch_num_images`` every image is tiled, as in the model). None
        without ``image_sizes``.

        Raises:
            ValueError: ``batch_num_images`` that does not add up to the images of ``image_sizes``.
        """
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return None
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            tiled = [True] * len(sizes)
        else:
            per_sample = [int(n) for n in per_sample]
            tiled = [n == 1 for n in per_sample for _ in range(n)]
            if len(tiled) != len(sizes):
                raise ValueError(f"batch_num_images {per_sample} (images per sample) does not add up to the "
                                 f"{len(sizes)} images of image_sizes; pass the processor's output unchanged")
        return [self.packing(s, t) for s, t in zip(sizes, tiled, strict=True)]

    def packing(self, image_size, tiled: bool = True) -> tuple[torch.Tensor, int]:
        """Where each visual token of an image comes from, in the model's packing order.

        Args:
            image_size: the image's (height, width) in pixels (list, tuple or tensor).
            tiled: whether the model tiles the image (the image is alone in its sample).

        Returns:
            (source LongTensor [N_v] on the CPU, n_tiles): as :meth:`LlavaNextAdapter.packing`
            (``t * P + p`` for patch p of tile t, ``NEWLINE`` (-1) for a newline token), except that the
            tokens of a high-resolution grid that ``anyres_max_N`` downsampled are ``MIXED`` (-2). An
            untiled image is ``0 .. P - 1`` then one ``NEWLINE``, with n_tiles 1.

        Computed by running the model's ``pack_image_features`` on patch numbers, once with the
        config's ``vision_aspect_ratio`` and once with one that never downsamples: when the two differ
        in length, the grid was downsampled.

        Raises:
            ValueError: ``vision_feature_select_strategy`` other than ``"full"``, or an image size that
                is not two positive ints.
        """
        size = _size_tuple(image_size)
        key = (size, tiled)
        if key not in self._maps:
            cfg = self.model.config
            self.check_strategy()
            n_tiles = image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size) \
                if tiled else 1
            base = self.tile_side**2
            numbers = torch.arange(n_tiles * base, dtype=torch.float64).view(n_tiles, base, 1)
            # the inner model's method: LlavaOnevisionForConditionalGeneration.pack_image_features passes it
            # a keyword (vision_feature_select_strategy) it does not take
            packed, full = (self.model.model.pack_image_features(
                [numbers], [size], image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64),
                vision_aspect_ratio=aspect)[0][0][:, 0] for aspect in (cfg.vision_aspect_ratio, NEVER_DOWNSAMPLE))
            source = packed.long()
            if packed.numel() != full.numel():  # downsampled: the grid's tokens mix patches
                source[base:] = torch.where(packed[base:] == NEWLINE, NEWLINE, MIXED)
            self._maps[key] = (source, n_tiles)
        return self._maps[key]

    def grids_of(self, source: torch.Tensor) -> tuple[PatchGrid, ...] | None:
        """The grids of a packing map: an untiled image (P patches, then one newline) is one side x side
        grid (the newline in none); otherwise LLaVA-NeXT's base and high-resolution grids."""
        base = self.tile_side**2
        if source.numel() == base + 1 and int(source[-1]) == NEWLINE and torch.equal(source[:base], torch.arange(base)):
            return (PatchGrid(self.tile_side, self.tile_side),)
        return super().grids_of(source)

    # ------------------------------------------------------------------ visual positions
    def visual_index(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """As :meth:`LlavaNextAdapter.visual_index`, with ``batch_num_images`` deciding which images are
        tiled. Raises ValueError as that, and for video inputs."""
        self._refuse_video(input_ids, inputs or {})
        return super().visual_index(input_ids, inputs)

    def image_counts_per_sample(self, input_ids: torch.Tensor, inputs: dict) -> list[list[int]] | None:
        """As :meth:`LlavaNextAdapter.image_counts_per_sample`; raises ValueError for video inputs."""
        self._refuse_video(input_ids, inputs)
        return super().image_counts_per_sample(input_ids, inputs)

    def _refuse_video(self, input_ids: torch.Tensor, inputs: dict) -> None:
        refuse_video(input_ids, inputs, VIDEO_KEYS, getattr(self.model.config, "video_token_id", None),
                     "Pass images (pixel_values + image_sizes) instead")

    # ------------------------------------------------------------------ saliency
    def attach_tile_saliency(self, sink) -> list:
        """A forward pre-hook on the feature layer's attention that calls ``sink`` with the attention each
        patch of every tile receives, FloatTensor [n_tiles, P] (class docstring). Returns its handle.

        Raises:
            ValueError: ``vision_feature_select_strategy`` other than ``"full"`` (SigLIP has no [CLS]),
                or a feature layer that is the tower's embeddings.
        """
        self.check_strategy()
        attn = self.feature_attention()

        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            sink(attention_received(module, hidden))

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]

    def pack_call_saliency(self, per_tile: torch.Tensor | None, arguments: dict) -> list[torch.Tensor]:
        """Per-tile saliency [n_tiles_total, P] of one ``get_image_features`` call (its bound ``arguments``:
        ``image_sizes``, optionally ``batch_num_images`` and ``vision_aspect_ratio``) packed like the
        features by the model's ``pack_image_features``: one FloatTensor [N_v] per image, ``-inf`` at
        newline tokens.

        Raises:
            RuntimeError: no saliency was captured, or it covers a different number of tiles than the
                images need.
        """
        sizes = arguments["image_sizes"]
        packings = self.image_packings({"image_sizes": sizes, "batch_num_images": arguments.get("batch_num_images")})
        tiles = [n for _, n in packings or []]
        if per_tile is None or per_tile.shape[0] != sum(tiles):
            got = 0 if per_tile is None else per_tile.shape[0]
            raise RuntimeError(f"LLaVA-OneVision saliency: captured attention for {got} tiles, the images need "
                               f"{sum(tiles)}")
        newline = torch.tensor([float("-inf")], device=per_tile.device)
        aspect = arguments.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.model.model.pack_image_features(
            [t[..., None] for t in per_tile.float().split(tiles)], sizes, image_newline=newline,
            vision_aspect_ratio=aspect)
        return [p[:, 0] for p in packed]
