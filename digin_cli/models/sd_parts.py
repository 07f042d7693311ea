"""Stable-Diffusion-format parts built from configs: the one builder behind the built-in
pipelines (``builtin``), the shapes world's training (``world/train_diffusion``) and the
performance benchmark's random SD-sized pipeline.

Nothing here is downloaded: the CLIP BPE vocabulary ships inside open_clip, and every
model is a diffusers / transformers class built from its config.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from digin_cli.components import DiffusionComponents
from digin_cli.models.diffusion import SETTINGS_FILE


def clip_tokenizer_files(folder: Path) -> None:
    """Write the real CLIP BPE vocabulary (shipped inside open_clip) as vocab.json + merges.txt.

    open_clip names the special tokens <start_of_text>/<end_of_text>; Stable Diffusion's
    tokenizer calls them <|startoftext|>/<|endoftext|> (ids 49406/49407), so rename them.
    """
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for (a, b), _ in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def sd_v1_scheduler():
    """Stable Diffusion v1's noise schedule and DDIM settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def clip_text_encoder(hidden_size: int, intermediate_size: int, num_layers: int = 2, num_heads: int = 4):
    """A small CLIP text transformer over the real CLIP vocabulary (49408 tokens, 77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def clip_tokenizer():
    """Stable Diffusion's CLIPTokenizer, built from the vocabulary that ships inside open_clip."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as vocab_dir:
        clip_tokenizer_files(Path(vocab_dir))
        return CLIPTokenizer.from_pretrained(vocab_dir, model_max_length=77)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline without safety checker, ready for save_pretrained."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# digin's defaults for the small built-in pipelines, read by load_diffusion from digin.json.
# - inversion_lr: their UNets respond weakly to the null embedding: null-text inversion at
#   the reference lr 1e-2 reached 8.7 dB on a shapes scene, at 0.1 24.4 dB (the VAE's bound).
# - prompt_lr: their text embeddings are 64 wide, SD 1.x's 768. Adam moves every
#   coordinate by about lr per step, so the same lr moves the cross-attention logits (sums
#   over the width) roughly 12x less. Maximizing the grass neuron of
#   shapes:background-biased from sand/water scenes, 20 steps: at 1e-2 the activation went
#   0.04 -> 0.31 (still sand); at 5e-2 (prompt and null) 0.04 -> 1.62 (grass, the neuron's on-grass mean is 1.67).
# - null_lr stays at the reference 1e-2: null-text deltas sit on inverted null embeddings
#   in uvce / neuron-cf, and larger steps there undo the inversion: at 5e-2 the
#   independent oracle-2 agreed with 5 of 8 uvce bench counterfactuals, at 1e-2 with 7.
SMALL_MODEL_SETTINGS = {"inversion_lr": 0.1, "prompt_lr": 0.05, "null_lr": 0.01}


def write_model_settings(folder: Path) -> None:
    """digin.json with SMALL_MODEL_SETTINGS, beside a small model's diffusers files."""
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(SMALL_MODEL_SETTINGS, indent=2) + "\n")


def small_unet(down_block_types, up_block_types, cross_attention_dim: int, attention_head_dim):
    """The built-in models' UNet2DConditionModel: 16x16x4 latents, two levels of 32 and 64 channels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=16,
    )


def small_vae(block_out_channels: tuple[int, int, int], latent_channels: int = 4):
    """The built-in models' AutoencoderKL: 64x64 RGB <-> 4x16x16 latents (three levels, factor 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=64,
    )


def build_sd1_random(resolution: int, seed: int = 0) -> DiffusionComponents:
    """Stable Diffusion 1.x's architecture with random weights, from configs (no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if resolution % 64:
        raise ValueError(f"the SD-sized pipeline needs a resolution divisible by 64, got {resolution}")
    torch.manual_seed(seed)
    # diffusers' defaults are SD 1.x's UNet (320/640/1280/1280, 2 layers a block); SD 1.x
    # conditions on 768-wide CLIP ViT-L/14 text states with 8 attention heads.
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=resolution,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    )  # fmt: skip
    return DiffusionComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                               scheduler=sd_v1_scheduler(), source=f"sd1-random@{resolution}")  # fmt: skip
