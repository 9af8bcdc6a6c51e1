"""The read-only view of a generation that methods see (they decide; the engine acts, see
:mod:`vtprune.engine.decisions`).

Shapes: B samples, I images per sample, N_v visual tokens per image, n those present now, d hidden size,
H attention heads, Q question tokens.
"""

from __future__ import annotations

import torch

from vtprune.engine import paths as _paths
from vtprune.engine.state import Generation


class GenerationView:
    """What a method may read of the generation in progress (one ``generate`` call).

    Attributes (read-only): ``num_layers`` (L), ``batch_size`` (B), ``n_images`` (I), ``n_visual`` (N_v),
    ``prompt_length`` (S, padded), ``phase`` (``"prefill"`` | ``"decode"``), ``layer`` (the decoder layer
    about to run), ``step`` (decode: tokens generated so far, 1 at the first decode step; 0 in the
    prefill), ``max_new_tokens`` (of the generate call, or None), ``visual_index`` (LongTensor
    [B, I, N_v], original indices of every image's tokens), ``saliency`` (FloatTensor [B, I, N_v] from
    the adapter, or None unless the method ``needs_saliency``), ``visual_grids`` (the adapter's
    :class:`~vtprune.adapters.base.PatchGrid` s of each image, or None; asked of the adapter on first read
    only), ``visual_grid`` ((rows, cols) when that is one grid covering every visual token, else None),
    ``paths_active`` (packed paths run at this layer).
    """

    __slots__ = ("_state",)

    def __init__(self, state: Generation):
        self._state = state

    # ------------------------------------------------------------------ plain facts
    @property
    def num_layers(self) -> int:
        return self._state.num_layers

    @property
    def batch_size(self) -> int:
        return self._state.batch_size

    @property
    def n_images(self) -> int:
        return self._state.n_images

    @property
    def n_visual(self) -> int:
        return self._state.n_visual

    @property
    def prompt_length(self) -> int:
        return self._state.prompt_length

    @property
    def phase(self) -> str:
        return self._state.phase

    @property
    def layer(self) -> int:
        return self._state.layer

    @property
    def step(self) -> int:
        return self._state.step

    @property
    def max_new_tokens(self) -> int | None:
        return self._state.max_new_tokens

    @property
    def visual_index(self) -> torch.Tensor:
        return self._state.visual_index

    @property
    def saliency(self) -> torch.Tensor | None:
        return self._state.saliency

    @property
    def visual_grids(self) -> tuple | None:
        return self._state.visual_grids

    @property
    def visual_grid(self) -> tuple[int, int] | None:
        return self._state.visual_grid

    @property
    def paths_active(self) -> bool:
        return self._state.paths is not None

    # ------------------------------------------------------------------ questions
    def visual_count(self, layer: int | None = None) -> int:
        """Visual tokens per image present: in the main sequence (prefill) or in the KV cache of
        ``layer`` (decode; default the current layer)."""
        return self._state.visual_count(layer)

    def visual_attention(self, layer: int) -> torch.Tensor:
        """Attention of the last query (prefill) or of the token being decoded, at ``layer``, to the
        visual tokens currently present: FloatTensor [B, I, n] (softmax over the whole row in fp32, mean
        over heads; -inf for a token not among the layer's keys). Needs a
        :class:`~vtprune.engine.decisions.LastQuery` request at ``layer`` this step (RuntimeError otherwise)."""
        return self._state.visual_attention(layer)

    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the visual tokens present at the input of the current prefill layer (layer 0:
        the projected visual embeddings), [B, I, n, d] in the model dtype. RuntimeError outside the
        prefill or while paths run."""
        return self._state.visual_hidden()

    def question_count(self) -> int:
        """Q, question tokens per sample while paths run (RuntimeError otherwise)."""
        return self._state.paths_state().question_count

    def question_visual_lse(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head, the log-sum-exp of each question token's attention logits over its own path's visual
        keys at ``layer``: (path 1 [B, H, Q], path 2 [B, H, Q], valid [B, Q]); needs a
        :class:`~vtprune.engine.decisions.PathQuestions` request at ``layer`` (see
        :func:`vtprune.engine.paths.question_visual_lse`)."""
        return _paths.question_visual_lse(self._state, layer)
