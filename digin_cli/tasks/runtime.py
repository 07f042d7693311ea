"""What every task shares: runtime options, device and dtype, the progress protocol, the
checks of the engine options, and the run record's header."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import torch

from digin_cli import __version__
from digin_cli.engine import GuidedDDIM, OptimConfig, OptimizationResult, SamplerConfig, StepReport
from digin_cli.errors import DiginError
from digin_cli.models import DEFAULT_MODEL, load_diffusion

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RuntimeOptions:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda | mps (cuda:N accepted)
    dtype: str = "fp32"  # UNet autocast dtype: bf16 on CUDA or CPU, fp16 on CUDA
    compile: bool = False  # torch.compile the UNet


class Progress(Protocol):
    """How a task reports progress; the CLI implements it with rich, tests with a list."""

    def start(self, label: str, total_steps: int) -> None: ...

    def step(self, report: StepReport) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, label: str, total_steps: int) -> None:
        pass

    def step(self, report: StepReport) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            # One process per GPU under accelerate launch / torchrun: each takes its own.
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiginError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiginError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiginError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DiginError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise DiginError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    # bf16 autocast also runs on CPUs (x1.9 for an SD-sized UNet on the README's CPU, slower
    # for the 1M-parameter shapes UNet); fp16 autocast is for CUDA.
    allowed = ("cuda", "cpu") if name == "bf16" else ("cuda",)
    if name != "fp32" and device.type not in allowed:
        hint = "--dtype bf16 or fp32" if device.type == "cpu" else "--dtype fp32"
        raise DiginError(f"--dtype {name} (UNet autocast) needs a {' or '.join(d.upper() for d in allowed)} device; on {device.type} use {hint}")
    return DTYPES[name]


def resolve_runtime(options: RuntimeOptions) -> tuple[torch.device, torch.dtype]:
    """The device and UNet dtype a task runs with; both checked before any model loads."""
    device = resolve_device(options.device)
    return device, resolve_dtype(options.dtype, device)


def open_engine(options: RuntimeOptions, device: torch.device, unet_dtype: torch.dtype) -> GuidedDDIM:
    """Load the diffusion model and put the engine around it."""
    return GuidedDDIM(load_diffusion(options.model), device=device, unet_dtype=unet_dtype, compile_unet=options.compile)


def check_engine_options(out, sampler: SamplerConfig, optim: OptimConfig, batch_size: int) -> None:
    """Validate cheap options before anything heavy is loaded or any file is written."""
    if out.exists() and not out.is_dir():
        raise DiginError(f"--out {out} exists and is not a folder; give a folder path")
    if sampler.num_steps < 1:
        raise DiginError("--ddim-steps must be at least 1")
    if optim.steps < 0:
        raise DiginError("--steps must be 0 or more")
    if not 1 <= optim.loss_steps <= sampler.num_steps:
        raise DiginError(
            f"--loss-steps must be between 1 and --ddim-steps ({sampler.num_steps}), got {optim.loss_steps}"
        )
    if optim.num_cutouts < 1:
        raise DiginError("--cutouts must be at least 1")
    for option, lr in (("--lr-latent", optim.lr_latent), ("--lr-prompt", optim.lr_prompt), ("--lr-null", optim.lr_null)):
        if lr is not None and not lr > 0:
            raise DiginError(f"{option} must be a positive learning rate, got {lr}")
    if batch_size < 1:
        raise DiginError("--batch-size must be at least 1")


def check_prompt_template(template: str) -> None:
    if "{}" not in template:
        raise DiginError(f"--prompt-template must contain {{}} where the class name goes, got '{template}'")


def versions() -> dict[str, str]:
    import diffusers
    import open_clip
    import timm
    import transformers

    return {
        "digin": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "open_clip": open_clip.__version__,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def run_config(
    runtime: RuntimeOptions, specific: dict[str, Any], resolution: int, sampler: SamplerConfig, optim: OptimConfig
) -> dict[str, Any]:
    """Everything needed to repeat a run: the runtime, the task's own settings, the
    resolution, the sampler and the resolved optimization settings."""
    return {
        "model": runtime.model,
        "dtype": runtime.dtype,
        "compile": runtime.compile,
        **specific,
        "resolution": resolution,
        "sampler": asdict(sampler),
        "optim": asdict(optim),
    }


def started_at() -> str:
    """UTC now, to the second, as the run records write it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def item_history(result: OptimizationResult, item: int) -> list[dict[str, float]]:
    """Item `item`'s figures at every iterate: [{step, loss, <metric>...}, ...], rounded for the record."""
    return [
        {"step": step, **{name: round(values[item], 6) for name, values in entry.items()}}
        for step, entry in enumerate(result.history)
    ]
