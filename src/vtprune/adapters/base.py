"""Model adapters: where a model family keeps its parts, and which positions are visual.

An adapter holds no method logic. It answers: the decoder layers and the module that runs them, the
text config, the visual token positions of each sample and image (from the token ids, never from
hard-coded offsets), and a per-patch saliency for methods that want one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import torch
from torch import nn


class SampleGroup(NamedTuple):
    """Samples of a ``generate`` call that run as one batch (:meth:`Adapter.batch_groups`): their
    indices in the call, and the indices (sample-major, among all images of the call) of their images."""

    samples: list[int]
    images: list[int]


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """A ``rows x cols`` patch grid inside one image's visual tokens.

    Patch (r, c) is visual token ``start + r * stride + c`` of the image (an index among its N_v visual
    tokens, not a sequence position). ``stride`` defaults to ``cols``; with ``stride > cols`` the last
    ``stride - cols`` tokens of every row are separators, not patches (LLaVA-NeXT's ``image_newline``).

    Raises:
        ValueError: a non-positive size, a negative start, or ``stride < cols``.
    """

    rows: int
    cols: int
    start: int = 0
    stride: int = 0  # 0: cols

    def __post_init__(self):
        if self.stride == 0:
            object.__setattr__(self, "stride", self.cols)
        if self.rows < 1 or self.cols < 1 or self.start < 0 or self.stride < self.cols:
            raise ValueError(f"invalid patch grid {self}: rows, cols >= 1, start >= 0, stride >= cols")

    @property
    def separators(self) -> int:
        """Separator tokens closing each row (``stride - cols``)."""
        return self.stride - self.cols

    @property
    def tokens(self) -> int:
        """Visual tokens the grid spans, separators included (``rows * stride``)."""
        return self.rows * self.stride

    def token(self, row: torch.Tensor | int, col: torch.Tensor | int):
        """Index among the image's visual tokens of patch (row, col); ``col = cols`` is the row's first separator."""
        return self.start + row * self.stride + col


class Adapter:
    """Base adapter. Subclasses set ``model_classes`` and implement the properties below."""

    model_classes: tuple[str, ...] = ()
    family: str = "base"

    def __init__(self, model: nn.Module):
        # Any: the family-specific submodules and config fields an adapter reads (model.model.language_model,
        # config.vision_config, ...) are not on nn.Module's type, whose __getattr__ says Tensor | Module
        self.model: Any = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack module (called with inputs_embeds, attention_mask, position_ids). Default:
        ``model.model.language_model``, the layout of every transformers v5 image-text-to-text class."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> list[nn.Module]:
        return list(cast(Iterable[nn.Module], self.language_model.layers))  # a ModuleList, typed Tensor | Module by torch

    @property
    def text_config(self):
        """The language model's config (default ``model.config.text_config``)."""
        return self.model.config.text_config

    @property
    def image_token_id(self) -> int:
        """The placeholder token id of visual tokens (default ``model.config.image_token_id``)."""
        return self.model.config.image_token_id

    def tokens_per_image(self) -> int | None:
        """Visual tokens per image when fixed by the config (used to split adjacent images), else None."""
        return None

    def visual_grid(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[int, int] | None:
        """(rows, cols) of each image's visual tokens as a patch grid in row-major order, or None when
        they do not form one grid (the ``pool`` method needs it). ``visual`` is :meth:`visual_index`'s
        result for the same call (LongTensor [B, I, N_v]). Default None."""
        return None

    def visual_grids(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[PatchGrid, ...] | None:
        """The patch grids that make up each image's visual tokens (the same for every image of the call),
        or None when the adapter cannot tell or the images of the call differ. Default: the single grid
        of :meth:`visual_grid`. Families whose tokens hold several grids (LLaVA-NeXT: base tile and
        high-resolution grid; InternVL: one per tile) override this. Tokens that lie in no grid are not
        patches (LLaVA-OneVision's newline closing a single-tile image). Arguments as :meth:`visual_grid`."""
        grid = self.visual_grid(visual, inputs)
        return None if grid is None else (PatchGrid(*grid),)

    def visual_index(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """Original indices of every image's visual tokens.

        Args:
            input_ids: LongTensor [B, S] of the prefill call.
            inputs: the prefill call's other keyword arguments (``pixel_values``, ``image_sizes``,
                ``image_grid_thw``, ...), for families whose image spans depend on them. Inside
                ``generate`` the engine adds ``inputs["generate_kwargs"]``: the keyword arguments of
                that ``generate`` call as the user passed them (not expanded for beams or
                ``num_return_sequences``), since ``generate`` consumes some (LLaVA-NeXT's
                ``image_sizes``) before the prefill call.

        Returns:
            LongTensor [B, I, N_v] (ascending), on the device of ``input_ids``.

        Raises:
            ValueError: no image token in some sample, or samples of one batch with different numbers
                of images or of visual tokens per image (vtprune needs them equal within a batch).
        """
        return visual_spans(input_ids, self.image_token_id, self.tokens_per_image())

    def image_counts_per_sample(self, input_ids: torch.Tensor, inputs: dict) -> list[list[int]] | None:
        """Visual tokens of each sample's images in a ``generate`` call (``inputs``: its keyword
        arguments), for families whose count follows the image size; None when the call does not say.
        Default None: the config fixes the count."""
        return None

    def batch_groups(self, input_ids: torch.Tensor, inputs: dict) -> list[SampleGroup] | None:
        """For a ``generate`` call: the samples grouped so that each group holds the same number of
        images and visual tokens per image (the engine then runs one ``generate`` per group and merges
        the outputs), or None when the batch needs no split. From :meth:`image_counts_per_sample`, read
        once per call."""
        per_sample = self.image_counts_per_sample(input_ids, inputs)
        if per_sample is None:
            return None
        groups: dict[tuple[int, ...], list[int]] = {}
        for b, counts in enumerate(per_sample):
            groups.setdefault(tuple(counts), []).append(b)
        if len(groups) == 1:
            return None
        owner = [b for b, images in enumerate(per_sample) for _ in images]  # image (sample-major) -> sample
        return [SampleGroup(samples, [i for i, b in enumerate(owner) if b in samples]) for samples in groups.values()]

    def select_samples(self, inputs: dict, group: SampleGroup) -> dict:
        """``inputs`` (a ``generate`` call's keyword arguments) restricted to ``group`` (see
        :meth:`batch_groups`). Default: every tensor whose first dimension is the batch, by sample."""
        return select_rows(inputs, group.samples, {})

    def attention_blocks(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor | None:
        """Block ids of the prompt's tokens that attend to each other in both directions in the language
        model (Gemma 3's image tokens), LongTensor [B, S] (-1 for causal tokens), or None when every token
        is causal (the default). The engine's masks keep these blocks after pruning."""
        return None

    def sliding_window(self, layer: int) -> int | None:
        """The sliding window (tokens) of decoder layer ``layer``'s attention, or None for full attention
        (the default). The engine applies it by original position in the masks of pruned layers and follows
        what the layer's sliding-window cache drops (:mod:`vtprune.engine.window`)."""
        return None

    def take_language_model_inputs(self, kwargs: dict) -> Any:
        """Called with the keyword arguments of the language model's prefill call: take out (in place) the
        inputs that must follow the sequence the engine builds for each layer (Qwen3-VL's DeepStack
        features, added to the visual tokens' hidden states between layers) and return them, or return
        None (the default: nothing to take). They come back to :meth:`layer_input`."""
        return None

    def layer_input(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, group: torch.Tensor | None,
                    taken: Any) -> torch.Tensor:
        """The input of prefill decoder layer ``layer`` with what :meth:`take_language_model_inputs` took
        re-applied to the sequence the previous layer ran on (``hidden`` [B, n, d]; ``index`` LongTensor
        [B, n] of each slot's original token index and ``group`` its path group or None, as
        :class:`vtprune.engine.layout.Layout`). Default: ``hidden`` unchanged."""
        return hidden

    def attach_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        """Register hooks that call ``sink(saliency)`` during the vision forward, with saliency a
        FloatTensor [n_images, N_v] (images in the order of ``pixel_values``). Returns the handles."""
        raise ValueError(f"{type(self).__name__} provides no visual saliency; choose a method option that needs none")


def select_rows(inputs: dict, samples: list[int], by: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments of a ``generate`` call for ``samples`` only: the keys in ``by`` indexed by their
    own row indices, every other tensor whose first dimension is the batch (that of ``input_ids``) by
    ``samples``, anything else unchanged."""
    batch = inputs["input_ids"].shape[0]
    index = torch.tensor(samples)
    out = {}
    for key, value in inputs.items():
        if key in by and torch.is_tensor(value):
            out[key] = value[by[key].to(value.device)]
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
            out[key] = value[index.to(value.device)]
        else:
            out[key] = value
    return out


def refuse_video(input_ids: torch.Tensor, inputs: dict, keys: tuple[str, ...], video_token_id: int | None,
                 instead: str) -> None:
    """Raise ValueError when a call carries video: any of ``keys`` in ``inputs``, precomputed video features
    (``mm_encoder_outputs["video"]``), or ``video_token_id`` in ``input_ids``; ``instead`` ends the message
    (what to pass instead). vtprune schedules image tokens only."""
    given = [k for k in keys if inputs.get(k) is not None]
    if (inputs.get("mm_encoder_outputs") or {}).get("video") is not None:
        given.append("mm_encoder_outputs['video']")
    if video_token_id is not None and bool((input_ids == video_token_id).any()):
        given.append(f"video tokens (video_token_id={video_token_id}) in input_ids")
    if given:
        raise ValueError("vtprune schedules image tokens only; video inputs are not supported "
                         f"(got {', '.join(given)}). {instead}")


def images_per_sample(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> list[list[int]]:
    """The token counts of each sample's images: ``counts`` (every image of the batch, sample-major)
    dealt over the samples' runs of image tokens.

    Raises:
        ValueError: a sample without image tokens; image tokens that do not add up to ``counts``, or an
            image that would straddle two runs ("disagree").
    """
    runs_per_sample = token_runs(input_ids, image_token_id)
    total = sum(r.numel() for runs in runs_per_sample for r in runs)
    if total != sum(counts):
        raise ValueError(f"image tokens disagree with the images: input_ids hold {total} tokens "
                         f"{image_token_id}, the {len(counts)} images need {counts} = {sum(counts)}; "
                         "build the prompt with the model's processor from the same images")
    queue, per_sample = list(counts), []
    for b, runs in enumerate(runs_per_sample):
        mine = []
        for run in runs:
            left = run.numel()
            while left > 0:
                if not queue or queue[0] > left:
                    raise ValueError(f"image tokens disagree with the images: sample {b} has a run of "
                                     f"{run.numel()} image tokens that the images' counts {counts} do not tile")
                left -= queue[0]
                mine.append(queue.pop(0))
        per_sample.append(mine)
    return per_sample


def token_runs(input_ids: torch.Tensor, token_id: int) -> list[list[torch.Tensor]]:
    """The contiguous runs of ``token_id`` in each sample: per sample, LongTensors of positions (CPU).

    Raises:
        ValueError: a sample without the token (vtprune needs an image in every prompt).
    """
    out = []
    for b, row in enumerate((input_ids == token_id).cpu()):
        pos = row.nonzero().flatten()
        if pos.numel() == 0:
            raise ValueError(
                f"sample {b} has no image tokens (image_token_id={token_id}); vtprune schedules visual "
                "tokens, so every prompt must contain the image placeholder (use the model's processor)"
            )
        out.append(list(torch.tensor_split(pos, ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist())))
    return out


def visual_spans(input_ids: torch.Tensor, image_token_id: int, per_image: int | None = None) -> torch.Tensor:
    """Split the positions of ``image_token_id`` into images: contiguous runs, each cut into chunks of
    ``per_image`` when a run holds several adjacent images. See :meth:`Adapter.visual_index`."""
    spans = []
    for runs in token_runs(input_ids, image_token_id):
        if per_image:
            runs = [c for r in runs for c in (r.split(per_image) if r.numel() % per_image == 0 else [r])]
        spans.append(runs)
    counts = [[r.numel() for r in runs] for runs in spans]
    if any(c != counts[0] for c in counts) or len(set(counts[0])) != 1:
        raise ValueError(
            "mismatched images: every sample of a batch must hold the same number of images with the same "
            f"number of visual tokens each; got visual tokens per image per sample {counts}"
        )
    return torch.stack([torch.stack(runs) for runs in spans]).to(input_ids.device)


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding an adapter to the registry (most specific first)."""
    _ADAPTERS.insert(0, cls)
    return cls


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``. Raises TypeError naming the supported model classes."""
    for cls in _ADAPTERS:
        if cls.supports(model):
            return cls(model)
    supported = sorted({c for a in _ADAPTERS for c in a.model_classes})
    raise TypeError(f"unsupported model class {type(model).__name__}; vtprune supports {supported}")
