"""The performance benchmark runs end to end and measures what it claims (figures are in the README)."""

from __future__ import annotations

import json

import torch

from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.engine import GuidedDDIM, OptimConfig
from digin_cli.bench.perf import time_forward, time_optimization_step
from digin_cli.models.sd_parts import build_sd1_random, build_sdxl_random


def test_perf_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "perf"
    args = ["bench", "--perf", "--pipelines", "tiny", "--feature-pipelines", "tiny", "--perf-steps", "3",
            "--repeats", "1", "--batch-sizes", "1,2", "--few-step-pipeline", "tiny", "--device", "cpu", "--out", str(out),
            "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    result_json = json.loads((out / "perf.json").read_text())
    row = result_json["rows"][0]
    assert row["pipeline"] == "tiny" and row["ddim_steps"] == 3
    assert row["forward_sample_seconds"] > 0 and row["optimization_step_seconds"] > 0
    # An optimization step runs the chain forward, again in backward, and backward: never cheaper than a sample.
    assert row["step_over_forward"] > 1.0
    assert row["memory"]["at_T"]["steps"] == 3 and row["memory"]["at_4T"]["steps"] == 12
    assert set(row["throughput"]) == {"1", "2"}
    assert {"fused_attention", "decode_checkpointing", "bf16_autocast", "compile"} <= set(row["features"])
    compiled = row["features"]["compile"]
    assert "error" not in compiled, compiled
    # The break-even point is what the figures say: compiling time / time saved a step.
    if compiled["break_even_steps"] is not None:
        assert compiled["step_speedup"] > 1.0 and compiled["break_even_steps"] > 0
    else:
        assert compiled["step_speedup"] <= 1.0
    assert row["features"]["fused_attention"]["processor"] == "AttnProcessor2_0"
    assert "tiny" in result.output and "perf.json" in result.output
    few = result_json["few_steps"]
    assert few["pipeline"] == "tiny" and set(few["seconds_per_step"]) == {"1", "2", "4", "20"}
    seconds = few["seconds_per_step"]
    assert seconds["20"]["guided"] > seconds["1"]["guided"] and seconds["20"]["unguided"] > seconds["1"]["unguided"]
    assert few["four_unguided_over_twenty_guided"] == round(seconds["4"]["unguided"] / seconds["20"]["guided"], 4)
    assert "4 unguided / 20 guided" in result.output


def test_optimization_step_timer_counts_full_steps(tiny_components):
    engine = GuidedDDIM(tiny_components)
    times = time_optimization_step(engine, steps=3, batch=1, repeats=2, optim=OptimConfig(num_cutouts=2))
    forward = time_forward(engine, steps=3, batch=1, repeats=2)
    assert len(times) == 2
    # A step runs the chain forward, recomputes it in backward and backpropagates: more than a sample.
    assert min(times) > min(forward)


def test_sd1_sized_pipeline_has_sd1_shapes():
    components = build_sd1_random(64)
    assert sum(p.numel() for p in components.unet.parameters()) > 8e8  # SD 1.x's UNet: 860M
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size == 768
    assert components.vae_scale_factor == 8 and components.resolution == 64
    assert list(components.unet.config.block_out_channels) == [320, 640, 1280, 1280]


def test_sdxl_sized_pipeline_has_sdxl_shapes():
    from accelerate import init_empty_weights

    with init_empty_weights():  # 2.6B parameters: their shapes, not their memory
        components = build_sdxl_random(64)
    unet = components.unet
    assert 2.5e9 < sum(p.numel() for p in unet.parameters()) < 2.7e9  # SDXL's UNet: 2.57B
    assert unet.config.cross_attention_dim == 2048 == components.text_encoder.config.hidden_size + components.text_encoder_2.config.hidden_size
    assert unet.config.addition_embed_type == "text_time" and list(unet.config.transformer_layers_per_block) == [1, 2, 10]
    assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + 1280 == 6 * 256 + components.text_encoder_2.config.projection_dim
    assert components.is_sdxl and components.family == "sdxl" and components.resolution == 64


def test_cpu_plan_leaves_out_the_costliest_repeats(tmp_path):
    from digin_cli.bench.perf import PerfConfig, few_step_repeats, throughput_batches

    config = PerfConfig(out=tmp_path)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert throughput_batches("sdxl-random", config, cpu) == [1]
    assert throughput_batches("sdxl-random", config, cuda) == throughput_batches("sd1-random", config, cpu) == [1, 2]
    assert [few_step_repeats(t, config, cpu) for t in (1, 2, 4, 20)] == [3, 3, 3, 2]
    assert few_step_repeats(20, config, cuda) == 3
