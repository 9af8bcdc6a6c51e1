"""LLaVA and Qwen2.5-VL architectures with random weights, built from their configs (no download): speed does
not depend on the weight values, only on the shapes.

``llava-1.5-7b`` and ``llava-1.5-13b`` are the shapes of the ``llava-hf/llava-1.5-*-hf`` checkpoints
(CLIP ViT-L/14-336 tower, 576 visual tokens per image, Llama-2 / Vicuna language model, vocabulary
32064, image token 32000). ``llava-cpu-small`` keeps the shape family (576 visual tokens from a 336 px
CLIP tower, a Llama decoder with head dim 64 and a SwiGLU MLP of ~2.75 d, the real vocabulary) scaled
down so that one generation takes seconds on a 2-core CPU while the decoder's matrix work still
dominates. ``tiny`` (16 visual tokens, 6 layers) is for tests.

``qwen2.5-vl-7b`` is the shape of ``Qwen/Qwen2.5-VL-7B-Instruct`` (a 32-block ViT of width 1280 with 14 px
patches, 2-frame temporal patches, windowed attention but in blocks 7, 15, 23, 31, and a 2 x 2 patch merger;
a 28-layer Qwen2 decoder of d 3584 with GQA 28 / 4 heads and M-RoPE; vocabulary 152064): the bench feeds it
one image or one video (``--video-frames``) of 448 x 448 px frames, 256 visual tokens per image and 128 per
video frame. ``qwen2.5-vl-cpu-small`` keeps that shape family (the same patch, temporal patch, merge and
window sizes, M-RoPE, GQA, the real vocabulary with tied embeddings as the 3B checkpoint ties them) scaled
down for a 2-core CPU, with 224 x 224 px frames (64 visual tokens per image, 32 per video frame);
``qwen2.5-vl-tiny`` (32 px frames: 16 tokens per image, 8 per video frame) is for tests.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

# what `vtprune bench --attn` accepts (the engine also runs flash_attention_3: vtprune.engine.run.SUPPORTED_ATTENTION)
ATTENTION = ("sdpa", "eager", "flash_attention_2")
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # what the flash_attn kernels compute in


@dataclass(frozen=True)
class Arch:
    """One architecture: the keyword arguments of its family's vision, text and top-level configs
    (:data:`FAMILIES`: ``CLIPVisionConfig``, ``LlamaConfig``, ``LlavaConfig`` for ``"llava"``; the vision
    and text dicts and ``Qwen2_5_VLConfig`` for ``"qwen2_5_vl"``) and, for a family whose visual tokens follow
    the picture's size, the side in px of the square image or video frames the bench feeds it (``frame_size``)."""

    name: str
    description: str
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    family: str = "llava"
    frame_size: int | None = None


# family -> (config class, model class) in transformers; the vision / text configs of "llava" are classes of
# their own, Qwen2.5-VL's config takes them as dicts
FAMILIES = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
            "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_LLAVA_15 = dict(image_token_id=32000, image_seq_length=576, vision_feature_layer=-2,
                 vision_feature_select_strategy="default", projector_hidden_act="gelu")
_VOCAB = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
              pad_token_id=32001, bos_token_id=1, eos_token_id=2)
# Qwen2.5-VL (the config.json of Qwen/Qwen2.5-VL-7B-Instruct): ViT patches, windows of 112 px, merger
_QWEN25_VIT = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
                   hidden_act="silu", tokens_per_second=2)
_MROPE = dict(rope_type="default", rope_theta=1000000.0)
_QWEN_VOCAB = dict(vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
                   pad_token_id=151643, bos_token_id=151643, eos_token_id=151645)
_QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)

ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llava-1.5-7b", "LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens) + Llama-2-7B / Vicuna-7B",
         vision=_CLIP_L_336,
         text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, **_VOCAB),
         top=_LLAVA_15),
    Arch("llava-1.5-13b", "LLaVA-1.5-13B: CLIP ViT-L/14-336 (576 tokens) + Llama-2-13B / Vicuna-13B",
         vision=_CLIP_L_336,
         text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, **_VOCAB),
         top=_LLAVA_15),
    Arch("llava-cpu-small", "LLaVA-1.5 shape family scaled for a 2-core CPU: small CLIP tower (336 px, patch 14, "
                            "576 tokens) + 8-layer Llama (d 1024, 16 heads, MLP 2816, vocab 32064)",
         vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                     image_size=336, patch_size=14, projection_dim=256, hidden_act="quick_gelu", layer_norm_eps=1e-5),
         text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=16, **_VOCAB),
         top=_LLAVA_15),
    Arch("tiny", "test-sized LLaVA: CLIP tower 32 px / patch 8 (16 tokens) + 6-layer Llama (d 64, GQA 4/2, vocab 256)",
         vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     image_size=32, patch_size=8, projection_dim=32),
         text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
         top=dict(image_token_id=250, image_seq_length=16, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")),
    Arch("qwen2.5-vl-7b", "Qwen2.5-VL-7B: 32-block ViT (d 1280, 14 px patches, 2-frame temporal patches, 2 x 2 merge) + "
                          "28-layer Qwen2 (d 3584, GQA 28/4, MLP 18944, M-RoPE, vocab 152064); 448 px frames",
         vision=dict(_QWEN25_VIT, depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31]),
         text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, rope_parameters=dict(_MROPE, mrope_section=[16, 24, 24]), **_QWEN_VOCAB),
         top=_QWEN_TOKENS, family="qwen2_5_vl", frame_size=448),
    Arch("qwen2.5-vl-cpu-small", "Qwen2.5-VL shape family scaled for a 2-core CPU: 4-block ViT (d 256, 14 px patches, "
                                 "2-frame temporal patches, 2 x 2 merge) + 8-layer Qwen2 (d 1024, GQA 16/4, MLP 2816, "
                                 "vocab 152064 tied); 224 px frames",
         vision=dict(_QWEN25_VIT, depth=4, hidden_size=256, intermediate_size=688, num_heads=4, out_hidden_size=1024,
                     fullatt_block_indexes=[1, 3]),
         text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, rope_parameters=dict(_MROPE, mrope_section=[8, 12, 12]), **_QWEN_VOCAB),
         top=dict(_QWEN_TOKENS, tie_word_embeddings=True), family="qwen2_5_vl", frame_size=224),
    Arch("qwen2.5-vl-tiny", "test-sized Qwen2.5-VL: 3-block ViT (d 32, 4 px patches) + 6-layer Qwen2 (d 64, GQA 4/2, "
                            "vocab 256); 32 px frames (16 tokens per image, 8 per video frame)",
         vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
         text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, rope_parameters=dict(_MROPE, mrope_section=[2, 3, 3])),
         top=dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253),
         family="qwen2_5_vl", frame_size=32),
)}


def get_arch(name: str) -> Arch:
    """The :class:`Arch` called ``name``. Raises ValueError naming the accepted names."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; accepted: {', '.join(sorted(ARCHS))}") from None


def arch_config(name: str):
    """The transformers config of architecture ``name`` (``LlavaConfig`` or ``Qwen2_5_VLConfig``, by its
    family; only the config: nothing is allocated).

    Raises:
        ValueError: unknown name (the message names the accepted ones).
    """
    import transformers

    arch = get_arch(name)
    config_class = getattr(transformers, FAMILIES[arch.family][0])
    if arch.family == "llava":
        return config_class(vision_config=transformers.CLIPVisionConfig(**arch.vision),
                            text_config=transformers.LlamaConfig(**arch.text), **arch.top)
    return config_class(vision_config=arch.vision, text_config=arch.text, **arch.top)


def image_tokens(config) -> int:
    """Visual tokens per image of a LLaVA config: ``image_seq_length`` when set, else
    ``(image_size // patch_size) ** 2`` (+1 for the ``"full"`` feature strategy, which keeps [CLS])."""
    n = getattr(config, "image_seq_length", None)
    if n:
        return int(n)
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else n


def check_attention(attn: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
    """Check, before anything is built or loaded, that attention implementation ``attn`` can run here.

    ``flash_attention_2`` needs the ``flash_attn`` package, a CUDA device (``device`` a CUDA one and CUDA
    available) and a float16 / bfloat16 ``dtype`` (None: not checked). The engine gives FlashAttention only
    "causal + left padding" masks and runs ParVTS's packed two-path layers with SDPA (vtprune.engine.scoring).

    Raises:
        ValueError: unknown implementation, or what ``flash_attention_2`` misses here; the message names
            the accepted implementations.
    """
    accepted = ", ".join(ATTENTION)
    if attn not in ATTENTION:
        raise ValueError(f"unsupported attention implementation {attn!r}; accepted: {accepted}")
    if attn != "flash_attention_2":
        return
    missing = []
    if importlib.util.find_spec("flash_attn") is None:
        missing.append("the flash_attn package is not installed (pip install flash-attn)")
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        missing.append(f"it runs on a CUDA device only (device {str(device)!r}"
                       f"{'' if torch.cuda.is_available() else ', no CUDA device available'})")
    if dtype is not None and dtype not in FLASH_DTYPES:
        missing.append(f"it computes in float16 / bfloat16 only (dtype {str(dtype).removeprefix('torch.')})")
    if missing:
        raise ValueError(f"attention implementation 'flash_attention_2' cannot run here: {'; '.join(missing)}. "
                         f"Accepted: {accepted} (sdpa and eager run everywhere)")


def build_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attn: str = "sdpa", seed: int = 0):
    """A stock ``LlavaForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration`` (by the family of
    architecture ``name``) with random weights, in eval mode.

    Parameters are allocated directly on ``device`` in ``dtype`` and initialised by transformers'
    own ``_init_weights`` (normal, std = ``initializer_range`` = 0.02; norms at 1), which keeps the
    activations finite in float16 / bfloat16. The generation config has ``eos_token_id = None`` so
    that generation runs exactly ``max_new_tokens`` steps.

    Args:
        name: one of :data:`ARCHS`.
        dtype: parameter dtype.
        device: where to allocate (the LLaVA 7B architecture needs ~14 GB in bf16, 28 GB in fp32; Qwen2.5-VL-7B
            ~16.6 GB in bf16).
        attn: attention implementation, one of :data:`ATTENTION` (see :func:`check_attention`).
        seed: seed of the random weights.

    Raises:
        ValueError: unknown name, or an attention implementation that is unknown or cannot run on
            ``device`` / ``dtype`` here (the message names the accepted ones).
    """
    import transformers

    cfg = arch_config(name)
    check_attention(attn, device, dtype)
    model_class = getattr(transformers, FAMILIES[get_arch(name).family][1])
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(cfg, attn_implementation=attn, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.generation_config.bos_token_id = cfg.text_config.bos_token_id
    model.generation_config.eos_token_id = None
    return model
