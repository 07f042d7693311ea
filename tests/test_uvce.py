"""Real images in: loading, null-text inversion, prompt-to-prompt, masks and `digin uvce`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digin_cli.attention import AttentionControl, TokenSpan, attach, find_word_tokens, token_mapping
from digin_cli.cli import app
from run_records import read_record, read_run
from digin_cli.tasks.real_images import RealImageOptions, invert_cached, prepare_image
from digin_cli.tasks.uvce import swap_class
from digin_cli.engine import GuidedDDIM, SamplerConfig
from digin_cli.inversion import InversionConfig, null_text_inversion, null_text_inversions
from digin_cli.metrics import psnr
from digin_cli.io import ImageReadError, load_image, load_mask
from digin_cli.masks import attention_mask, sam_mask, sample_points, squash_attention

runner = CliRunner()
FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]


def scene_image(path, seed: int = 0, size: int = 64, mode: str = "RGB"):
    """A rendered shapes-world scene saved as a file (any mode)."""
    from digin_cli.world.scenes import render, sample_scene

    array, _ = render(sample_scene(np.random.default_rng(seed), shape="bar"), size=size)
    Image.fromarray(array).convert(mode).save(path)
    return path


# -- image loading -----------------------------------------------------------------


def test_load_image_crops_the_centre_of_the_short_side(tmp_path):
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, 20:60] = 255  # the centre square is white, the sides black
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 32)
    assert image.shape == (3, 32, 32)
    assert image.min() > 0.9


def test_load_image_converts_modes(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red: composited on white
    rgba.save(tmp_path / "rgba.png")
    assert torch.allclose(load_image(tmp_path / "rgba.png", 16), torch.ones(3, 16, 16))
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png", 16)
    assert torch.allclose(grey, torch.full((3, 16, 16), 128 / 255), atol=1 / 255)
    Image.new("RGB", (20, 20), (0, 0, 255)).convert("P").save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif", 16)[2].min() > 0.95
    sixteen = Image.fromarray(np.full((20, 20), 65535 // 2, np.uint16))
    sixteen.save(tmp_path / "deep.png")
    assert abs(float(load_image(tmp_path / "deep.png", 16).mean()) - 0.5) < 0.01


def test_load_image_applies_exif_orientation(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # white left half
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed: white ends up on top
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "rotated.jpg", 20)
    assert loaded[:, :5].mean() > 0.9 and loaded[:, -5:].mean() < 0.1


def test_load_image_reports_bad_files_by_name(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match="empty.png is empty"):
        load_image(tmp_path / "empty.png", 16)
    with pytest.raises(ImageReadError, match="text.jpg is not an image"):
        load_image(tmp_path / "text.jpg", 16)


def test_load_mask_is_cropped_like_the_image(tmp_path):
    array = np.zeros((40, 80), np.uint8)
    array[:, 40:] = 255
    Image.fromarray(array).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png", 32)
    assert mask.shape == (1, 1, 32, 32)
    assert mask[..., :14].max() < 0.05 and mask[..., 18:].min() > 0.95


# -- tokens and attention ----------------------------------------------------------


def test_word_tokens_and_mapping_align_multi_token_words(tiny_components):
    tokenizer = tiny_components.tokenizer
    source = find_word_tokens(tokenizer, "an image of a cat on grass", "cat")
    target = find_word_tokens(tokenizer, "an image of a golden retriever on grass", "golden retriever")
    assert source.length == 1 and target.length >= 2
    assert source.start == target.start == 5  # start token + "an image of a"
    mapping = token_mapping(source, target, 77)
    probs = torch.softmax(torch.randn(3, 7, 77), dim=-1)  # (heads, Q, L)
    remapped = probs @ mapping.T
    assert torch.allclose(remapped.sum(-1), torch.ones(3, 7), atol=1e-5), "attention mass is kept"
    for j in range(target.start, target.stop):  # every piece of the new word gets the old word's share
        assert torch.allclose(remapped[..., j], probs[..., source.start] / target.length)
    after = target.stop  # "on" follows the word in both captions
    assert torch.equal(remapped[..., after], probs[..., source.stop])
    assert torch.equal(remapped[..., :5], probs[..., :5])


def test_swap_class_replaces_the_class_words():
    assert swap_class("an image of a Tabby cat, indoors", "tabby cat", "golden retriever") == (
        "an image of a golden retriever, indoors"
    )


def test_injection_changes_the_start_and_restores_processors(tiny_components):
    engine = GuidedDDIM(tiny_components)
    unet = tiny_components.unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    sampler = SamplerConfig(num_steps=4, guidance_scale=3.0)
    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    source_emb = engine.encode_text(["an image of a circle"])
    target_emb = engine.encode_text(["an image of a star"])
    null = engine.encode_text([""])
    control = AttentionControl()
    control.record(store_steps=2, map_steps=2, map_tokens=TokenSpan(5, 6), map_side=16)
    with attach(engine, control):
        engine.sample(z_T, source_emb, null, sampler)
    assert len(control.stored) > 0 and control.attention_map().shape == (1, 16, 16)
    plain = engine.sample(z_T, target_emb, null, sampler)
    control.inject(2, token_mapping(TokenSpan(5, 6), TokenSpan(5, 6), 77))
    with attach(engine, control):
        injected = engine.sample(z_T, target_emb, null, sampler)
    assert engine.step_observer is None
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before, "processors restored"
    assert (injected - plain).abs().max() > 1e-3, "injected attention changes the start image"
    control.inject(0, None)  # nothing injected: identical to plain sampling
    with attach(engine, control):
        untouched = engine.sample(z_T, target_emb, null, sampler)
    assert torch.allclose(untouched, plain, atol=1e-5)


def test_each_batch_item_can_have_its_own_number_of_injected_steps(tiny_components):
    engine = GuidedDDIM(tiny_components)
    sampler = SamplerConfig(num_steps=4, guidance_scale=3.0)
    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    source, target = engine.encode_text(["an image of a circle"]), engine.encode_text(["an image of a star"])
    null = engine.encode_text([""])
    recorded = AttentionControl()
    recorded.record(store_steps=4, map_steps=0, map_tokens=None, map_side=16)
    with attach(engine, recorded):
        engine.sample(z_T[:1], source, null, sampler)
    mapping = token_mapping(TokenSpan(5, 6), TokenSpan(5, 6), 77)

    def sample_injecting(steps):
        with attach(engine, AttentionControl.for_batch([recorded, recorded], [mapping, mapping], steps)):
            return engine.sample(z_T, target.expand(2, -1, -1), null.expand(2, -1, -1), sampler)  # (2, 3, H, W)

    one_and_three = sample_injecting([1, 3])
    assert torch.allclose(one_and_three[0], sample_injecting(1)[0], atol=1e-5)
    assert torch.allclose(one_and_three[1], sample_injecting(3)[1], atol=1e-5)
    assert (one_and_three[0] - one_and_three[1]).abs().max() > 1e-3


# -- inversion -----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "shapes"])
def test_null_text_inversion_beats_ddim_inversion(model, tmp_path):
    from digin_cli.models import load_diffusion

    components = load_diffusion(model)
    engine = GuidedDDIM(components)
    image = load_image(scene_image(tmp_path / "scene.png"), components.resolution)[None]
    sampler = SamplerConfig(num_steps=10, guidance_scale=3.0)
    result = null_text_inversion(
        engine, image, engine.encode_text(["a photograph of a red bar on sand"]), engine.encode_text([""]),
        sampler, InversionConfig(inner_steps=5),  # lr: the model's digin.json default
    )  # fmt: skip
    assert result.null_embs.shape[0] == 10
    # The sampler's own target: z_0 back at E(x). The random tiny VAE cannot reconstruct
    # pixels at all, so the pixel PSNR is compared on the trained shapes model only.
    assert result.latent_mse_null_text < 0.75 * result.latent_mse_ddim, (result.latent_mse_ddim, result.latent_mse_null_text)
    if model == "shapes":
        assert result.psnr_null_text > result.psnr_ddim + 1.0, (result.psnr_ddim, result.psnr_null_text)
    # The stored inversion reproduces its PSNR when sampled again.
    again = engine.sample(result.z_T, engine.encode_text(["a photograph of a red bar on sand"]), result.null_embs, sampler)
    assert abs(psnr(again, image) - result.psnr_null_text) < 0.01


def test_images_inverted_together_are_inverted_as_alone(tmp_path):
    """A batch of inversions (folder runs invert a batch's images together) gives each image
    the inversion it gets alone: its own caption, its own null embeddings, its own early stop."""
    from digin_cli.models import load_diffusion

    components = load_diffusion("shapes")
    engine = GuidedDDIM(components)
    paths = [scene_image(tmp_path / f"{k}.png", seed=k) for k in range(3)]
    images = torch.cat([load_image(path, components.resolution)[None] for path in paths])  # (3, 3, H, W)
    captions = ["a photograph of a red bar on sand", "a photograph of a bar", "a photograph of a blue bar on snow"]
    # An early-stop threshold these images reach at some steps and not others (at the default
    # 1e-5 none stops within 6 iterations): they stop after different numbers of iterations.
    sampler, config = SamplerConfig(num_steps=6, guidance_scale=3.0), InversionConfig(inner_steps=6, early_stop=1e-2)
    null = engine.encode_text([""])
    iterations = []  # UNet calls with grad: the inner Adam iterations, their rows
    original = engine.predict_noise

    def counting(latents, timestep, embeddings):
        if torch.is_grad_enabled() and embeddings.requires_grad:
            iterations.append(latents.shape[0])
        return original(latents, timestep, embeddings)

    engine.predict_noise = counting
    together = null_text_inversions(engine, images, engine.encode_text(captions), null, sampler, config)
    calls_together = list(iterations)
    alone, calls_alone = [], []
    for k in range(3):
        iterations.clear()
        alone.append(null_text_inversion(engine, images[k : k + 1], engine.encode_text([captions[k]]), null, sampler, config))
        calls_alone.append(len(iterations))
    # Every image stays in the batch while any runs (picking rows out would wait on the device);
    # a DDIM step's loop ends when its last image stops.
    assert set(calls_together) == {3}
    assert max(calls_alone) <= len(calls_together) <= sum(calls_alone)
    assert 6 < len(calls_together) < 6 * 6, "some, not all, inner loops stopped early"
    assert len(set(calls_alone)) > 1, "the images stop after different numbers of iterations"
    for batched, single in zip(together, alone):
        assert torch.allclose(batched.image_latents, single.image_latents, atol=1e-5)
        assert torch.allclose(batched.z_T, single.z_T, atol=1e-4)
        # Adam takes near-full steps on elements whose gradient is all but zero, so the last
        # bits a batched convolution changes move a few elements by up to a step; the
        # embeddings agree as a whole and reconstruct the image alike.
        difference = (batched.null_embs - single.null_embs).abs()
        assert difference.mean() < 1e-3 * single.null_embs.abs().mean(), difference.mean()
        assert abs(batched.psnr_null_text - single.psnr_null_text) < 0.01  # measured: 1e-4 dB apart
        assert batched.latent_mse_null_text == pytest.approx(single.latent_mse_null_text, rel=1e-3)
    assert together[0].psnr_null_text != together[2].psnr_null_text


def test_without_guidance_the_inversion_is_plain_ddim_inversion(tiny_components, tmp_path):
    engine = GuidedDDIM(tiny_components)
    image = load_image(scene_image(tmp_path / "scene.png"), 64)[None]
    null = engine.encode_text([""])
    result = null_text_inversion(engine, image, engine.encode_text(["a red bar"]), null, SamplerConfig(4, guidance_scale=1.0))
    # No null embedding is optimized (the sampler never reads one), and the reconstruction is plain DDIM's.
    assert torch.equal(result.null_embs, null.expand(4, -1, -1, -1).cpu())
    assert result.psnr_null_text == result.psnr_ddim and result.latent_mse_null_text == result.latent_mse_ddim


def test_inversion_cache_hits_on_the_second_call(tiny_components, tmp_path, monkeypatch):
    monkeypatch.setenv("DIGIN_CACHE", str(tmp_path / "cache"))
    engine = GuidedDDIM(tiny_components)
    image = load_image(scene_image(tmp_path / "scene.png"), 64)[None]
    sampler = SamplerConfig(num_steps=3)
    config = InversionConfig(inner_steps=1)
    first, hit1 = invert_cached(engine, image, "an image of a bar", sampler, config)
    second, hit2 = invert_cached(engine, image, "an image of a bar", sampler, config)
    assert (hit1, hit2) == (False, True)
    assert torch.equal(first.z_T, second.z_T) and torch.equal(first.null_embs, second.null_embs)
    _, other_guidance = invert_cached(engine, image, "an image of a bar", SamplerConfig(3, 5.0), config)
    _, other_caption = invert_cached(engine, image, "an image of a star", sampler, config)
    assert not other_guidance and not other_caption, "guidance and caption are part of the key"


# -- masks -----------------------------------------------------------------------------


def test_attention_mask_follows_the_attention():
    attention = torch.zeros(1, 8, 8)
    attention[0, 1:4, 1:4] = 1.0  # the object sits top-left
    mask = attention_mask(attention, 64)
    assert mask.shape == (1, 1, 64, 64)
    assert mask[..., 8:24, 8:24].mean() > 0.5 > mask[..., 40:, 40:].max()
    points = sample_points(squash_attention(attention, 64)[0, 0], count=5)
    assert len({tuple(p) for p in points.tolist()}) == 5, "points are drawn without replacement"
    assert (points < 36).all()


def test_sam_mask_prompts_with_attention_points_and_softens():
    class RecordingPredictor:  # stands in for segment_anything_hq.SamPredictor: same calls
        def set_image(self, image):
            self.image = image

        def predict(self, point_coords, point_labels, multimask_output, hq_token_only):
            self.points, self.flags = point_coords, (multimask_output, hq_token_only)
            mask = np.zeros((1, 64, 64), bool)
            mask[0, 10:30, 10:30] = True
            return mask, np.ones(1), None

    attention = torch.zeros(1, 8, 8)
    attention[0, 1:4, 1:4] = 1.0
    predictor = RecordingPredictor()
    mask = sam_mask(predictor, np.zeros((64, 64, 3), np.uint8), attention)
    assert predictor.flags == (False, True) and len(predictor.points) == 5
    assert mask.shape == (1, 1, 64, 64) and mask[..., 20, 20] > 0.9 and mask[..., 60, 60] < 0.1
    assert 0 < mask[..., 33, 20] < 1, "edges are blurred"


def test_prepare_image_masks_from_attention_or_file(tiny_components, tiny_classifiers, tmp_path):
    engine = GuidedDDIM(tiny_components)
    path = scene_image(tmp_path / "scene.png")
    sampler = SamplerConfig(num_steps=3)
    options = RealImageOptions(inversion=InversionConfig(inner_steps=1))
    prepared = prepare_image(engine, path, tiny_classifiers[0], "bar", options, sampler)
    assert prepared.mask.source == "attention" and prepared.caption == "an image of a bar"
    assert prepared.mask.pixels.shape == (1, 1, 64, 64) and prepared.mask.latents.shape == (1, 1, 16, 16)
    # The mask is the class words' recorded attention, squashed and blurred, and its latent
    # version the area average of it.
    assert torch.allclose(prepared.mask.pixels, attention_mask(prepared.control.attention_map().cpu(), 64))
    assert torch.allclose(prepared.mask.latents, torch.nn.functional.adaptive_avg_pool2d(prepared.mask.pixels, 16))
    # The maps prompt-to-prompt injects: the first max(p2p fractions) of the steps (ceil(0.5 * 3) = 2).
    assert {step for step, _ in prepared.control.stored} == {0, 1}
    # neuron-cf swaps no words: the same mask, and nothing kept for injection.
    without = prepare_image(engine, path, tiny_classifiers[0], "bar", options, sampler, record_p2p=False)
    assert not without.control.stored and torch.allclose(without.mask.pixels, prepared.mask.pixels)
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    options.mask_file = tmp_path / "mask.png"
    prepared = prepare_image(engine, path, tiny_classifiers[0], "bar", options, sampler)
    assert prepared.mask.source == "file" and prepared.mask.pixels.min() > 0.99


# -- the command ---------------------------------------------------------------------------


def uvce(*extra, out):
    return ["uvce", *extra, "--model", "tiny", "--classifier", "tiny:f", "--out", str(out), *FAST]


SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def test_uvce_cli_writes_every_output(tmp_path):
    """A real photograph (451x300 JPEG-like PNG) through the whole command on the tiny models."""
    image = SAMPLES / "chelsea.png"
    out = tmp_path / "out"
    result = runner.invoke(app, uvce(str(image), "--target", "circle", "--target", "star", "--source-class", "bar", out=out))
    assert result.exit_code == 0, result.output
    _, lines = read_run(out)
    for target in ("circle", "star"):
        record = read_record(out, f"chelsea_{target}")
        assert record["classes"] == {"source": "bar", "target": target}
        assert record["target_caption"] == f"an image of a {target}"
        assert record["mask_source"] == "attention"
        # Null-text inversion minimizes the latent error that plain DDIM inversion leaves.
        assert record["inversion"]["latent_mse_null_text"] <= record["inversion"]["latent_mse_ddim"]
        for key in ("p_target", "p_source", "distance_latent", "distance_pixel"):
            assert key in record["before"] and key in record["after"]
        # Flipped is the classifier's top class being the target; p(target) > p(source) has its own name.
        assert record["flipped"] == (int(record["after"]["top_class"]) == record["target_index"])
        # (Records keep 6 decimals: two probabilities under 5e-7 both read 0.0.)
        p_target, p_source = record["after"]["p_target"], record["after"]["p_source"]
        if p_target != p_source:
            assert record["target_above_source"] == (p_target > p_source)
        for name in record["files"].values():
            with Image.open(out / name) as png:
                assert png.mode == "RGB"
    assert [line["classes"]["target"] for line in lines] == ["circle", "star"]
    assert not list(out.glob(".*part"))


def test_uvce_starts_from_the_p2p_fraction_whose_start_has_the_lowest_loss(tmp_path):
    image = scene_image(tmp_path / "scene.png")
    fractions = ["--p2p-fraction", "0.25", "--p2p-fraction", "0.5", "--p2p-fraction", "1.0"]  # of 4 DDIM steps
    result = runner.invoke(app, uvce(str(image), "--target", "circle", "--source-class", "bar", *fractions, out=tmp_path / "o"))
    assert result.exit_code == 0, result.output
    p2p = read_record(tmp_path / "o", "scene_circle")["p2p"]
    losses = {int(steps): loss for steps, loss in p2p["start_loss_by_inject_steps"].items()}
    assert sorted(losses) == [1, 2, 4] and len(set(losses.values())) == 3  # three different starts
    assert p2p["inject_steps"] == min(losses, key=losses.get) and p2p["fraction"] == p2p["inject_steps"] / 4
    # The search scores each start by the guarded loss, on the augmented views the optimization
    # then draws (engine start_views_loss, tested in test_guards.py), not by the plain image:
    # the record's plain start loss is another figure.
    record = read_record(tmp_path / "o", "scene_circle")
    assert record["start"]["loss"] != pytest.approx(losses[p2p["inject_steps"]], rel=1e-4, abs=1e-5)
    assert record["start"] == {k: v for k, v in record["history"][0].items() if k != "step"}
    # One fraction: nothing to search, that one is used.
    result = runner.invoke(app, uvce(str(image), "--target", "circle", "--source-class", "bar", "--p2p-fraction", "0.5",
                                     out=tmp_path / "one"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_record(tmp_path / "one", "scene_circle")["p2p"] == {
        "inject_steps": 2, "fraction": 0.5, "start_loss_by_inject_steps": {"2": None}}


def test_uvce_folder_survives_a_bad_file_and_resumes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    scene_image(folder / "a.png", seed=1)
    scene_image(folder / "b.png", seed=2)
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    args = uvce(str(folder), "--target", "circle", "--source-class", "bar", out=out)
    first = runner.invoke(app, args)
    assert first.exit_code == 1
    assert first.output.count("Error:") == 1 and "broken.jpg" in first.output and "Traceback" not in first.output
    assert (out / "a_circle.json").is_file() and (out / "b_circle.json").is_file()
    # Simulate an interruption during b: its record and a PNG are gone, a is complete.
    (out / "b_circle.json").unlink()
    (out / "b_circle_counterfactual.png").unlink()
    a_mtime = os.stat(out / "a_circle_counterfactual.png").st_mtime_ns
    (folder / "broken.jpg").unlink()
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert os.stat(out / "a_circle_counterfactual.png").st_mtime_ns == a_mtime, "finished items are skipped"
    assert (out / "b_circle.json").is_file() and (out / "b_circle_counterfactual.png").is_file()
    _, lines = read_run(out)
    # Both items with their figures: a's from the first run, b's from the second.
    assert {line["input"]["file"].rsplit("/", 1)[-1]: line["status"] for line in lines} == {"a.png": "ok", "b.png": "ok"}
    assert all("p_target" in line["after"] for line in lines)


def test_uvce_bad_input_is_one_line(tmp_path):
    image = scene_image(tmp_path / "scene.png")
    cases = [
        (uvce(str(tmp_path / "missing.png"), "--target", "circle", out=tmp_path / "o1"), "does not exist"),
        (uvce(str(image), "--target", "circel", out=tmp_path / "o2"), "circel"),
        (uvce(str(image), out=tmp_path / "o3"), "--target"),
        (uvce(str(image), "--target", "circle", "--caption", "a photo", "--source-class", "bar", out=tmp_path / "o4"), "caption"),
        (uvce(str(image), "--target", "circle", "--p2p-fraction", "1.5", out=tmp_path / "o5"), "p2p"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.count("Error:") == 1 and expected in result.output and "Traceback" not in result.output


def test_sam_hq_loader_and_predictor_on_a_local_checkpoint(tmp_path):
    """The real loader and SamPredictor, on a randomly initialised vit_tiny saved locally."""
    pytest.importorskip("segment_anything_hq")
    from digin_cli.errors import DiginError
    from digin_cli.models.segmenter import _import_sam_hq, load_sam_hq

    torch.manual_seed(0)
    model = _import_sam_hq().sam_model_registry["vit_tiny"](checkpoint=None)
    torch.save(model.state_dict(), tmp_path / "sam_hq_vit_tiny.pth")
    predictor = load_sam_hq(tmp_path / "sam_hq_vit_tiny.pth")
    attention = torch.zeros(1, 8, 8)
    attention[0, 1:4, 1:4] = 1.0
    mask = sam_mask(predictor, np.full((64, 64, 3), 127, np.uint8), attention)
    assert mask.shape == (1, 1, 64, 64) and 0.0 <= float(mask.min()) <= float(mask.max()) <= 1.0
    with pytest.raises(DiginError, match="does not fit SAM-HQ vit_b"):
        load_sam_hq(tmp_path / "sam_hq_vit_tiny.pth", model_type="vit_b")
    with pytest.raises(DiginError, match="cannot tell the SAM-HQ architecture"):
        (tmp_path / "weights.pth").write_bytes(b"x")
        load_sam_hq(tmp_path / "weights.pth")


def tiny_blip_folder(folder):
    """A randomly initialised BLIP captioner with a 14-word vocabulary, saved like a hub model."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "an", "image", "of", "a", "bar", "on", "grass", "red", "."]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    # transformers 5 ignores vocab_file= in the constructor: load the folder instead.
    tokenizer = BertTokenizerFast.from_pretrained(folder, model_max_length=32)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, bos_token_id=2, sep_token_id=3, pad_token_id=0),
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captioner_extends_the_default_caption(tiny_components, tiny_classifiers, tmp_path):
    from digin_cli.errors import DiginError
    from digin_cli.models.captioner import load_captioner

    captioner = load_captioner(str(tiny_blip_folder(tmp_path / "blip")))
    engine = GuidedDDIM(tiny_components)
    options = RealImageOptions(inversion=InversionConfig(inner_steps=1))
    prepared = prepare_image(engine, scene_image(tmp_path / "s.png"), tiny_classifiers[0], "bar", options,
                             SamplerConfig(num_steps=3), captioner=captioner)  # fmt: skip
    assert prepared.caption.startswith("an image of a bar")  # the class words stay for prompt-to-prompt
    assert "." not in prepared.caption
    assert len(prepared.caption) > len("an image of a bar"), "the model's continuation was added"
    words = captioner.processor.tokenizer("an image of a bar").input_ids
    assert captioner.processor.tokenizer.unk_token_id not in words, "the tokenizer kept its vocabulary"
    assert captioner.extend(torch.zeros(3, 64, 64), "an image of a bar").startswith("an image of a bar")
    with pytest.raises(DiginError, match="could not load the captioner"):
        load_captioner(str(tmp_path / "missing"))
