"""Performance benchmark: what one optimization step costs, and what grows with what.

Each pipeline's rows (and the few-step row) are measured in a process of their own, after
a warm-up, as medians of repeats (ratios are taken within the run, so they mean the same
on any machine). Own processes, because a pipeline's freed memory does not go back to
the system at once: in one process an SDXL-sized pipeline (11 GB) left the next one
checkpointed (less free memory) and the few-step row killed for memory on a 24 GB machine.

- the wall time of a plain forward sample (no gradients) and of one optimization step
  (forward through the whole DDIM chain, loss on the last x0-predictions, backward with
  recomputation, Adam update), and their ratio; the floor is about 3x (forward +
  recomputation + input-gradient backward);
- peak memory of one optimization step at T and at 4T DDIM steps, each in a fresh
  process (RSS on CPU, torch.cuda.max_memory_allocated on CUDA), above the loaded models;
- optimization throughput (images per second) at batch sizes 1, 2, 4;
- the speed features, each against its absence: PyTorch's fused attention processors
  (diffusers' default) vs the classic processor, checkpointing of the VAE decode inside
  the loss, bf16 autocast of the UNet, and torch.compile of the UNet (with the time its
  first calls take to compile, and after how many steps that is paid back).

- the few-step row: seconds per optimization step at 1, 2, 4 and 20 DDIM steps, with and
  without guidance, on one architecture and resolution: what a few-step (Turbo) model buys.

Pipelines: the built-in shapes model, and randomly initialised pipelines with Stable
Diffusion 1.x's architecture (UNet 860M parameters, SD VAE, 12-layer CLIP text encoder)
and SDXL's (UNet 2.6B parameters, two text encoders of SDXL's widths, pooled embedding
and time ids), built from configs with no download, at a reduced resolution on CPU.

The objective is the mean of the cutout views: the chain, not a classifier, is
measured (a classifier adds the same cost to every step).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from digin_cli.components import DiffusionComponents
from digin_cli.engine import GuidedDDIM, OptimConfig, SamplerConfig, initial_latents
from digin_cli.errors import DiginError
from digin_cli.io import write_json
from digin_cli.models.sd_parts import build_sd1_random, build_sdxl_random
from digin_cli.objectives import ObjectiveInput, ObjectiveOutput
from digin_cli.tasks.runtime import resolve_device

SD1_RANDOM = "sd1-random"
SDXL_RANDOM = "sdxl-random"
RANDOM_PIPELINES = {SD1_RANDOM: build_sd1_random, SDXL_RANDOM: build_sdxl_random}
PIPELINES = ("shapes", SD1_RANDOM, SDXL_RANDOM)
FEW_STEPS = (1, 2, 4, 20)  # DDIM steps of the few-step row


@dataclass
class PerfConfig:
    out: Path
    device: str = "auto"
    pipelines: list[str] = field(default_factory=lambda: list(PIPELINES))
    sd_resolution: int | None = None  # image side of the SD-sized pipeline; None: 512 on CUDA, 128 elsewhere
    ddim_steps: int | None = None  # T; None: 20 on CUDA, on CPU 20 for shapes and 5 for the SD-sized pipeline
    repeats: int = 3
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2])  # on a CPU, SDXL-sized: batch 1 alone (below)
    memory_factor: int = 4  # memory is measured at T and at memory_factor * T steps
    feature_pipelines: list[str] = field(default_factory=lambda: ["shapes"])  # speed features vs their absence
    few_step_pipeline: str | None = SD1_RANDOM  # the few-step row's pipeline; None: no row
    few_step_resolution: int | None = None  # its image side; None: 512 on CUDA, 64 elsewhere

    def check(self) -> None:
        """One-line errors for impossible settings, before anything is measured."""
        if not self.pipelines:
            raise DiginError("--pipelines is empty; give shapes, sd1-random, sdxl-random or a model")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DiginError("--batch-sizes needs at least one size, each 1 or more")
        if self.repeats < 1:
            raise DiginError("--repeats must be at least 1")
        if self.sd_resolution is not None and (self.sd_resolution < 64 or self.sd_resolution % 64):
            raise DiginError(f"--perf-resolution must be a multiple of 64, got {self.sd_resolution}")
        if self.few_step_resolution is not None and (self.few_step_resolution < 64 or self.few_step_resolution % 64):
            raise DiginError(f"--few-step-resolution must be a multiple of 64, got {self.few_step_resolution}")
        if self.ddim_steps is not None and self.ddim_steps < 3:
            raise DiginError("--perf-steps must be at least 3 (the loss reads the last 3 steps)")


def brightness(inputs: ObjectiveInput) -> ObjectiveOutput:
    """A cheap differentiable objective: the mean of each item's views, (B,)."""
    return ObjectiveOutput(loss=inputs.views.float().mean(dim=(1, 2, 3, 4)))


def load_components(name: str, resolution: int) -> DiffusionComponents:
    if name in RANDOM_PIPELINES:
        return RANDOM_PIPELINES[name](resolution)
    from digin_cli.models import load_diffusion

    return load_diffusion(name)


def default_steps(name: str, device: torch.device) -> int:
    # On a CPU an SD-sized UNet call takes seconds: 5 steps keep a repeat under a minute.
    return 5 if name in RANDOM_PIPELINES and device.type != "cuda" else 20


def throughput_batches(name: str, config: PerfConfig, device: torch.device) -> list[int]:
    """The batch sizes timed for throughput. On a CPU the SDXL-sized pipeline times batch 1
    alone: a batch-2 step costs a minute a repeat (measured once: 0.035 images/s at batch
    2 vs 0.027 at 1, in 228 s), and leaving it out keeps the default --perf run within 30
    minutes."""
    if name == SDXL_RANDOM and device.type != "cuda":
        return [1]
    return config.batch_sizes


def few_step_repeats(steps: int, config: PerfConfig, device: torch.device) -> int:
    """Repeats in the few-step row: on a CPU the 20-step guided step costs about a minute,
    so T = 20 takes at most 2 (the median of 2 is their mean)."""
    return min(config.repeats, 2) if steps == 20 and device.type != "cuda" else config.repeats


def default_resolution(name: str, device: torch.device) -> int:
    """512 px on CUDA (1024 for SDXL, its own); on a CPU 128, where an SD-sized UNet call takes seconds."""
    if device.type == "cuda":
        return 1024 if name == SDXL_RANDOM else 512
    return 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(engine: GuidedDDIM, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_T = initial_latents(engine.components, list(range(batch)))
    prompt = engine.encode_text(["a photograph of a red circle on sand"] * batch)
    null = engine.null_embedding(batch)
    return z_T, prompt, null


def time_forward(engine: GuidedDDIM, steps: int, batch: int, repeats: int) -> list[float]:
    """Seconds of a plain forward sample (DDIM chain + VAE decode, no gradients), per repeat."""
    z_T, prompt, null = _inputs(engine, batch)
    sampler = SamplerConfig(num_steps=steps)
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up
        _sync(engine.device)
        started = time.perf_counter()
        engine.sample(z_T, prompt, null, sampler)
        _sync(engine.device)
        times.append(time.perf_counter() - started)
    return times[1:]


def time_optimization_step(
    engine: GuidedDDIM, steps: int, batch: int, repeats: int, optim: OptimConfig | None = None, guidance: float = 3.0
) -> list[float]:
    """Seconds of one full optimization step, `repeats` of them.

    engine.optimize reports after every iterate; the time between the reports of two
    consecutive iterates is one whole step as a user pays for it: Adam update, forward
    through the chain with gradients, loss on the last x0-predictions, backward with
    recomputation, and the plain decode the iterate is judged on. A one-step run warms up
    first; then one run of `repeats` + 1 steps gives `repeats` intervals (the last
    iterate is a forward pass only and is not counted)."""
    z_T, prompt, null = _inputs(engine, batch)
    sampler = SamplerConfig(num_steps=steps, guidance_scale=guidance)
    optim = replace(optim or OptimConfig(), loss_steps=min(3, steps))
    engine.optimize(brightness, z_T, prompt, null, sampler, replace(optim, steps=1))  # warm-up
    marks: list[float] = []

    def mark(_report) -> None:
        _sync(engine.device)
        marks.append(time.perf_counter())

    engine.optimize(brightness, z_T, prompt, null, sampler, replace(optim, steps=repeats + 1), on_step=mark)
    return [later - earlier for earlier, later in zip(marks[:repeats], marks[1 : repeats + 1])]


# -- memory, each measurement in a fresh process -------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field_name + ":"))


def memory_probe(name: str, resolution: int, steps: int, device_name: str, checkpoint_decode: bool,
                 checkpointing: bool | None = True) -> dict[str, Any]:  # fmt: skip
    """Peak memory of one optimization step above the loaded models (runs in its own process).
    With checkpointing on (the memory-vs-T claim), or None: as the engine decides (auto)."""
    device = torch.device(device_name)
    engine = GuidedDDIM(load_components(name, resolution), device=device)
    z_T, prompt, null = _inputs(engine, 1)
    optim = OptimConfig(steps=1, loss_steps=min(3, steps), checkpoint_decode=checkpoint_decode,
                        gradient_checkpointing=checkpointing)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak-RSS mark: loading must not count
        base = _status_kib("VmRSS") * 1024
    engine.optimize(brightness, z_T, prompt, null, SamplerConfig(num_steps=steps), optim)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        measure = "torch.cuda.max_memory_allocated"
    else:
        peak = _status_kib("VmHWM") * 1024
        measure = "process RSS (VmHWM)"
    return {"steps": steps, "peak_bytes": peak, "above_loaded_bytes": max(peak - base, 1), "measure": measure}


def measure_memory(name: str, resolution: int, steps: int, device: torch.device, checkpoint_decode: bool = True,
                   checkpointing: str = "on") -> dict:  # fmt: skip
    command = [sys.executable, "-m", "digin_cli.bench.perf", name, str(resolution), str(steps), str(device),
               "1" if checkpoint_decode else "0", checkpointing]  # fmt: skip
    # A fixed mmap threshold makes glibc hand large freed blocks back at once, so the peak
    # RSS follows the tensors that are alive rather than heap fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def pipeline_rows(name: str, config: PerfConfig, device: torch.device, log) -> dict[str, Any]:
    resolution = config.sd_resolution or default_resolution(name, device)
    steps = config.ddim_steps or default_steps(name, device)
    # Memory first, each probe in its own process, before this process holds the model too
    # (an SDXL-sized pipeline is 11 GB in fp32: two at once would not fit a 24 GB machine).
    at_t = measure_memory(name, resolution, steps, device)
    at_4t = measure_memory(name, resolution, config.memory_factor * steps, device)
    components = load_components(name, resolution)
    engine = GuidedDDIM(components, device=device)
    parameters = sum(p.numel() for p in components.unet.parameters())
    log(f"{name}: {components.resolution} px, T = {steps}, UNet {parameters / 1e6:.1f}M parameters")

    forward = time_forward(engine, steps, 1, config.repeats)
    step = time_optimization_step(engine, steps, 1, config.repeats)
    log(f"  forward sample {_median(forward):.3f} s, optimization step {_median(step):.3f} s")
    throughput = {}
    for batch in throughput_batches(name, config, device):
        seconds = step if batch == 1 else time_optimization_step(engine, steps, batch, config.repeats)
        throughput[str(batch)] = {"seconds_per_step": _median(seconds), "images_per_second": round(batch / statistics.median(seconds), 4)}
        log(f"  batch {batch}: {throughput[str(batch)]['images_per_second']:.3f} images/s")
    log(f"  memory above the loaded models: {at_t['above_loaded_bytes'] / 2**20:.0f} MiB at T, "
        f"{at_4t['above_loaded_bytes'] / 2**20:.0f} MiB at {config.memory_factor}T")  # fmt: skip
    row: dict[str, Any] = {
        "pipeline": name,
        "resolution": components.resolution,
        "unet_parameters": parameters,
        "ddim_steps": steps,
        "forward_sample_seconds": _median(forward),
        "optimization_step_seconds": _median(step),
        "step_over_forward": round(statistics.median(step) / statistics.median(forward), 3),
        "repeats": {"forward": [round(t, 4) for t in forward], "optimization_step": [round(t, 4) for t in step]},
        "memory": {
            "at_T": at_t,
            f"at_{config.memory_factor}T": at_4t,
            "ratio_above_loaded": round(at_4t["above_loaded_bytes"] / at_t["above_loaded_bytes"], 3),
            "ratio_peak": round(at_4t["peak_bytes"] / at_t["peak_bytes"], 3),
        },
        "throughput": throughput,
    }
    if name in config.feature_pipelines:
        row["features"] = feature_rows(name, engine, resolution, steps, config, device, log)
    return row


def feature_rows(name, engine: GuidedDDIM, resolution, steps, config: PerfConfig, device, log) -> dict[str, Any]:
    """Each speed feature against its absence, in the same process."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = engine.components.unet
    fused = dict(unet.attn_processors)
    fused_name = type(next(iter(fused.values()))).__name__
    fused_forward = time_forward(engine, steps, 1, config.repeats)
    unet.set_attn_processor(AttnProcessor())
    try:
        classic_forward = time_forward(engine, steps, 1, config.repeats)
        classic_step = time_optimization_step(engine, steps, 1, config.repeats)
    finally:
        unet.set_attn_processor(dict(fused))  # diffusers pops from the dict it is given
    fused_step = time_optimization_step(engine, steps, 1, config.repeats)
    attention = {
        "processor": fused_name,
        "forward_speedup": round(statistics.median(classic_forward) / statistics.median(fused_forward), 3),
        "step_speedup": round(statistics.median(classic_step) / statistics.median(fused_step), 3),
    }
    log(f"  fused attention: forward x{attention['forward_speedup']}, step x{attention['step_speedup']} faster than classic")

    # The decode checkpointing applies where the chain is checkpointed: both timed with it on.
    checkpointed_step = time_optimization_step(engine, steps, 1, config.repeats, OptimConfig(gradient_checkpointing=True))
    no_decode_checkpoint = measure_memory(name, resolution, steps, device, checkpoint_decode=False)
    with_checkpoint = measure_memory(name, resolution, steps, device)
    plain_decode_step = time_optimization_step(engine, steps, 1, config.repeats,
                                               OptimConfig(checkpoint_decode=False, gradient_checkpointing=True))  # fmt: skip
    decode = {
        "above_loaded_bytes_with": with_checkpoint["above_loaded_bytes"],
        "above_loaded_bytes_without": no_decode_checkpoint["above_loaded_bytes"],
        "memory_saved_share": round(1 - with_checkpoint["above_loaded_bytes"] / no_decode_checkpoint["above_loaded_bytes"], 3),
        "step_slowdown": round(statistics.median(checkpointed_step) / statistics.median(plain_decode_step), 3),
    }
    log(f"  VAE decode checkpointing saves {decode['memory_saved_share']:.0%} of the step's memory, "
        f"step x{decode['step_slowdown']} the time")  # fmt: skip

    # Checkpointing as the engine decides it (auto: off where the chain's activations fit
    # CHECKPOINT_MEMORY_SHARE of the available memory) against always on: the time it saves, the memory it costs.
    auto_memory = measure_memory(name, resolution, steps, device, checkpointing="auto")
    auto = {
        "step_speedup": round(statistics.median(checkpointed_step) / statistics.median(fused_step), 3),
        "above_loaded_bytes_auto": auto_memory["above_loaded_bytes"],
        "above_loaded_bytes_on": with_checkpoint["above_loaded_bytes"],
    }
    log(f"  auto checkpointing: step x{auto['step_speedup']} vs always on, memory "
        f"{auto['above_loaded_bytes_auto'] / 2**20:.0f} vs {auto['above_loaded_bytes_on'] / 2**20:.0f} MiB")  # fmt: skip

    bf16_engine = GuidedDDIM(engine.components, device=device, unet_dtype=torch.bfloat16)
    bf16_step = time_optimization_step(bf16_engine, steps, 1, config.repeats)
    bf16 = {"step_speedup": round(statistics.median(fused_step) / statistics.median(bf16_step), 3)}
    log(f"  bf16 autocast of the UNet: step x{bf16['step_speedup']} vs fp32")

    # torch.compile: the engine uses the compiled UNet inside optimize() only (see GuidedDDIM),
    # so the step is what it can speed up. Warm-up: a few steps, which compile the forward,
    # the backward and the no-grad report pass.
    compiled_engine = GuidedDDIM(engine.components, device=device, compile_unet=True)
    started = time.perf_counter()
    try:
        time_optimization_step(compiled_engine, steps, 1, 2)
    except Exception as error:  # TorchInductor needs a C++ compiler (and Triton on CUDA): say so, go on
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log(f"  torch.compile of the UNet failed: {reason}")
        return {"fused_attention": attention, "decode_checkpointing": decode, "auto_checkpointing": auto, "bf16_autocast": bf16,
                "compile": {"error": reason}}  # fmt: skip
    first_calls = time.perf_counter() - started
    eager_step = time_optimization_step(engine, steps, 1, config.repeats)  # adjacent, as the machine drifts
    compiled_step = time_optimization_step(compiled_engine, steps, 1, config.repeats)
    saved_per_step = statistics.median(eager_step) - statistics.median(compiled_step)
    compiled = {
        "step_speedup": round(statistics.median(eager_step) / statistics.median(compiled_step), 3),
        "first_calls_seconds": round(first_calls, 1),  # compiling, plus the warm-up's own steps
        "break_even_steps": round(first_calls / saved_per_step, 1) if saved_per_step > 0 else None,
    }
    log(f"  torch.compile of the UNet: step x{compiled['step_speedup']}, first calls {compiled['first_calls_seconds']} s "
        f"(paid back after {compiled['break_even_steps']} steps)")  # fmt: skip
    return {"fused_attention": attention, "decode_checkpointing": decode, "auto_checkpointing": auto, "bf16_autocast": bf16,
            "compile": compiled}  # fmt: skip


def few_step_row(config: PerfConfig, device: torch.device, log) -> dict[str, Any]:
    """Seconds per optimization step at 1, 2, 4 and 20 DDIM steps, guided (3.0: two UNet
    calls a step) and not (0: one), on one pipeline at one resolution; and the ratio of the
    4-step unguided step (a Turbo model's setting) to the 20-step guided one (the paper's)."""
    name = config.few_step_pipeline
    resolution = config.few_step_resolution or (512 if device.type == "cuda" else 64)
    engine = GuidedDDIM(load_components(name, resolution), device=device)
    log(f"few-step row on {name} at {engine.components.resolution} px")
    seconds: dict[str, dict[str, float]] = {}
    for steps in FEW_STEPS:
        seconds[str(steps)] = {}
        for label, guidance in (("guided", 3.0), ("unguided", 0.0)):
            repeats = few_step_repeats(steps, config, device)
            seconds[str(steps)][label] = _median(time_optimization_step(engine, steps, 1, repeats, guidance=guidance))
        log(f"  T = {steps}: {seconds[str(steps)]['guided']:.3f} s guided, {seconds[str(steps)]['unguided']:.3f} s unguided")
    ratio = round(seconds["4"]["unguided"] / seconds["20"]["guided"], 4)
    log(f"  4 steps unguided / 20 steps guided: {ratio:.3f} (target <= 0.2)")
    return {"pipeline": name, "resolution": engine.components.resolution, "seconds_per_step": seconds,
            "four_unguided_over_twenty_guided": ratio, "target": 0.2}  # fmt: skip


def machine(device: torch.device) -> dict[str, Any]:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"device": str(device), "torch": torch.__version__, "cpu": cpu,
            "threads": torch.get_num_threads(), "cores": os.cpu_count()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_perf(config: PerfConfig, log=lambda message: None) -> dict[str, Any]:
    config.check()
    device = resolve_device(config.device)
    started = time.perf_counter()
    # Each pipeline in a process of its own (see the module docstring): this one loads none.
    rows = [isolated("pipeline", name, config, device, log) for name in config.pipelines]
    few_steps = isolated("few-steps", config.few_step_pipeline, config, device, log) if config.few_step_pipeline else None
    result = {
        "benchmark": "performance: optimization step vs forward sample, memory vs steps, batch throughput, few steps",
        "machine": machine(device),
        "targets": {"step_over_forward": 3.0, "memory_ratio_4T_over_T": 1.1, "four_unguided_over_twenty_guided": 0.2},
        "rows": rows,
        "few_steps": few_steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(result, config.out / "perf.json")
    result["json"] = str(config.out / "perf.json")
    return result


def isolated(kind: str, name: str, config: PerfConfig, device: torch.device, log) -> dict[str, Any]:
    """pipeline_rows (kind "pipeline") or few_step_row ("few-steps") of `name`, run in a
    fresh process; its log lines are passed on as they come."""
    settings = {**config.__dict__, "out": str(config.out)}
    command = [sys.executable, "-m", "digin_cli.bench.perf", "--rows", kind, name, json.dumps(settings), str(device)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        lines = []
        for line in child.stdout:  # "log: ..." lines while it runs, the JSON result last
            if line.startswith("log: "):
                log(line[5:].rstrip("\n"))
            else:
                lines.append(line)
        errors = child.stderr.read()
    if child.returncode != 0 or not lines:
        last = errors.strip().splitlines()[-1] if errors.strip() else f"exit code {child.returncode}"
        reason = " (killed: out of memory?)" if child.returncode in (-9, 137) else ""
        raise DiginError(f"--perf {kind} of {name} failed{reason}: {last}")
    return json.loads(lines[-1])


def _child_rows(kind: str, name: str, settings: str, device_name: str) -> None:
    values = json.loads(settings)
    config = PerfConfig(**{**values, "out": Path(values["out"])})
    device = torch.device(device_name)
    log = lambda message: print("log: " + message.replace("\n", " "), flush=True)  # noqa: E731
    try:
        result = pipeline_rows(name, config, device, log) if kind == "pipeline" else few_step_row(config, device, log)
    except DiginError as error:  # the parent reports the message in one line
        print(str(error), file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--rows":  # python -m digin_cli.bench.perf --rows pipeline|few-steps NAME CONFIG_JSON DEVICE
        _child_rows(*sys.argv[2:6])
    else:  # the memory probe: python -m digin_cli.bench.perf NAME RESOLUTION STEPS DEVICE DECODE_CKPT on|auto
        name, resolution, steps, device_name, decode, checkpointing = sys.argv[1:7]
        print(json.dumps(memory_probe(name, int(resolution), int(steps), device_name, decode == "1",
                                      True if checkpointing == "on" else None)))
