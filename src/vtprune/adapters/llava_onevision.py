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

Videos (``pixel_values_videos`` [n_videos, frames, 3, H, W], ``<video>`` tokens, ``config.video_token_id``):
the model runs the tower on every frame as one tile, pools each frame's side x side patches bilinearly to
``ceil(side / 2)`` per side (``apply_pooling``: 27 x 27 -> 14 x 14 = 196 tokens per frame at 384 px), and
writes the frames one after the other followed by one ``image_newline``: ``frames * ceil(side / 2)**2 + 1``
tokens per video. A video is one visual unit for vtprune (every frame's tokens and its newline: a budget is
per video); a prompt may hold several videos, and images beside them when every unit gives the same number
of tokens (a 4-frame video at the tiny test config gives 17 tokens, as an image of a multi-image prompt).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from vtprune.adapters.base import PatchGrid, SampleGroup, register_adapter, select_rows, unit_groups, units_of
from vtprune.adapters.llava import attention_received
from vtprune.adapters.llava_next import NEWLINE, LlavaNextAdapter, _size_tuple

MIXED = -2
"""Marks, in a packing map, a token that the ``anyres_max`` downsampling interpolated from several patches."""

NEVER_DOWNSAMPLE = "anyres_max_1000000000"  # a vision_aspect_ratio under which no grid is downsampled


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP tower run on every tile, MLP projector, NeXT's any-resolution packing with
    ``anyres_max_N`` downsampling, Qwen2 language model. Visual positions, mixed-size batches (as groups)
    and the packing by the model's own ``pack_image_features`` are LLaVA-NeXT's
    (:class:`~vtprune.adapters.llava_next.LlavaNextAdapter`); an image's token count follows its size,
    and, in a sample of several images, is side x side + 1 whatever the size.

    Videos: ``<video>`` tokens are visual tokens; each video is one unit of ``frames * pooled_side**2 + 1``
    tokens (:meth:`video_tokens`, from ``pixel_values_videos``' frames or, inside ``generate``, from the
    features it computes first, ``mm_encoder_outputs["video"]``), in prompt order with the images
    (:meth:`visual_kinds`). The videos of one call share frames and size (the model takes them as one
    tensor); a ``generate`` batch whose samples hold different kinds or numbers of units runs as groups
    (:meth:`batch_groups`).

    Saliency (``attach_saliency``): SigLIP has no [CLS], so for every tile the attention each patch
    receives in the encoder layer whose output OneVision projects (``vision_feature_layer``, the last
    one for every llava-hf checkpoint), averaged over heads and over the tile's queries
    (``1 / (H P) * sum_h sum_i A_h[i, p]``, :func:`vtprune.adapters.llava.attention_received`; each
    tile's values sum to 1), computed from that layer's own q / k projections in a forward pre-hook (the
    tower keeps its kernel); then packed by the model's own ``pack_image_features``, exactly as the
    features are: base tile, unpadded grid, bilinearly downsampled where ``anyres_max_N`` downsamples
    the features (a mixed token's saliency is the same mixture of its patches' saliencies), and ``-inf``
    at every newline token (a learned embedding, not a patch: saliency-ranked selection never spends
    budget on it). A video's saliency is per frame: the same attention received, computed for each frame
    (the tower runs every frame as one tile), pooled by the model's own ``apply_pooling`` exactly as the
    frame's features are (a pooled token's saliency is the bilinear mixture of its patches'), the frames in
    order, ``-inf`` at the video's trailing newline (:meth:`pack_video_saliency`); saliency-ranked methods
    rank across all frames of the video. Source: reconstructed: ParVTS (arXiv 2511.18875) Fig. 4 and
    VisionZip use [CLS] attention of one image; the attention a patch receives from all patches is its
    [CLS]-free counterpart (as for Qwen2-VL), taken frame by frame because the tower sees each frame alone,
    and the packing, downsampling and pooling follow the model.

    Patch grids (``visual_grids``, for ``pool``): a single-image sample's tokens are NeXT's two grids,
    the base tile and the unpadded high-resolution grid with one newline per row; where ``anyres_max``
    downsampled that grid, the second grid is the downsampled one (each token a mixture of patches, but
    still one cell of a row-major grid with a newline per row, so pooling it is exact pooling of the
    tokens the model sees). In a multi-image sample each image is one side x side grid; its trailing
    newline is in no grid, and ``pool`` keeps it unchanged. A video is one ``frames x pooled_side x
    pooled_side`` grid over its pooled frames, its trailing newline in no grid; a call with both images and
    videos has no common grid (None: ``pool`` refuses it).
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
    @property
    def video_token_id(self) -> int | None:
        """``<video>`` (``config.video_token_id``): one per visual token of a video."""
        return getattr(self.model.config, "video_token_id", None)

    def visual_index(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """Original indices of every image's and video's visual tokens, LongTensor [B, I, N_v] (see
        :meth:`Adapter.visual_index`), the units in prompt order (:meth:`visual_kinds` says which is which).
        Images are dealt to samples in the order of ``image_sizes`` (their counts as
        :meth:`LlavaNextAdapter.image_token_counts`, with ``batch_num_images`` deciding which images are
        tiled), videos in that of ``pixel_values_videos`` (:meth:`video_token_counts`); a video is one unit,
        all its frames' tokens and its newline.

        Raises:
            ValueError: a sample without image or video tokens; image / video tokens that disagree with the
                inputs' counts; samples whose units differ in kind, number or token count, or units of one
                prompt with different token counts (vtprune needs them equal; a ``generate`` batch whose
                samples differ is split by :meth:`batch_groups` before it gets here); images with a
                ``vision_feature_select_strategy`` other than ``"full"``.
        """
        return units_of(input_ids, self.unit_token_ids(), self.unit_counts(inputs or {}))[0]

    def unit_counts(self, inputs: dict) -> dict[str, list[int] | None]:
        """Visual tokens of each image (:meth:`LlavaNextAdapter.image_token_counts`) and each video
        (:meth:`video_token_counts`) of a call."""
        return {"image": self.image_token_counts(inputs), "video": self.video_token_counts(inputs)}

    @functools.cached_property
    def pooled_side(self) -> int:
        """Tokens per side of a video frame after the model's pooling: its ``apply_pooling`` run on one frame
        of zeros (side x side patches -> ``ceil(side / 2)`` per side, bilinear)."""
        side = self.tile_side
        pooled = self.model.model.apply_pooling(torch.zeros(1, side * side, 1)).shape[1]
        return math.isqrt(pooled)

    def video_tokens(self, frames: int) -> int:
        """Visual tokens of a video of ``frames`` frames: ``frames * pooled_side**2`` pooled patches, then one
        ``image_newline`` (as ``get_video_features`` writes them and the processor counts them)."""
        return frames * self.pooled_side**2 + 1

    def video_token_counts(self, inputs: dict | None) -> list[int] | None:
        """Visual tokens of every video of a call, in the order of ``pixel_values_videos``.

        From ``mm_encoder_outputs["video"].pooler_output`` (the features ``generate`` computes before the
        prefill, [n_videos, N_v, D]) when present, else from ``pixel_values_videos`` [n_videos, frames, 3, H,
        W] through :meth:`video_tokens`. None when the call carries no video.

        Raises:
            ValueError: ``pixel_values_videos`` that is not 5-D.
        """
        inputs = inputs or {}
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
        features = getattr(encoded, "pooler_output", None)
        if isinstance(features, list | tuple):
            return [int(f.shape[0]) for f in features]
        if features is not None:
            return [int(features.shape[1])] * int(features.shape[0])
        pixels = inputs.get("pixel_values_videos")
        if pixels is None or pixels.shape[0] == 0:
            return None
        if pixels.dim() != 5:
            raise ValueError(f"{type(self.model).__name__} takes pixel_values_videos as [n_videos, frames, 3, height, "
                             f"width]; got shape {tuple(pixels.shape)}; pass the processor's output unchanged")
        return [self.video_tokens(int(pixels.shape[1]))] * int(pixels.shape[0])

    # ------------------------------------------------------------------ batches whose samples differ
    video_inputs = ("pixel_values_videos", "image_sizes_videos")

    def batch_groups(self, input_ids: torch.Tensor, inputs: dict) -> list[SampleGroup] | None:
        """For a ``generate`` call: its samples grouped by the kinds and token counts of their images and
        videos in prompt order (an image's count follows its size and whether it shares its sample; the
        videos of one call share frames and size, as the model takes them as one tensor, but samples may hold
        different numbers of them, or images instead), or None when all samples are alike or the call carries
        no visual inputs. Raises ValueError as :func:`~vtprune.adapters.base.units_per_sample`."""
        counts = self.unit_counts(inputs)
        if all(c is None for c in counts.values()):
            return None
        return unit_groups(input_ids, self.unit_token_ids(), counts)

    def select_samples(self, inputs: dict, group: SampleGroup) -> dict:
        """``inputs`` restricted to ``group``: per-sample tensors by sample, ``pixel_values`` / ``image_sizes``
        by the group's images, ``pixel_values_videos`` / ``image_sizes_videos`` by its videos,
        ``batch_num_images`` (images per sample that has any, as the processor counts them) recounted over the
        group's images; a kind the group holds none of is dropped from the call."""
        by: dict[str, torch.Tensor] = {}
        dropped: list[str] = []
        for keys, units in ((self.image_inputs, group.images), (self.video_inputs, group.videos)):
            given = [k for k in keys if inputs.get(k) is not None]
            if units:
                by.update(dict.fromkeys(given, torch.tensor(list(units))))
            else:
                dropped += given
        out = select_rows(inputs, group.samples, by)
        per_sample = inputs.get("batch_num_images")
        if per_sample is not None:
            if group.images:
                owner = torch.repeat_interleave(torch.as_tensor(per_sample).cpu())  # image -> its sample's ordinal
                counts = torch.unique_consecutive(owner[list(group.images)], return_counts=True)[1]
                out["batch_num_images"] = counts.to(torch.as_tensor(per_sample).device)
            else:
                dropped.append("batch_num_images")
        return {k: v for k, v in out.items() if k not in dropped}

    # ------------------------------------------------------------------ patch grids
    def visual_grids(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[PatchGrid, ...] | None:
        """Images: as :meth:`LlavaNextAdapter.visual_grids` (see the class docstring). Videos: one
        ``pooled_side x pooled_side`` grid over ``frames`` pooled frames (``PatchGrid(frames=...)``), the
        trailing newline in no grid. None for a call with both images and videos (their grids differ)."""
        inputs = inputs or {}
        videos = self.video_token_counts(inputs)
        if not videos:
            return super().visual_grids(visual, inputs)
        if self.image_token_counts(inputs):
            return None
        side = self.pooled_side
        frames, rest = divmod(visual.shape[-1] - 1, side * side)
        return (PatchGrid(side, side, frames=frames),) if frames > 0 and rest == 0 else None

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

    def saliency_encoders(self) -> dict[str, Callable[[torch.Tensor | None, dict], list[torch.Tensor]]]:
        """``get_image_features`` (:meth:`pack_call_saliency`) and ``get_video_features``
        (:meth:`pack_video_saliency`)."""
        return {**super().saliency_encoders(), "get_video_features": self.pack_video_saliency}

    def pack_video_saliency(self, per_frame: torch.Tensor | None, arguments: dict) -> list[torch.Tensor]:
        """Per-frame saliency [n_videos * frames, P] of one ``get_video_features`` call (its bound
        ``arguments``: ``pixel_values_videos``, or ``pixel_values`` in older transformers) pooled like the
        features by the model's own ``apply_pooling`` (bilinear, side -> ``ceil(side / 2)``), the frames one
        after the other, then ``-inf`` for the trailing newline: one FloatTensor [N_v] per video.

        Raises:
            RuntimeError: no saliency was captured, or it covers a different number of frames than the videos.
        """
        pixels = arguments.get("pixel_values_videos")
        if pixels is None:  # older transformers (5.17) name it pixel_values
            pixels = arguments["pixel_values"]
        videos, frames = pixels.shape[:2]
        if per_frame is None or per_frame.shape[0] != videos * frames:
            got = 0 if per_frame is None else per_frame.shape[0]
            raise RuntimeError(f"LLaVA-OneVision saliency: captured attention for {got} frames, the videos have "
                               f"{videos * frames}")
        pooled = self.model.model.apply_pooling(per_frame.float()[..., None])[..., 0].reshape(videos, -1)
        newline = torch.full((videos, 1), float("-inf"), device=pooled.device)
        return list(torch.cat([pooled, newline], dim=1))
