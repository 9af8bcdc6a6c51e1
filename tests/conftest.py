"""Tiny random-weight LLaVA models built from the real config classes (CLIP tower + Llama LM)."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 250
N_VISUAL = 16  # (32 px / 8 px)^2 patches, CLS dropped ("default" strategy)
STANDARD_PROMPTS = [(2, 4, 1), (5, 9, 2), (3, 2, 3)]  # (prefix, question, seed): three lengths, so a batch pads


def tiny_clip_config() -> CLIPVisionConfig:
    """A 3-layer CLIP tower on 32 px images with 8 px patches (16 patches + [CLS])."""
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)


TINY_LM = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
"""The sizes of every tiny language model: GQA (4 query heads, 2 KV heads), vocabulary 256 (pad 0, bos 1, eos 2)."""


def tiny_llama_config(layers: int = 6) -> LlamaConfig:
    """A Llama LM of :data:`TINY_LM` sizes."""
    return LlamaConfig(num_hidden_layers=layers, **TINY_LM)


def tiny_qwen2_config(layers: int = 6):
    """A Qwen2 LM (the language model of InternVL3 and LLaVA-OneVision) of :data:`TINY_LM` sizes."""
    from transformers import Qwen2Config

    return Qwen2Config(num_hidden_layers=layers, **TINY_LM)


def ready(model, attn: str = "sdpa"):
    """Eval mode, attention ``attn``, no EOS (every generation runs its full length), and an LM head
    scaled by 8: random init gives near-uniform logits, the scale makes greedy decoding decisive."""
    model.eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.config.text_config._attn_implementation = attn
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def tiny_llava(layers: int = 6, attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=tiny_clip_config(), text_config=tiny_llama_config(layers),
                      image_token_id=IMAGE_TOKEN, image_seq_length=N_VISUAL, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    return ready(LlavaForConditionalGeneration(cfg), attn)


def make_prompt(prefix_len: int, question_len: int, seed: int, images: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, 240, (prefix_len,), generator=g).tolist()
    for _ in range(images):
        ids += [IMAGE_TOKEN] * N_VISUAL + torch.randint(3, 240, (2,), generator=g).tolist()
    return ids + torch.randint(3, 240, (question_len,), generator=g).tolist()


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask [B, S] (pad id 0)."""
    s = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), s, dtype=torch.long)
    mask = torch.zeros(len(prompts), s, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p)
        mask[i, s - len(p):] = 1
    return ids, mask


def batch(prompts: list[list[int]], seed: int = 0, images: int = 1):
    """Left-padded batch: input_ids, attention_mask [B, S]; pixel_values [B * images, 3, 32, 32]."""
    ids, mask = left_pad(prompts)
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(len(prompts) * images, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def import_script(name: str):
    """The module ``scripts/<name>.py`` (the scripts are not a package): imported with ``scripts/`` on
    ``sys.path`` for the import only."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(scripts)


def cache_keyword(model) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier; 5.24 still accepts it, deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a model output returns (``out.cache`` from transformers 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread (no OpenMP spin-waits on a shared 2-core machine); restores
    the previous count afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model():
    return tiny_llava()


# ---------------------------------------------------------------- checkpoints saved with a real processor
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")
"""A chat template for :func:`word_tokenizer`: the turns' text, ``<image>`` for each image part."""


def word_tokenizer(special: dict[str, int] | None = None, chat_template: str | None = None, **kwargs):
    """An offline word-level ``PreTrainedTokenizerFast`` (whitespace split): ``<pad>`` 0, ``<s>`` 1,
    ``</s>`` 2, ``<unk>`` 3, ``w4`` ... ``w239``, then ``special`` (token -> id; default ``<image>`` ->
    IMAGE_TOKEN), left padding. ``kwargs`` go to the tokenizer (e.g. ``extra_special_tokens``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"<image>": IMAGE_TOKEN} if special is None else special
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 240)}, **special}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs.setdefault("extra_special_tokens", {"image_token": "<image>"} if "<image>" in special else {})
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left", chat_template=chat_template, **kwargs)


def tiny_checkpoint(path: Path, seed: int = 3) -> Path:
    """Save ``conftest.tiny_llava`` with a real ``LlavaProcessor`` (word-level tokenizer, 32 px CLIP
    image processor: 16 image tokens) so that a stock loader (lmms-eval's, ``vtprune --model PATH``) reads it like
    a llava-hf repo; ``seed`` draws the random weights."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    template = WORD_CHAT_TEMPLATE
    tokenizer = word_tokenizer(chat_template=template)
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                   crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, chat_template=template,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    tiny_llava(layers=6, seed=seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def processor_without_video(cls, **parts):
    """``cls(video_processor=None, **parts)``: a real multimodal processor built without its video processor.
    transformers 5 checks the class of each part, and resolving a video processor class needs torchvision,
    which this CPU-only venv lacks (PyPI's torchvision wheels are CUDA builds); images never use it."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
                   lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
        return cls(video_processor=None, **parts)
