"""Text conditioning as the engine carries it: one (B, L, D) tensor per batch of prompts.

- SD 1.x / 2.x: the text encoder's last hidden state, (B, 77, D), as StableDiffusionPipeline
  computes it.
- SDXL: as StableDiffusionXLPipeline computes it, the penultimate hidden states of both
  encoders concatenated, (B, 77, D1 + D2), and the second encoder's pooled, projected
  embedding (B, P), given to the UNet with the time ids as `added_cond_kwargs`. The pooled
  embedding rides along as extra rows, zero-padded to the width D = D1 + D2: (B, 77 + R, D)
  with R = ceil(P / D). Packed, every variable of the optimization (the per-step prompt and
  null-text deltas), null-text inversion and prompt-to-prompt handle one tensor and the
  prompt delta covers the pooled embedding too; the padding never reaches the UNet, so its
  gradient is zero and Adam leaves it at zero.
"""

from __future__ import annotations

import math

import torch

from digin_cli.components import DiffusionComponents


def _tokenize(tokenizer, prompts: list[str]):
    """Token ids (B, 77) and attention mask, padded to the tokenizer's length, as the pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")  # fmt: skip


def encode_prompts(components: DiffusionComponents, prompts: list[str], device: torch.device) -> torch.Tensor:
    """The packed conditioning of `prompts`: (B, L, D), fp32."""
    if not components.is_sdxl:
        text_encoder = components.text_encoder
        tokens = _tokenize(components.tokenizer, prompts)
        attention_mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(device)
        return text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0].float()
    states, pooled = [], None
    for tokenizer, text_encoder in ((components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2)):
        output = text_encoder(_tokenize(tokenizer, prompts).input_ids.to(device), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:  # as diffusers: the first pooled output, the projected one of encoder 2
            pooled = output[0]  # (B, P)
        states.append(output.hidden_states[-2])  # (B, 77, D_i)
    return pack(torch.cat(states, dim=-1).float(), pooled.float())


def null_condition(components: DiffusionComponents, batch: int, device: torch.device) -> torch.Tensor:
    """The unconditional embedding of classifier-free guidance, (batch, L, D): the empty
    prompt's, or zeros for SDXL pipelines with `force_zeros_for_empty_prompt` (their
    default), as their pipeline uses when no negative prompt is given."""
    empty = encode_prompts(components, [""], device)  # (1, L, D)
    if components.is_sdxl and components.force_zeros_for_empty_prompt:
        empty = torch.zeros_like(empty)
    return empty.expand(batch, -1, -1)


def pack(states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, 77, D) token states and a (B, P) pooled embedding -> (B, 77 + ceil(P / D), D)."""
    batch, _, width = states.shape
    rows = math.ceil(pooled.shape[-1] / width)
    padded = torch.nn.functional.pad(pooled, (0, rows * width - pooled.shape[-1]))  # (B, R * D)
    return torch.cat([states, padded.view(batch, rows, width)], dim=1)


def unet_conditions(components: DiffusionComponents, condition: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """The packed (N, L, D) conditioning -> the UNet's (encoder_hidden_states, added_cond_kwargs)."""
    if not components.is_sdxl:
        return condition, None
    tokens = components.tokenizer.model_max_length
    pooled_width = components.text_encoder_2.config.projection_dim
    pooled = condition[:, tokens:].flatten(1)[:, :pooled_width]  # (N, P)
    # time ids as StableDiffusionXLPipeline's defaults: original size, crop top-left (0, 0),
    # target size, all at the sampling resolution.
    side = float(components.resolution)
    # Made on the device (new_tensor from a list would copy from the host at every UNet call).
    time_ids = condition.new_full((6,), side)
    time_ids[2:4] = 0.0
    time_ids = time_ids.expand(condition.shape[0], -1)  # (N, 6)
    return condition[:, :tokens], {"text_embeds": pooled, "time_ids": time_ids}
