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
    indices in the call, and the indices (sample-major, among all images / videos of the call) of their
    images and of their videos."""

    samples: list[int]
    images: list[int]
    videos: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """A ``rows x cols`` patch grid inside one image's visual tokens, or a ``frames x rows x cols`` grid
    inside one video's.

    Patch (r, c) of frame f is visual token ``start + f * rows * stride + r * stride + c`` of the image or
    video (an index among its N_v visual tokens, not a sequence position). ``stride`` defaults to ``cols``;
    with ``stride > cols`` the last ``stride - cols`` tokens of every row are separators, not patches
    (LLaVA-NeXT's ``image_newline``). ``frames`` (default 1) is the temporal extent: a video's frames (its
    temporal patches, for Qwen's tower), one ``rows x stride`` block after the other.

    Raises:
        ValueError: a non-positive size, a negative start, or ``stride < cols``.
    """

    rows: int
    cols: int
    start: int = 0
    stride: int = 0  # 0: cols
    frames: int = 1

    def __post_init__(self):
        if self.stride == 0:
            object.__setattr__(self, "stride", self.cols)
        if self.rows < 1 or self.cols < 1 or self.start < 0 or self.stride < self.cols or self.frames < 1:
            raise ValueError(f"invalid patch grid {self}: rows, cols, frames >= 1, start >= 0, stride >= cols")

    @property
    def separators(self) -> int:
        """Separator tokens closing each row (``stride - cols``)."""
        return self.stride - self.cols

    @property
    def tokens(self) -> int:
        """Visual tokens the grid spans, separators included (``frames * rows * stride``)."""
        return self.frames * self.rows * self.stride

    def token(self, row: torch.Tensor | int, col: torch.Tensor | int, frame: torch.Tensor | int = 0):
        """Index among the image's (video's) visual tokens of patch (row, col) of ``frame``; ``col = cols``
        is the row's first separator."""
        return self.start + frame * self.rows * self.stride + row * self.stride + col


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

    @property
    def video_token_id(self) -> int | None:
        """The placeholder token id of video tokens, or None (the default) for a family whose model class takes
        no video input."""
        return None

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Every placeholder id whose tokens are visual tokens: the image token's, then the video token's
        where the adapter schedules videos."""
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)

    saliency_modalities: tuple[str, ...] = ("image", "video")
    """The order in which the model runs its vision tower on a call's images and videos (transformers runs
    ``get_image_features`` before ``get_video_features``, in ``generate`` and in ``forward``): the saliency
    hooks' output comes in this order, all images (sample-major) then all videos, and the engine puts it in
    the prompt's order (:func:`saliency_rows`)."""

    def visual_kinds(self, input_ids: torch.Tensor, inputs: dict | None = None) -> tuple[str, ...] | None:
        """The kind (``"image"`` or ``"video"``) of each of the I visual units that :meth:`visual_index`
        returns for the same call, in prompt order (the same in every sample of a batch: :meth:`visual_index`
        refuses otherwise), or None when every unit is an image (the default: a family without video)."""
        if self.video_token_id is None:
            return None
        return units_of(input_ids, self.unit_token_ids(), self.unit_counts(inputs or {}))[1]

    def unit_token_ids(self) -> dict[str, int]:
        """The placeholder id of each kind of visual unit: ``{"image": ...}``, plus ``"video"`` where the adapter
        schedules videos (the argument of :func:`units_of` / :func:`unit_groups`)."""
        ids = {"image": self.image_token_id}
        if self.video_token_id is not None:
            ids["video"] = self.video_token_id
        return ids

    def unit_counts(self, inputs: dict) -> dict[str, list[int] | None]:
        """Visual tokens of each image and each video of a call, in the order of the call's tensors
        (sample-major), by kind; a kind's entry is None when the call does not say (families that schedule
        video override this)."""
        return {"image": None, "video": None}

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


def saliency_rows(kinds: tuple[str, ...], samples: int, order: tuple[str, ...] = ("image", "video")) -> torch.Tensor:
    """Where each visual unit's saliency lies in what the vision tower gave.

    The tower runs once per modality, in ``order``: all images of the call (sample-major), then all videos.
    The engine wants the units in prompt order, sample by sample.

    Args:
        kinds: each sample's units' kinds in prompt order (``"image"`` / ``"video"``), the same in every sample.
        samples: the samples of the call the tower ran on.
        order: the modalities in the order the tower ran on them.

    Returns:
        LongTensor [samples * I]: row r (sample r // I, unit r % I) of the prompt-ordered saliency is row
        ``out[r]`` of the tower's output.
    """
    per_kind = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in order}
    base, rows = 0, torch.empty(samples * len(kinds), dtype=torch.long)
    for k in order:
        units = per_kind[k]
        for b in range(samples):
            for j, i in enumerate(units):
                rows[b * len(kinds) + i] = base + b * len(units) + j
        base += samples * len(units)
    return rows


def units_per_sample(input_ids: torch.Tensor, token_ids: dict[str, int], counts: dict[str, list[int] | None]
                     ) -> list[list[tuple[str, torch.Tensor]]]:
    """Each sample's images and videos in prompt order: (kind, LongTensor of its original token indices).

    Each kind's tokens (``input_ids == token_ids[kind]``) are dealt, in order, to that kind's units, whose
    token counts ``counts[kind]`` are in the order of the call's tensors (sample-major, as the processors
    emit them); a unit need not be contiguous (Qwen3-VL writes a timestamp before each frame of a video).
    With ``counts[kind]`` None each contiguous run of the kind's tokens is one unit. Units are ordered by
    their first token.

    Raises:
        ValueError: a sample without visual tokens; a kind whose tokens do not add up to its units' counts.
    """
    per_sample: list[list[tuple[int, str, torch.Tensor]]] = [[] for _ in range(input_ids.shape[0])]
    for kind, token in token_ids.items():
        hits = (input_ids == token).cpu()
        given = counts.get(kind)
        queue = list(given or [])
        if given is not None and int(hits.sum()) != sum(given):
            raise ValueError(f"{kind} tokens disagree with the {kind}s: input_ids hold {int(hits.sum())} tokens {token} "
                             f"({kind}_token_id), the {len(given)} {kind}s give {given} = {sum(given)} visual tokens; "
                             "build the prompt with the model's processor from the same inputs")
        for b, row in enumerate(hits):
            pos = row.nonzero().flatten()
            if given is None:
                cuts = ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
                chunks = list(torch.tensor_split(pos, cuts)) if pos.numel() else []
            else:
                chunks, at = [], 0
                while at < pos.numel():
                    n = queue.pop(0)
                    if at + n > pos.numel():
                        raise ValueError(f"{kind} tokens disagree with the {kind}s: sample {b} holds {pos.numel()} "
                                         f"{kind} tokens, which the {kind}s' counts {given} do not tile")
                    chunks.append(pos[at:at + n])
                    at += n
            per_sample[b] += [(int(c[0]), kind, c) for c in chunks]
    for b, units in enumerate(per_sample):
        if not units:
            kinds = " or ".join(f"{k} tokens ({k}_token_id={t})" for k, t in token_ids.items())
            raise ValueError(f"sample {b} has no {kinds}; vtprune schedules visual tokens, so every prompt must contain "
                             "the placeholder (use the model's processor)")
        units.sort(key=lambda u: u[0])
    return [[(kind, c) for _, kind, c in units] for units in per_sample]


def units_of(input_ids: torch.Tensor, token_ids: dict[str, int], counts: dict[str, list[int] | None]
             ) -> tuple[torch.Tensor, tuple[str, ...]]:
    """A batch's images and videos as the engine schedules them (:func:`units_per_sample`, arguments as there).

    Returns:
        (LongTensor [B, I, N_v] of original indices, ascending per unit; the I units' kinds).

    Raises:
        ValueError: as :func:`units_per_sample`; samples with different kinds or numbers of units, or units
            of different token counts (vtprune schedules a batch as [B, I, N_v]: give the images and videos of
            one prompt the same number of visual tokens, or run them in separate calls).
    """
    per_sample = units_per_sample(input_ids, token_ids, counts)
    kinds = [tuple(k for k, _ in units) for units in per_sample]
    sizes = [[c.numel() for _, c in units] for units in per_sample]
    if any(k != kinds[0] for k in kinds) or any(n != sizes[0] for n in sizes) or len(set(sizes[0])) != 1:
        raise ValueError(
            "mismatched images / videos: every sample of a batch must hold the same kinds of visual inputs in the same "
            "order, each with the same number of visual tokens (vtprune schedules a batch as [B, I, N_v]); got "
            f"{[list(zip(k, n, strict=True)) for k, n in zip(kinds, sizes, strict=True)]} (kind, visual tokens) per "
            "sample. Resize the images to one size and sample the videos to one number of frames and size, or run "
            "them in separate calls")
    index = torch.stack([torch.stack([c for _, c in units]) for units in per_sample])
    return index.to(input_ids.device), kinds[0]


def unit_groups(input_ids: torch.Tensor, token_ids: dict[str, int], counts: dict[str, list[int] | None]
                ) -> list[SampleGroup] | None:
    """A ``generate`` call's samples grouped by the kinds and token counts of their images and videos in prompt
    order (:func:`units_per_sample`, arguments as there), for :meth:`Adapter.batch_groups`: each group with the
    indices (sample-major, among the call's images / videos) of its images and videos; None when every sample
    is alike.

    Raises:
        ValueError: as :func:`units_per_sample`.
    """
    per_sample = units_per_sample(input_ids, token_ids, counts)
    keys = [tuple((kind, c.numel()) for kind, c in units) for units in per_sample]
    if len(set(keys)) == 1:
        return None
    groups: dict[tuple, list[int]] = {}
    for b, key in enumerate(keys):
        groups.setdefault(key, []).append(b)
    owner = {k: [b for b, units in enumerate(per_sample) for kind, _ in units if kind == k] for k in ("image", "video")}
    return [SampleGroup(samples, [i for i, b in enumerate(owner["image"]) if b in samples],
                        tuple(i for i, b in enumerate(owner["video"]) if b in samples)) for samples in groups.values()]


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
