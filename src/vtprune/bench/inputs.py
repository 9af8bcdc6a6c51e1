"""Synthetic benchmark inputs: text tokens around one image or one video, random pixels, identical rows.

Speed depends on the sequence shapes, not on the token values, so a prompt is ``prompt_tokens`` random
text ids (never a special token) with the visual placeholders repeated as many times as the model's
processor would, placed after the first tenth of the text as in LLaVA's ``USER: <image>\\n{question}
ASSISTANT:`` template. What a family's processor writes (a table keyed by ``config.model_type``,
:data:`LAYOUTS`):

- ``"llava"`` (LLaVA-1.5 and the bundled model): the image token ``image_seq_length`` times, pixels
  [B, C, H, W] at the tower's ``image_size``; images only.
- ``"qwen2_vl"`` (Qwen2-VL, Qwen2.5-VL): ``<vision_start>``, the image (or video) pad token once per merged
  token, ``<vision_end>``; one square image or video of ``frame_size`` px frames. ``pixel_values`` /
  ``pixel_values_videos`` [patches, C x temporal_patch_size x patch_size**2] (standard-normal: the
  processor's normalised values have that scale), ``image_grid_thw`` / ``video_grid_thw`` [B, 3] = (t, h, w)
  in patches, t = 1 for an image and frames / temporal_patch_size for a video, ``mm_token_type_ids``
  (1 image, 2 video) and, for a video, ``second_per_grid_ts`` = 1.0 s per temporal patch (2 frames sampled at
  2 fps, qwen-vl-utils' default rate).
"""

from __future__ import annotations

import torch

from vtprune.bench.archs import image_tokens

LAYOUTS = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl"}
"""``config.model_type`` -> the prompt layout :func:`synthetic_inputs` writes for it."""

DEFAULT_FRAME_SIZE = 448
"""Side in px of the square image / video frames fed to a Qwen2-VL-family model without ``frame_size``
(16 x 16 merged tokens with 14 px patches)."""

SECONDS_PER_TEMPORAL_PATCH = 1.0  # 2 frames at 2 fps (qwen-vl-utils' FPS = 2.0): Qwen2.5-VL's second_per_grid_ts


def layout_of(config) -> str:
    """The prompt layout of a model config (:data:`LAYOUTS`). Raises ValueError naming the accepted model types."""
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(str(model_type))
    if layout is None:
        raise ValueError(f"vtprune bench builds inputs for model types {', '.join(LAYOUTS)}; got {model_type!r}")
    return layout


def frame_size_of(config, frame_size: int | None = None) -> int | None:
    """Side in px of the square image / video frames :func:`synthetic_inputs` feeds a model of ``config``:
    ``frame_size``, or :data:`DEFAULT_FRAME_SIZE` when None, for the Qwen2-VL family; None for LLaVA (its
    tower's fixed ``image_size``)."""
    if layout_of(config) == "llava":
        return None
    return DEFAULT_FRAME_SIZE if frame_size is None else frame_size


def _check_count(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def visual_tokens(config, video_frames: int | None = None, frame_size: int | None = None) -> int:
    """Visual tokens of the one image (``video_frames`` None) or the one video of ``video_frames`` frames that
    :func:`synthetic_inputs` feeds a model of ``config``: LLaVA, :func:`~vtprune.bench.archs.image_tokens`;
    Qwen2-VL family, ``t (frame_size / (patch merge))**2`` with t = 1 for an image and
    ``video_frames / temporal_patch_size`` for a video (``frame_size`` px, default :data:`DEFAULT_FRAME_SIZE`).

    Raises:
        ValueError: an unknown model type; a video or a frame size for a model that takes fixed-size images
            only; frames not a positive
            multiple of the temporal patch (Qwen's processors encode frames in pairs); a frame size that is not
            a positive multiple of patch x merge px (each message names what is accepted).
    """
    layout = layout_of(config)
    if layout == "llava":
        if video_frames is not None:
            raise ValueError(f"video inputs need a model that takes videos (model types qwen2_vl, qwen2_5_vl: "
                             f"--arch qwen2.5-vl-7b, qwen2.5-vl-cpu-small, qwen2.5-vl-tiny); "
                             f"{config.model_type!r} takes images only")
        if frame_size is not None:
            raise ValueError(f"frame_size applies to models whose visual tokens follow the picture's size (model types "
                             f"qwen2_vl, qwen2_5_vl); {config.model_type!r} takes {config.vision_config.image_size} px "
                             "images only")
        return image_tokens(config)
    vc = config.vision_config
    side = vc.patch_size * vc.spatial_merge_size
    frame_size = frame_size_of(config, frame_size)
    _check_count("frame_size", frame_size, side)
    if frame_size % side:
        raise ValueError(f"frame_size {frame_size} px must be a multiple of {side} px (patch {vc.patch_size} px "
                         f"x merge {vc.spatial_merge_size})")
    per_frame = (frame_size // side) ** 2
    if video_frames is None:
        return per_frame
    _check_count("video_frames", video_frames, 1)
    if video_frames % vc.temporal_patch_size:
        raise ValueError(f"video_frames {video_frames}: this model encodes frames in temporal patches of "
                         f"{vc.temporal_patch_size}; give a multiple of {vc.temporal_patch_size}")
    return video_frames // vc.temporal_patch_size * per_frame


def _text_ids(cfg, text_cfg, vocab: int, prompt_tokens: int, g: torch.Generator) -> torch.Tensor:
    """``prompt_tokens`` random ids in [3, vocab) avoiding every visual, padding and end token of ``cfg``, BOS first
    when the config has one that is not a visual token."""
    visual = {getattr(cfg, key, None) for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id", "vision_token_id")}
    specials = set(visual)
    for value in (text_cfg.pad_token_id, text_cfg.eos_token_id):
        specials.update(value if isinstance(value, list | tuple) else [value])
    specials.discard(None)
    text = torch.randint(3, vocab, (prompt_tokens,), generator=g)
    safe = next(i for i in range(3, vocab) if i not in specials)
    for special in specials:
        text[text == special] = safe
    bos = text_cfg.bos_token_id
    if bos is not None and bos not in visual:
        text[0] = bos
    return text


def synthetic_inputs(model, batch: int = 1, prompt_tokens: int = 60, seed: int = 0,
                     device: str | torch.device | None = None, video_frames: int | None = None,
                     frame_size: int | None = None) -> dict[str, torch.Tensor]:
    """Inputs of one model call with one image (or one video) per sample, laid out as the model's processor
    lays them out (see the module docstring).

    Args:
        model: a ``LlavaForConditionalGeneration`` or a Qwen2-VL / Qwen2.5-VL model (its config gives the
            visual token ids, the visual tokens per image and the pixel shapes; its input embedding the
            vocabulary size).
        batch: B, identical rows (no padding).
        prompt_tokens: N >= 2 text tokens; ``max(1, N // 10)`` before the image or video (the first is BOS when
            the config has one), the rest after it.
        seed: seed of the token ids and pixels.
        device: where to put the tensors (default: the model's device).
        video_frames: F, feed one video of F frames instead of the image (Qwen2-VL family only).
        frame_size: side in px of the square image / frames (Qwen2-VL family; default :data:`DEFAULT_FRAME_SIZE`).

    Returns:
        ``input_ids`` LongTensor [B, N + N_v] and ``attention_mask`` LongTensor [B, N + N_v] (ones), N_v =
        :func:`visual_tokens` (+ 2 for Qwen's vision start / end tokens); LLaVA: ``pixel_values`` [B, C, H, W]
        standard-normal in the model's dtype (H = W = the tower's ``image_size``); Qwen2-VL family: see the
        module docstring.

    Raises:
        ValueError: batch < 1 or prompt_tokens < 2, or what :func:`visual_tokens` raises.
    """
    _check_count("batch", batch, 1)
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 2:
        raise ValueError(f"prompt_tokens must be an int >= 2 (text before and after the image), got {prompt_tokens!r}")
    cfg = model.config
    n_visual = visual_tokens(cfg, video_frames, frame_size)
    text_cfg = cfg.get_text_config()
    vocab = min(text_cfg.vocab_size, model.get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(seed)
    text = _text_ids(cfg, text_cfg, vocab, prompt_tokens, g)
    before = max(1, prompt_tokens // 10)
    device = device if device is not None else model.device
    out: dict[str, torch.Tensor] = {}
    kind = 0  # mm_token_type_ids of the visual pads: 1 image, 2 video (Qwen)
    if layout_of(cfg) == "llava":
        visual = torch.full((n_visual,), cfg.image_token_id, dtype=torch.long)
        vc = cfg.vision_config
        size = vc.image_size
        pixels = torch.randn(1, getattr(vc, "num_channels", 3), size, size, generator=g).expand(batch, -1, -1, -1)
        out["pixel_values"] = pixels.to(device=device, dtype=model.dtype).contiguous()
    else:
        video = video_frames is not None
        pad, kind = (cfg.video_token_id, 2) if video else (cfg.image_token_id, 1)
        visual = torch.tensor([cfg.vision_start_token_id] + [pad] * n_visual + [cfg.vision_end_token_id])
        vc = cfg.vision_config
        side = frame_size_of(cfg, frame_size) // vc.patch_size
        t = video_frames // vc.temporal_patch_size if video else 1
        width = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size ** 2
        pixels = torch.randn(t * side * side, width, generator=g).repeat(batch, 1)
        grid = torch.tensor([[t, side, side]]).repeat(batch, 1)
        key = "video" if video else "image"
        out[f"pixel_values{'_videos' if video else ''}"] = pixels.to(device=device, dtype=model.dtype)
        out[f"{key}_grid_thw"] = grid.to(device)
        if video:
            out["second_per_grid_ts"] = torch.full((batch,), SECONDS_PER_TEMPORAL_PATCH).to(device)
    row = torch.cat([text[:before], visual, text[before:]])
    ids = row.expand(batch, -1).clone()
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), **out}
    if kind:
        out["mm_token_type_ids"] = (kind * (ids == pad)).int().to(device)
    return out


def vision_call(model, inputs: dict):
    """A no-argument callable running the model's vision tower and projector (merger) on ``inputs``' pixels,
    as the model's forward runs them: for counting their FLOPs."""
    inner = model.model
    if layout_of(model.config) == "llava":
        cfg = model.config
        return lambda: inner.get_image_features(
            pixel_values=inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    if "pixel_values_videos" in inputs:
        return lambda: inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return lambda: inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])


def vision_modules(model) -> tuple:
    """The modules whose weights the vision side reads once per prefill: LLaVA's tower and projector, Qwen's
    ``visual`` (its merger included)."""
    inner = model.model
    if layout_of(model.config) == "llava":
        return inner.vision_tower, inner.multi_modal_projector
    return (inner.visual,)
