"""Cross-attention control for real images: recording, prompt-to-prompt injection, token alignment.

While the inverted image is reconstructed with its caption, `AttentionControl`
records the conditional cross-attention maps of every UNet cross-attention layer.
While the counterfactual is sampled with the edited caption, it injects those maps
(re-indexed from the source caption's tokens to the target caption's tokens) for
the first steps, so the layout of the original survives the change of prompt
(Hertz et al., "Prompt-to-Prompt", replacement edit).

It works through diffusers' attention processors. `attach` installs the recording
processors only for the duration of a `with` block and restores the UNet's own
(fast, fused) processors afterwards, also when nothing is recorded or injected.

The engine tells the control which DDIM step it is in (`begin_step`) from inside
each step, so the step index stays right when gradient checkpointing recomputes a
step during the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


@dataclass
class TokenSpan:
    """Where a word sits in a tokenized caption: token positions [start, stop)."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def find_word_tokens(tokenizer, caption: str, word: str) -> TokenSpan | None:
    """Token positions of `word` (one or several words, any number of BPE pieces) in `caption`.

    Positions count the start-of-text token, as in the text encoder's output. The whole
    word is matched, so a multi-token class name is aligned as a unit."""
    caption_ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word_ids:
        return None
    n = len(word_ids)
    for start in range(len(caption_ids) - n + 1):
        if caption_ids[start : start + n] == word_ids:
            return TokenSpan(start, start + n)
    return None


def token_mapping(source: TokenSpan, target: TokenSpan, length: int) -> torch.Tensor:
    """Matrix M (length, length) with target_probs = source_probs @ M.T, for a word swap.

    Every source token hands its attention to exactly one place, so each row of
    attention keeps its total mass: tokens before the word keep their position; tokens
    after it move by the difference in length (at the end of the sequence, the
    overflow goes to the last position); the source word's attention, all pieces
    together, is shared equally by the pieces of the target word."""
    mapping = torch.zeros(length, length)
    shift = target.length - source.length
    for s in range(length):
        if s < source.start:
            mapping[s, s] = 1.0
        elif s < source.stop:
            mapping[target.start : target.stop, s] = 1.0 / target.length
        else:
            mapping[min(max(s + shift, target.stop), length - 1), s] = 1.0
    return mapping


class AttentionControl:
    """Records or injects conditional cross-attention maps, step by step.

    mode "off": probabilities pass through; "record": conditional cross-attention maps
    of steps < `store_steps` are kept for injection, and class-token maps of steps
    < `map_steps` are accumulated for the foreground mask; "inject": for steps
    < `inject_steps`, the conditional cross-attention maps are replaced by the recorded
    ones, re-indexed by `mapping` (with `item_inject_steps`, each batch item has its own
    number of injected steps).

    The UNet is called on [unconditional; conditional] halves (see GuidedDDIM.denoise_step);
    only the conditional half is recorded or replaced.
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.step = 0
        self.store_steps = 0
        self.map_steps = 0
        self.inject_steps = 0
        self.item_inject_steps: list[int] | None = None  # per batch item; None: inject_steps for all
        self.map_tokens: TokenSpan | None = None
        self.mapping: torch.Tensor | None = None  # (L, L)
        # (step, layer) -> (n * heads, Q, L): batch item 0 of a recording (n = 1), or one
        # recording per batch item (n = B, see for_batch). Stored as fp16 copies of their
        # own: a slice of the layer's probabilities would keep all of them, both guidance
        # halves of every item (a GB an image for SD 1.x at 512 px).
        self.stored: dict[tuple[int, str], torch.Tensor] = {}
        # On the device of the probabilities, made at the first injection: built per layer
        # and step, each would be a host-to-device copy.
        self._device_mapping: torch.Tensor | None = None  # (L, L)
        self._device_item_steps: torch.Tensor | None = None  # (B,) item_inject_steps
        self.map_sums: dict[int, torch.Tensor] = {}  # attention side -> summed (B, side, side)
        self.map_counts: dict[int, int] = {}
        self.map_side = 0

    # -- set up by the caller --------------------------------------------------

    def record(self, store_steps: int, map_steps: int, map_tokens: TokenSpan | None, map_side: int) -> None:
        self.mode, self.store_steps, self.map_steps = "record", store_steps, map_steps
        self.map_tokens, self.map_side = map_tokens, map_side
        self.stored, self.map_sums, self.map_counts = {}, {}, {}

    def inject(self, inject_steps: int | list[int], mapping: torch.Tensor | None) -> None:
        """Inject for the first `inject_steps` steps: one number for every item, or one per batch item."""
        self.mode, self.mapping = "inject", mapping
        self._device_mapping = self._device_item_steps = None
        self.item_inject_steps = list(inject_steps) if isinstance(inject_steps, (list, tuple)) else None
        self.inject_steps = max(self.item_inject_steps) if self.item_inject_steps else int(inject_steps)

    @classmethod
    def for_batch(
        cls, recorded: list[AttentionControl], mappings: list[torch.Tensor | None], inject_steps: int | list[int]
    ) -> AttentionControl:
        """One control that injects into batch item b what `recorded[b]` recorded, re-indexed by
        `mappings[b]` (a word swap's token mapping, or None): several real images, each with
        its own edit (and, given a list, its own number of injected steps), in one batch.
        Layers and steps missing from any recording are left alone."""
        control = cls()
        keys = set.intersection(*(set(r.stored) for r in recorded))
        if keys:
            device = next(iter(recorded[0].stored.values())).device
            mappings = [None if mapping is None else mapping.to(device) for mapping in mappings]  # (L, L) each
        for key in keys:
            parts = []
            for record, mapping in zip(recorded, mappings):
                source = record.stored[key]  # (heads, Q, L): one recorded image
                parts.append(source if mapping is None else (source.float() @ mapping.T).to(source.dtype))
            control.stored[key] = torch.cat(parts)  # (B * heads, Q, L)
        control.inject(inject_steps, None)
        return control

    def off(self) -> None:
        self.mode = "off"

    @property
    def active(self) -> bool:
        if self.mode == "record":
            return self.step < max(self.store_steps, self.map_steps)
        if self.mode == "inject":
            return self.step < self.inject_steps
        return False

    def begin_step(self, step: int) -> None:
        """Called by the engine at the start of each DDIM step (and of its recomputation)."""
        self.step = step

    def attention_map(self) -> torch.Tensor | None:
        """Mean class-token cross-attention map over layers, heads, pieces and steps: (B, side, side)
        at `map_side`.

        The reference uses the 16x16 maps of a 64x64 latent (a quarter of the latent side):
        coarse enough to be smooth, fine enough to follow the object. Those maps are used
        when the UNet has cross-attention at that resolution, else all maps averaged. Maps
        are never taken coarser than 8x8: a quarter of the shapes model's 16x16 latent is a
        4x4 map, whose cells are a quarter of the image and cannot follow an object."""
        if not self.map_sums:
            return None
        preferred = max(self.map_side // 4, 8)
        sides = [preferred] if preferred in self.map_sums else sorted(self.map_sums)
        maps = [
            F.interpolate(
                (self.map_sums[side] / self.map_counts[side])[:, None],
                size=(self.map_side, self.map_side),
                mode="bilinear",
                align_corners=False,
            )[:, 0]
            for side in sides
        ]
        return torch.stack(maps).mean(0)

    # -- called by the processors ----------------------------------------------

    def __call__(self, probs: torch.Tensor, layer: str, heads: int) -> torch.Tensor:
        """probs: (2B * heads, Q, L) cross-attention probabilities, [uncond; cond] halves."""
        half = probs.shape[0] // 2
        cond = probs[half:]  # (B * heads, Q, L)
        if self.mode == "record":
            if self.step < self.store_steps:
                self.stored[(self.step, layer)] = cond[:heads].detach().to(torch.float16, copy=True)  # (heads, Q, L)
            if self.step < self.map_steps and self.map_tokens is not None:
                self._accumulate_map(cond.detach(), heads)
            return probs
        if self.mode == "inject" and self.step < self.inject_steps:
            source = self.stored.get((self.step, layer))
            if source is None:
                return probs
            source = source.to(probs)
            if self.mapping is not None:
                source = source @ self._on_device(probs.device)[0].to(probs).T  # (heads, Q, L): re-index tokens
            batch = half // heads
            # One recording for every item, or (for_batch) one recording per item already.
            replaced = source if source.shape[0] == half else source.repeat(batch, 1, 1)  # (B * heads, Q, L)
            if self.item_inject_steps is not None:
                # Items past their own injected steps keep their own maps.
                injected = self._on_device(probs.device)[1] > self.step  # (B,)
                injected = injected.repeat_interleave(heads).view(-1, 1, 1)  # (B * heads, 1, 1)
                replaced = torch.where(injected, replaced, cond)
            return torch.cat([probs[:half], replaced])
        return probs

    def _on_device(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The token mapping (L, L) and the items' injected steps (B,) on `device`, copied once."""
        if self._device_mapping is None and self.mapping is not None:
            self._device_mapping = self.mapping.to(device)
        if self._device_item_steps is None and self.item_inject_steps is not None:
            self._device_item_steps = torch.tensor(self.item_inject_steps, device=device)
        return self._device_mapping, self._device_item_steps

    def _accumulate_map(self, cond: torch.Tensor, heads: int) -> None:
        batch = cond.shape[0] // heads
        queries = cond.shape[1]
        side = int(round(queries**0.5))
        span = self.map_tokens
        maps = cond[..., span.start : span.stop].mean(-1)  # (B * heads, Q)
        maps = maps.view(batch, heads, side, side).mean(1)  # (B, side, side)
        self.map_sums[side] = self.map_sums[side] + maps if side in self.map_sums else maps
        self.map_counts[side] = self.map_counts.get(side, 0) + 1


class ControlledAttnProcessor:
    """diffusers' plain attention computation with the probabilities exposed to an AttentionControl.

    Cross-attention layers go through the control while it is active; everything else
    (self-attention, inactive steps) takes the fused scaled-dot-product path."""

    def __init__(self, control: AttentionControl, layer: str, fallback) -> None:
        self.control = control
        self.layer = layer
        self.fallback = fallback

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or not self.control.active:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B * heads, L, d)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))  # (B * heads, L, d)
        query = attn.head_to_batch_dim(query)  # (B * heads, Q, d)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, Q, L)
        probs = self.control(probs, self.layer, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, Q, heads * d)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attach(engine, control: AttentionControl) -> Iterator[AttentionControl]:
    """Install controlled processors on every attention layer of the engine's UNet and make the
    control the engine's step observer; restore both on exit.

    engine: a GuidedDDIM (anything with `.components.unet` and `.step_observer`)."""
    unet = engine.components.unet
    original = dict(unet.attn_processors)
    unet.set_attn_processor(
        {name: ControlledAttnProcessor(control, name, processor) for name, processor in original.items()}
    )
    engine.step_observer = control
    try:
        yield control
    finally:
        engine.step_observer = None
        unet.set_attn_processor(original)
        control.off()
