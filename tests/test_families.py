"""Model families: recognition and defaults, SDXL exact against StableDiffusionXLPipeline,
optimization and real images on SDXL, DDIM inversion on every spacing, LoRA, weight
variants and hub revisions. Every model is built from configs (nothing downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, initial_latents
from digin_cli.engine.conditioning import unet_conditions
from digin_cli.errors import DiginError
from digin_cli.families import FAMILIES, UnsupportedFamily, recognise
from digin_cli.inversion import ddim_inversion, encode_image
from digin_cli.models import load_diffusion
from digin_cli.models.sd_parts import tiny_sdxl_pipeline
from digin_cli.objectives import ObjectiveOutput
from run_records import read_run

runner = CliRunner()
FAST = ["--ddim-steps", "4", "--steps", "2", "--loss-steps", "2", "--cutouts", "2", "--device", "cpu", "--quiet"]
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture()
def sdxl(sdxl_folder):
    return load_diffusion(str(sdxl_folder))


# -- recognition and defaults ----------------------------------------------------------------


def _reader(files: dict):
    return lambda name: files.get(name)


SD1 = {
    "model_index.json": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
    "unet/config.json": {"cross_attention_dim": 768, "in_channels": 4},
    "vae/config.json": {"latent_channels": 4},
    "scheduler/scheduler_config.json": {"prediction_type": "epsilon"},
}


def _with(files: dict, name: str, **changes) -> dict:
    return {**files, name: {**files.get(name, {}), **changes}}


def test_families_are_recognised_from_their_config_files():
    sd2 = _with(SD1, "unet/config.json", cross_attention_dim=1024)
    sdxl = _with(_with(SD1, "unet/config.json", cross_attention_dim=2048, addition_embed_type="text_time"),
                 "model_index.json", _class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "x"])  # fmt: skip
    cases = [
        ("CompVis/stable-diffusion-v1-4", SD1, "sd1"),
        ("stabilityai/stable-diffusion-2-1-base", sd2, "sd2"),
        ("stabilityai/stable-diffusion-2-1", _with(sd2, "scheduler/scheduler_config.json", prediction_type="v_prediction"), "sd2-v"),
        ("stabilityai/sd-turbo", sd2, "sd-turbo"),
        ("stabilityai/stable-diffusion-xl-base-1.0", sdxl, "sdxl"),
        ("/models/sdxl-turbo/", sdxl, "sdxl-turbo"),
        ("my-model", _with(SD1, "unet/config.json", cross_attention_dim=64), "sd"),
        ("my-model", {**SD1, "digin.json": {"family": "sd-turbo"}}, "sd-turbo"),
    ]
    for name, files, family in cases:
        assert recognise(name, _reader(files)).name == family, name
    assert FAMILIES["sdxl"].dual_text_encoder and FAMILIES["sdxl-turbo"].dual_text_encoder
    turbo = FAMILIES["sd-turbo"]
    assert (turbo.ddim_steps, turbo.guidance, turbo.spacing, turbo.resolution) == (4, 0.0, "trailing", 512)
    refused = [
        (_with(SD1, "model_index.json", _class_name="StableDiffusion3Pipeline"), "Stable Diffusion 3"),
        ({"model_index.json": {"_class_name": "SanaPipeline", "transformer": ["diffusers", "x"]}}, "transformer pipeline (SanaPipeline)"),
        (_with(SD1, "unet/config.json", in_channels=9), "9-channel UNet for 4-channel latents"),
        (_with(SD1, "unet/config.json", cross_attention_dim=None), "unconditional"),
        ({**SD1, "digin.json": {"family": "sd9"}}, "family 'sd9'"),
    ]
    for files, what in refused:
        with pytest.raises(UnsupportedFamily, match=what.replace("(", r"\(").replace(")", r"\)")):
            recognise("m", _reader(files))


def test_models_family_lists_the_defaults_table():
    result = runner.invoke(app, ["models", "--family"])
    assert result.exit_code == 0, result.output
    for name in FAMILIES:
        assert name in result.stdout
    assert "trailing" in result.stdout and "stabilityai/sdxl-turbo" in result.stdout


def test_a_turbo_model_runs_with_its_family_defaults_and_one_unet_call_a_step(tiny_folder, tmp_path):
    folder = tmp_path / "tiny-turbo"  # the name makes it a Turbo model of the tiny architecture
    shutil.copytree(tiny_folder, folder)
    (folder / "digin.json").unlink(missing_ok=True)
    settings = {"family": "sd-turbo"}  # the tiny UNet is 768-less: its family comes from digin.json
    (folder / "digin.json").write_text(json.dumps(settings))
    out = tmp_path / "out"
    calls = []
    from diffusers import UNet2DConditionModel

    hook = UNet2DConditionModel.forward
    try:
        UNet2DConditionModel.forward = lambda self, sample, *a, **k: calls.append(sample.shape[0]) or hook(self, sample, *a, **k)
        result = runner.invoke(app, ["disagree", "--model", str(folder), "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                     "--resolution", "64", "--steps", "1", "--cutouts", "1", "--device", "cpu", "--quiet",
                                     "--out", str(out)])  # fmt: skip
    finally:
        UNet2DConditionModel.forward = hook
    assert result.exit_code == 0, result.output
    header, _ = read_run(out)
    config = header["config"]
    assert config["family"]["name"] == "sd-turbo"
    assert config["sampler"] == {"num_steps": 4, "guidance_scale": 0.0, "timestep_spacing": "trailing", "resolution": 64}
    assert config["optim"]["loss_steps"] == 3
    # Iterate 0 and 1 (4 calls each), and one backward-recomputed pass: never the batched pair.
    assert calls and set(calls) == {1}


def test_the_sampler_options_override_the_family_and_are_checked(tmp_path):
    base = ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle", "--out", str(tmp_path / "o")]
    for extra, message in [
        (["--spacing", "sideways"], "--spacing must be one of leading, trailing, linspace, got 'sideways'"),
        (["--resolution", "4"], "--resolution must be at least 8 pixels, got 4"),
        (["--resolution", "68"], "--resolution 68: this model samples multiples of 8 pixels"),
        (["--lora", "missing.safetensors"], "--lora missing.safetensors: no such file; give an existing .safetensors file, a folder or a hub id"),
    ]:
        result = runner.invoke(app, [*base, *extra, *FAST])
        assert result.exit_code == 1 and result.stderr.strip() == f"Error: {message}", (extra, result.output)


# -- SDXL, exact against diffusers ------------------------------------------------------------


@pytest.mark.parametrize("guidance", [3.0, 0.0])
def test_sdxl_sampler_matches_stable_diffusion_xl_pipeline(sdxl, guidance):
    engine = GuidedDDIM(sdxl)
    prompts = ["a photograph of a circle", "a photograph of a star"]
    z_T = initial_latents(sdxl, [0, 1])  # (2, 4, 16, 16)
    seen = []  # what the UNet is given: (batch, pooled text embedding, time ids) per call
    hook = sdxl.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0].shape[0], kwargs["added_cond_kwargs"]["text_embeds"].clone(),
                                              kwargs["added_cond_kwargs"]["time_ids"].clone())), with_kwargs=True)  # fmt: skip
    try:
        ours = engine.sample(z_T, engine.encode_text(prompts), engine.null_embedding(2), SamplerConfig(5, guidance))
        ours_seen = list(seen)
        seen.clear()
        reference = sdxl.as_pipeline()(prompts, num_inference_steps=5, guidance_scale=guidance, latents=z_T.clone(),
                                       height=64, width=64, output_type="pt").images  # fmt: skip
    finally:
        hook.remove()
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    assert (ours - reference).abs().max().item() < 1e-4
    # The added conditions are the pipeline's: the pooled embeddings (zeros for the empty
    # prompt) and the time ids (64, 64, 0, 0, 64, 64), one UNet call a step, batched under guidance.
    assert len(ours_seen) == len(seen) == 5
    for (batch, pooled, time_ids), (ref_batch, ref_pooled, ref_time_ids) in zip(ours_seen, seen):
        assert batch == ref_batch == (4 if guidance > 1 else 2)
        assert torch.allclose(pooled, ref_pooled, atol=1e-6) and torch.equal(time_ids, ref_time_ids.to(time_ids))
    assert seen[0][2][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
    if guidance > 1:
        assert seen[0][1][:2].abs().max() == 0 and seen[0][1][2:].abs().max() > 0


def test_sdxl_pooled_embedding_and_time_ids_reach_the_unet(sdxl):
    engine = GuidedDDIM(sdxl)
    condition = engine.encode_text(["a photograph of a circle"])  # (1, 77 + 1, 64)
    assert condition.shape == (1, 78, 64)
    states, added = unet_conditions(sdxl, condition)
    assert states.shape == (1, 77, 64) and added["text_embeds"].shape == (1, 32)
    assert condition[0, 77, 32:].abs().max() == 0  # the padding of the pooled row
    z = torch.randn(1, 4, 16, 16)
    plain = engine.predict_noise(z, 500, condition)
    other_pooled = condition.clone()
    other_pooled[0, 77, :32] += 1.0
    assert (engine.predict_noise(z, 500, other_pooled) - plain).abs().max() > 1e-4
    assert (engine.predict_noise(z, 500, condition.clone()) - plain).abs().max() == 0


class _Brightness:
    """Make the image brighter: a loss whose gradient reaches every variable."""

    def __call__(self, inputs):
        views = inputs.views  # (B, V, 3, H, W)
        loss = -views.mean(dim=(1, 2, 3, 4))
        return ObjectiveOutput(loss=loss, metrics={"brightness": -loss.detach()})


def test_sdxl_optimization_moves_every_variable_and_no_weight(sdxl):
    engine = GuidedDDIM(sdxl)
    weights = {name: p.detach().clone() for module in (sdxl.unet, sdxl.text_encoder_2) for name, p in module.named_parameters()}
    steps = []
    from digin_cli.engine import loop

    original_update = loop.Variables.update

    def record(self):
        original_update(self)
        steps.append({name: t.detach().clone() for name, t in (("latent", self.latent), ("prompt", self.prompt_delta),
                                                              ("null", self.null_delta))})  # fmt: skip

    loop.Variables.update = record
    try:
        result = engine.optimize(_Brightness(), initial_latents(sdxl, [0]), engine.encode_text(["a circle"]), engine.null_embedding(),
                                 SamplerConfig(3, 3.0), OptimConfig(steps=2, loss_steps=2, num_cutouts=1))  # fmt: skip
    finally:
        loop.Variables.update = original_update
    assert len(result.history) == 3
    last = steps[-1]
    prompt_delta, null_delta = last["prompt"], last["null"]  # (T, B, 78, 64)
    assert prompt_delta[:, :, :77].abs().max() > 0, "token-embedding delta moved"
    assert prompt_delta[:, :, 77, :32].abs().max() > 0, "pooled-embedding delta moved"
    assert prompt_delta[:, :, 77, 32:].abs().max() == 0, "the padding never moves"
    assert null_delta.abs().max() > 0
    assert not torch.equal(steps[-1]["latent"], initial_latents(sdxl, [0]))
    for module in (sdxl.unet, sdxl.text_encoder_2):
        for name, p in module.named_parameters():
            assert torch.equal(p, weights[name]), name


def test_uvce_runs_on_sdxl(sdxl_folder, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["uvce", str(SAMPLES / "coffee.png"), "--target", "circle", "--source-class", "bar",
                                 "--model", str(sdxl_folder), "--classifier", "tiny:f", "--out", str(out), *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    header, lines = read_run(out)
    assert header["config"]["family"]["name"] == "sdxl"
    record = json.loads((out / "coffee_circle.json").read_text())
    assert record["mask_source"] == "attention"
    assert record["inversion"]["latent_mse_null_text"] <= record["inversion"]["latent_mse_ddim"]


# -- DDIM inversion on every spacing -----------------------------------------------------------


def test_ddim_inversion_equals_diffusers_where_it_is_right_and_runs_on_linspace(tiny_components):
    engine = GuidedDDIM(tiny_components)
    image = torch.rand(1, 3, 64, 64)
    latents = encode_image(engine, image)
    prompt = engine.encode_text(["an image of a bar"])
    ours = ddim_inversion(engine, latents, prompt, 5)  # leading spacing, 1000 // 5 exact
    inverse = DDIMInverseScheduler.from_config(tiny_components.scheduler.config)
    inverse.set_timesteps(5)
    reference = [latents]
    for t in inverse.timesteps:
        reference.append(inverse.step(engine.predict_noise(reference[-1], int(t), prompt), int(t), reference[-1]).prev_sample)
    assert len(ours) == len(reference) == 6
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) < 1e-5
    for spacing in ("linspace", "trailing"):
        engine.components.scheduler = DDIMScheduler.from_config(tiny_components.scheduler.config, timestep_spacing=spacing)
        with pytest.raises(ValueError) if spacing == "linspace" else _nothing():
            DDIMInverseScheduler.from_config(engine.components.scheduler.config).set_timesteps(7)  # diffusers' limits
        trajectory = ddim_inversion(engine, latents, prompt, 7)
        assert len(trajectory) == 8 and all(torch.isfinite(z).all() for z in trajectory)
        # Each inverse step undoes its forward step exactly (same alphas, the schedule's own
        # previous timestep): with a model output that depends on the timestep alone, sampling
        # the inverted z_T back gives the latents again.
        noise = {t: torch.randn(latents.shape, generator=torch.Generator().manual_seed(t)) for t in engine.timesteps(7)}
        engine.predict_noise = lambda z, t, emb: noise[int(t)]
        z = ddim_inversion(engine, latents, prompt, 7)[-1]
        for i, t in enumerate(engine.timesteps(7)):
            z, _ = engine.ddim_step(noise[t], i, z)
        assert (z - latents).abs().max() < 1e-4, spacing
        del engine.predict_noise


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- loading: LoRA, variants, revisions --------------------------------------------------------


def _lora_file(tiny_folder: Path, folder: Path) -> tuple[Path, object]:
    """LoRA weights for the tiny UNet's attention, random (so that they change the output), saved as
    diffusers' training scripts save them; returns the file and the UNet with the adapter live."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # peft starts B at zero: a LoRA that changes nothing
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder / "pytorch_lora_weights.safetensors", unet


def _sample(components, steps: int = 4) -> torch.Tensor:
    engine = GuidedDDIM(components)
    return engine.sample(initial_latents(components, [0]), engine.encode_text(["a circle"]), engine.null_embedding(), SamplerConfig(steps))


def test_a_lora_is_fused_at_its_scale(tiny_folder, tmp_path):
    lora, live_unet = _lora_file(tiny_folder, tmp_path / "lora")
    plain = _sample(load_diffusion(str(tiny_folder)))
    fused = load_diffusion(str(tiny_folder), loras=(str(lora),))
    with_lora = _sample(fused)
    assert (with_lora - plain).abs().max() > 1e-2, "the LoRA changes the output"
    reference = load_diffusion(str(tiny_folder))
    reference.unet = live_unet.eval()
    assert (with_lora - _sample(reference)).abs().max() < 1e-4, "fused = the adapter applied live"
    assert (_sample(load_diffusion(str(tiny_folder), loras=(f"{lora}:0",))) - plain).abs().max() < 1e-5
    assert "+lora:" in fused.identity and fused.identity != reference.identity
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())  # fused in, no adapter layers left
    with pytest.raises(DiginError, match="could not load LoRA weights"):
        (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
        load_diffusion(str(tiny_folder), loras=(str(tmp_path / "bad.safetensors"),))


def test_lora_on_the_command_line_is_recorded(tiny_folder, tmp_path):
    lora, _ = _lora_file(tiny_folder, tmp_path / "lora")
    out = tmp_path / "out"
    result = runner.invoke(app, ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                 "--lora", f"{lora}:0.5", "--out", str(out), *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    header, _ = read_run(out)
    assert header["config"]["loras"] == [f"{lora}:0.5"] and f"+lora:{lora}:0.5" in header["config"]["model_identity"]


def test_a_lora_scale_that_is_not_a_number_is_named_as_such(tiny_folder, tmp_path):
    # tiny_folder: the built-in model is made before the run, whose stderr is then the error alone.
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    out = tmp_path / "out"
    result = runner.invoke(app, ["disagree", "--model", "tiny", "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                 "--lora", f"{lora}:abc", "--out", str(out), *FAST])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"Error: --lora {lora}:abc: the scale 'abc' is not a number; "
                                     "give PATH_OR_ID[:SCALE], e.g. my_lora.safetensors:0.8")  # fmt: skip
    assert not out.exists()


def test_a_lora_colon_is_a_scale_unless_the_path_has_it(tmp_path):
    from digin_cli.models.diffusion import parse_lora

    assert parse_lora("org/style") == ("org/style", 1.0)
    assert parse_lora("org/style:0.8") == ("org/style", 0.8)
    assert parse_lora("C:\\loras\\style") == ("C:\\loras\\style", 1.0)  # a Windows drive, no scale
    assert parse_lora("C:\\loras\\style:0.5") == ("C:\\loras\\style", 0.5)
    named = tmp_path / "style:v2"  # a folder whose name has a colon
    named.mkdir()
    assert parse_lora(str(named)) == (str(named), 1.0)
    for spec, scale in (("org/style:abc", "abc"), (f"{named}:strong", "strong"), (f"{tmp_path}:", "")):
        with pytest.raises(DiginError, match=f"the scale '{scale}' is not a number"):
            parse_lora(spec)


def test_a_weight_variant_loads_with_variant_only(tiny_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "variant"
    StableDiffusionPipeline.from_pretrained(tiny_folder).save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(DiginError, match="could not load the diffusion model"):
        load_diffusion(str(folder))
    components = load_diffusion(str(folder), variant="fp16")
    assert (_sample(components) - _sample(load_diffusion(str(tiny_folder)))).abs().max() < 1e-6


def test_a_hub_revision_is_read_from_the_cache(tiny_folder, tmp_path):
    """A hub cache with two snapshots: main's lacks the UNet, the other has it; only
    --revision of the other runs, offline, and the record names that snapshot."""
    cache = tmp_path / "hub"
    repo = cache / "models--digin-test--tiny"
    good, broken = "a" * 40, "b" * 40
    shutil.copytree(tiny_folder, repo / "snapshots" / good)
    shutil.copytree(tiny_folder, repo / "snapshots" / broken, ignore=shutil.ignore_patterns("unet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(broken)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "digin_cli", "disagree", "--model", "digin-test/tiny", "-f", "tiny:f", "-g", "tiny:g",
            "--class", "circle", *FAST]  # fmt: skip
    done = subprocess.run([*base, "--revision", good, "--out", str(tmp_path / "good")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    header, _ = read_run(tmp_path / "good")
    assert header["config"]["revision"] == good and f"snapshots/{good}@" in header["config"]["model_identity"]
    failed = subprocess.run([*base, "--out", str(tmp_path / "main")], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.startswith("Error: could not load the diffusion model 'digin-test/tiny'")


# -- single-file checkpoints ---------------------------------------------------------------------


def test_the_ldm_writer_inverts_diffusers_conversion(tiny_components):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ldm_checkpoint import pipeline_to_ldm

    ldm = pipeline_to_ldm(tiny_components.as_pipeline())
    for converted, module in ((convert_ldm_unet_checkpoint(ldm, dict(tiny_components.unet.config)), tiny_components.unet),
                              (convert_ldm_vae_checkpoint(ldm, dict(tiny_components.vae.config)), tiny_components.vae)):  # fmt: skip
        reference = module.state_dict()
        assert set(converted) == set(reference)
        assert all(torch.equal(converted[k].reshape(reference[k].shape), reference[k]) for k in reference)


def _single_file(tiny_folder: Path, folder: Path, name: str = "tiny-finetune") -> Path:
    from safetensors.torch import save_file

    from ldm_checkpoint import pipeline_to_ldm

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(load_diffusion(str(tiny_folder)).as_pipeline()).items()}, path)
    shutil.copytree(tiny_folder, folder / name)  # the component configs, beside the file, as the loader looks for them
    return path


def test_a_single_file_checkpoint_loads_through_from_single_file(tiny_folder, tmp_path):
    path = _single_file(tiny_folder, tmp_path / "models")
    components = load_diffusion(str(path))
    assert components.family == "sd1" and components.identity.startswith(f"{path.resolve()}@")
    assert components.settings == json.loads((tiny_folder / "digin.json").read_text())
    assert (_sample(components) - _sample(load_diffusion(str(tiny_folder)))).abs().max() < 1e-5
    out = tmp_path / "out"
    result = runner.invoke(app, ["disagree", "--model", str(path), "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                 "--out", str(out), *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_run(out)[0]["config"]["family"]["name"] == "sd1"
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    for model, message in ((tmp_path / "broken.safetensors", "not a readable checkpoint"), (tmp_path / "gone.ckpt", "no such file")):
        result = runner.invoke(app, ["disagree", "--model", str(model), "-f", "tiny:f", "-g", "tiny:g", "--class", "circle",
                                     "--out", str(tmp_path / "bad"), *FAST])  # fmt: skip
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.output
        assert not (tmp_path / "bad").exists()
