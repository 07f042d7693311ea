"""A diffusers Stable Diffusion 1.x-style pipeline written as one original-layout (LDM)
checkpoint, the form fine-tuned models are shared in, so that the single-file loader can be
tested offline on a tiny model. The key names are the inverse of diffusers' own conversion
(diffusers.loaders.single_file_utils); `test_the_ldm_writer_inverts_diffusers_conversion`
checks it by converting back."""

from __future__ import annotations

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))  # fmt: skip
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _move(state: dict, ldm: dict, diffusers_prefix: str, ldm_prefix: str, renames=(), reshape_1x1: bool = False) -> None:
    for key in [k for k in state if k.startswith(diffusers_prefix + ".")]:
        rest = key[len(diffusers_prefix) + 1 :]
        for new, old in renames:
            rest = rest.replace(new, old)
        value = state.pop(key)
        if reshape_1x1 and value.dim() == 2:  # LDM's VAE attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        ldm[f"{ldm_prefix}.{rest}"] = value


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    state, config, ldm = dict(unet.state_dict()), unet.config, {}
    for diffusers_key, ldm_key in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                                   ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):  # fmt: skip
        for part in ("weight", "bias"):
            ldm[f"{ldm_key}.{part}"] = state.pop(f"{diffusers_key}.{part}")
    layers, levels = config.layers_per_block, len(config.block_out_channels)
    for i in range(levels):
        for j in range(layers):
            index = i * (layers + 1) + j + 1
            _move(state, ldm, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", RESNET)
            _move(state, ldm, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1")
        _move(state, ldm, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op")
    _move(state, ldm, "mid_block.resnets.0", "middle_block.0", RESNET)
    _move(state, ldm, "mid_block.attentions.0", "middle_block.1")
    _move(state, ldm, "mid_block.resnets.1", "middle_block.2", RESNET)
    for i in range(levels):
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            _move(state, ldm, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", RESNET)
            _move(state, ldm, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1")
        _move(state, ldm, f"up_blocks.{i}.upsamplers.0", f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}")
    assert not state, f"unmapped UNet weights: {sorted(state)[:5]}"
    return {f"model.diffusion_model.{k}": v for k, v in ldm.items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    state, ldm = dict(vae.state_dict()), {}
    levels = len(vae.config.block_out_channels)
    for coder in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            _move(state, ldm, f"{coder}.{name}", f"{coder}.{name}")
        _move(state, ldm, f"{coder}.conv_norm_out", f"{coder}.norm_out")
        for j in (0, 1):
            _move(state, ldm, f"{coder}.mid_block.resnets.{j}", f"{coder}.mid.block_{j + 1}", (("conv_shortcut", "nin_shortcut"),))
        _move(state, ldm, f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", VAE_ATTENTION, reshape_1x1=True)
    for i in range(levels):
        _move(state, ldm, f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", (("conv_shortcut", "nin_shortcut"),))
        _move(state, ldm, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        _move(state, ldm, f"decoder.up_blocks.{i}.resnets", f"decoder.up.{levels - 1 - i}.block", (("conv_shortcut", "nin_shortcut"),))
        _move(state, ldm, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv")
    for name in ("quant_conv", "post_quant_conv"):
        _move(state, ldm, name, name)
    assert not state, f"unmapped VAE weights: {sorted(state)[:5]}"
    return {f"first_stage_model.{k}": v for k, v in ldm.items()}


def pipeline_to_ldm(pipeline) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP text encoder of a StableDiffusionPipeline in one original-layout state dict."""
    # The original layout names the CLIP weights text_model.*; transformers >= 5.6 flattened CLIPTextModel.
    text = {f"cond_stage_model.transformer.{'' if k.startswith('text_model.') else 'text_model.'}{k}": v
            for k, v in pipeline.text_encoder.state_dict().items()}  # fmt: skip
    return {**unet_to_ldm(pipeline.unet), **vae_to_ldm(pipeline.vae), **text}
