"""Optional image captioner that extends the inversion caption (`--captioner MODEL`).

Any transformers image-to-text model that continues a text prompt (BLIP, e.g.
`Salesforce/blip-image-captioning-large`), a hub id or a local folder, loaded with
transformers' Auto classes. The caption "an image of a <class>" is given as the
prompt and the model continues it (beam search 3, at most 20 new tokens, cut at
the first '.'), as the reference does with its captioning model; so the class words
stay in the caption and prompt-to-prompt can still swap them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from digin_cli.errors import DiginError


@dataclass
class Captioner:
    name: str
    processor: object
    model: torch.nn.Module
    device: torch.device

    @torch.no_grad()
    def extend(self, image: torch.Tensor, caption: str) -> str:
        """image (3, H, W) in [0, 1]; returns `caption` continued by the model (or unchanged)."""
        from digin_cli.io import to_pil

        inputs = self.processor(images=to_pil(image), text=caption, return_tensors="pt").to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=20, num_beams=3)
        text = self.processor.decode(output[0], skip_special_tokens=True).strip()
        # The model repeats the prompt (often lower-cased) before its continuation.
        continuation = text[len(caption) :] if text.lower().startswith(caption.lower()) else " " + text
        continuation = continuation.split(".")[0].rstrip()
        return (caption + continuation) if continuation.strip() else caption


def load_captioner(name: str, device: torch.device | str = "cpu") -> Captioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiginError(
            f"could not load the captioner '{name}': {reason}. Give a transformers image-to-text model "
            "(hub id, downloaded once, or a local folder), e.g. Salesforce/blip-image-captioning-large"
        ) from None
    model.to(device).eval()
    return Captioner(name=name, processor=processor, model=model, device=torch.device(device))
