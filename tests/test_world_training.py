"""The shapes world's diffusion training: the parts whose properties the shipped weights rely on."""

import torch

from digin_cli.world.train_diffusion import CAPTION_VARIANTS, build_vae, finetune_decoder, reconstruction_loss, render_dataset


def test_diffusion_training_captions_are_the_four_variants_in_the_order_sampled():
    _, _, captions = render_dataset(2, seed=0)
    for variants in captions:
        colour, shape, background = (variants[0].split()[i] for i in (4, 5, 7))
        # train_denoiser picks variant 1 * (colour left out) + 2 * (background left out).
        assert variants == [
            f"a photograph of a {colour} {shape} on {background}",
            f"a photograph of a {shape} on {background}",
            f"a photograph of a {colour} {shape}",
            f"a photograph of a {shape}",
        ]
    assert CAPTION_VARIANTS == ((True, True), (False, True), (True, False), (False, False))


def test_decoder_finetuning_leaves_the_encoder_and_so_the_latents_as_they_were():
    # The UNet is trained on the encoder's latents: a decoder stage that moved them would
    # silently change what the UNet learns (and the one-command retrain would not
    # reproduce the shipped weights).
    images, masks, _ = render_dataset(8, seed=1)
    torch.manual_seed(0)
    vae = build_vae().eval().requires_grad_(False)
    encoder_before = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("encoder", "quant_conv"))}
    decoder_before = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("decoder")}
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean  # (8, 4, 16, 16)
        loss_before = reconstruction_loss(vae.decode(latents).sample, images, torch.ones_like(masks, dtype=torch.float))
    finetune_decoder(vae, latents, images, masks, steps=30, batch=8, seed=0, log=lambda _: None, lr=3e-3)
    state = vae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder_before.items())
    assert any(not torch.equal(state[k], v) for k, v in decoder_before.items())
    with torch.no_grad():
        assert torch.equal(vae.encode(images).latent_dist.mean, latents)
        loss_after = reconstruction_loss(vae.decode(latents).sample, images, torch.ones_like(masks, dtype=torch.float))
    assert loss_after < 0.8 * loss_before
    assert not any(p.requires_grad for p in vae.parameters())  # handed back frozen, as train_vae does
