"""Synthetic benchmark inputs: text tokens around one image, random pixels, identical rows.

Speed depends on the sequence shapes, not on the token values, so a prompt is ``prompt_tokens`` random
text ids (never the image token) with the image placeholder repeated as many times as the model's
processor would (``image_seq_length``), placed after the first tenth of the text as in LLaVA's
``USER: <image>\\n{question} ASSISTANT:`` template.
"""

from __future__ import annotations

import torch

from vtprune.bench.archs import image_tokens


def synthetic_inputs(model, batch: int = 1, prompt_tokens: int = 60, seed: int = 0,
                     device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Inputs of one LLaVA-style model call with one image per sample.

    Args:
        model: a ``LlavaForConditionalGeneration`` (its config gives the image token id, visual tokens
            per image, image size and channels; its input embedding the vocabulary size).
        batch: B, identical rows (no padding).
        prompt_tokens: N >= 2 text tokens; ``max(1, N // 10)`` before the image (the first is BOS when
            the config has one), the rest after it.
        seed: seed of the token ids and pixels.
        device: where to put the tensors (default: the model's device).

    Returns:
        ``input_ids`` LongTensor [B, N + N_v], ``attention_mask`` LongTensor [B, N + N_v] (ones),
        ``pixel_values`` [B, C, H, W] standard-normal in the model's dtype (H = W = the tower's
        ``image_size``).

    Raises:
        ValueError: batch < 1 or prompt_tokens < 2.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 2:
        raise ValueError(f"prompt_tokens must be an int >= 2 (text before and after the image), got {prompt_tokens!r}")
    cfg = model.config
    image_id = cfg.image_token_id
    n_visual = image_tokens(cfg)
    vocab = min(cfg.text_config.vocab_size, model.get_input_embeddings().num_embeddings)
    specials = {image_id}
    for value in (cfg.text_config.pad_token_id, cfg.text_config.eos_token_id):
        specials.update(value if isinstance(value, list | tuple) else [value])
    specials.discard(None)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab, (prompt_tokens,), generator=g)
    safe = next(i for i in range(3, vocab) if i not in specials)
    for special in specials:
        text[text == special] = safe
    bos = cfg.text_config.bos_token_id
    if bos is not None and bos != image_id:
        text[0] = bos
    before = max(1, prompt_tokens // 10)
    row = torch.cat([text[:before], torch.full((n_visual,), image_id, dtype=torch.long), text[before:]])
    ids = row.expand(batch, -1).clone()
    vc = cfg.vision_config
    size = vc.image_size
    pixels = torch.randn(1, getattr(vc, "num_channels", 3), size, size, generator=g).expand(batch, -1, -1, -1)
    device = device if device is not None else model.device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=model.dtype).contiguous()}
