"""The shapes world's diffusion training: the parts whose properties the shipped weights rely on."""

import json

import torch

from digin_cli.world.train_diffusion import (
    build_vae, encoder_means, finetune_decoder, finetune_shipped_decoder, reconstruction_loss, render_dataset,
)  # fmt: skip
from digin_cli.world import train_diffusion


def test_decoder_finetuning_leaves_the_encoder_and_so_the_latents_as_they_were():
    # The UNet is trained on the encoder's latents: a decoder stage that moved them would
    # silently change what the UNet learns (and the one-command retrain would not
    # reproduce the shipped weights).
    images, masks, _ = render_dataset(8, seed=1)
    torch.manual_seed(0)
    vae = build_vae().eval().requires_grad_(False)
    encoder_before = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("encoder", "quant_conv"))}
    decoder_before = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("decoder")}
    latents = encoder_means(vae, images)  # (8, 4, 16, 16)
    with torch.no_grad():
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


def test_decoder_only_stage_rewrites_the_decoder_of_a_model_folder_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    vae = build_vae()
    vae.to(torch.float16).save_pretrained(tmp_path / "vae")
    (tmp_path / "training.json").write_text(json.dumps({"unet_steps": 11000}))
    before = {k: v.float().clone() for k, v in vae.state_dict().items()}  # as stored: fp16
    info = finetune_shipped_decoder(tmp_path, n_images=16, vae_batch=8, decoder_steps=40, seed=0, log=lambda _: None)
    from diffusers import AutoencoderKL

    after = {k: v.float() for k, v in AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(("encoder", "quant_conv")))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoder"))
    assert info["unet_steps"] == 11000 and info["decoder_steps"] == 40  # the record keeps what it had
    assert info["vae_psnr_db"] > info["vae_psnr_db_before_decoder_finetune"]


def test_latent_mixup_teaches_the_decoder_the_blends_between_scenes():
    # `--decoder-mix`: the decoder also learns to decode the midpoint of two scenes'
    # latents to the blend of their images, which a plain fine-tune never sees.
    images, masks, _ = render_dataset(2, seed=1)
    blend = images.mean(0, keepdim=True)  # (1, 3, 64, 64)
    no_weight = torch.ones_like(masks[:1], dtype=torch.float)
    losses = {}
    for mix_share in (0.0, 1.0):
        torch.manual_seed(0)
        vae = build_vae().eval().requires_grad_(False)
        latents = encoder_means(vae, images)  # (2, 4, 16, 16)
        finetune_decoder(vae, latents, images, masks, steps=60, batch=4, seed=0, log=lambda _: None, lr=3e-3,
                         mix_share=mix_share)  # fmt: skip
        with torch.no_grad():
            midpoint = vae.decode(latents.mean(0, keepdim=True)).sample
            losses[mix_share] = reconstruction_loss(midpoint, blend, no_weight).item()
    assert losses[1.0] < 0.85 * losses[0.0]  # measured: 0.22 against 0.29-0.33 over three seeds


def test_colour_dropout_trains_on_captions_without_the_colour(monkeypatch):
    # `--colour-dropout`: that share of the (not emptied) captions names no colour; at 0 the
    # full captions only.
    n = 8
    full = torch.arange(n)[:, None].repeat(1, 77)  # (n, 77): stand-ins, row i = caption i
    colourless = full + 100
    seen = []
    build = train_diffusion.build_text_encoder

    def spying_text_encoder():
        encoder = build()
        forward = encoder.forward
        encoder.forward = lambda ids, *a, **k: (seen.append(ids.clone()), forward(ids, *a, **k))[1]
        return encoder

    monkeypatch.setattr(train_diffusion, "build_text_encoder", spying_text_encoder)
    latents, empty = torch.randn(n, 4, 16, 16), torch.full((77,), 499)
    for share, expect_colourless in ((0.0, False), (0.5, True)):
        seen.clear()
        train_diffusion.train_denoiser(latents, full, empty, steps=3, batch=16, seed=0, log=lambda _: None,
                                       colourless_ids=colourless, colour_dropout=share)  # fmt: skip
        rows = torch.cat(seen)[:, 0]  # the first token of every caption the encoder saw
        assert (rows < 100).any()  # full captions in both
        assert bool(((rows >= 100) & (rows < 499)).any()) == expect_colourless


def test_vae_from_trains_the_denoiser_on_another_models_vae(tmp_path):
    # `--vae-from`: the denoiser alone is retrained, on the latents of a trained model's VAE,
    # which the new folder keeps as it was (scaling factor included); with colour dropout,
    # whose colourless captions come from the same rendered scenes.
    torch.manual_seed(0)
    source = tmp_path / "source"
    vae = build_vae()
    vae.register_to_config(scaling_factor=0.5)
    vae.to(torch.float16).save_pretrained(source / "vae")
    info = train_diffusion.train(tmp_path / "new", n_images=16, vae_steps=1000, vae_batch=8, unet_steps=2, batch=4,
                                 seed=0, log=lambda _: None, vae_from=source, colour_dropout=0.5)  # fmt: skip
    from diffusers import AutoencoderKL

    before = AutoencoderKL.from_pretrained(source / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / "new" / "vae").state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert info["scaling_factor"] == 0.5 and info["vae_from"] == str(source) and info["colour_dropout"] == 0.5
    assert (tmp_path / "new" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
