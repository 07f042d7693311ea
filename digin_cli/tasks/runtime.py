"""What every task shares: runtime options, device and dtype, the progress protocol, the
checks of the engine options, and the run record's header."""

from __future__ import annotations

import gc
import math
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler

from digin_cli import __version__
from digin_cli.components import DiffusionComponents
from digin_cli.engine import GuidedDDIM, NonFiniteLoss, OptimConfig, OptimizationResult, SamplerConfig, StepReport
from digin_cli.errors import DiginError
from digin_cli.models import DEFAULT_MODEL, load_diffusion
from digin_cli.families import FAMILIES, Family
from digin_cli.models.diffusion import check_model_path, detect_family, parse_lora

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPACINGS = ("leading", "trailing", "linspace")  # DDIMScheduler's timestep spacings


@dataclass
class RuntimeOptions:
    model: str | DiffusionComponents = DEFAULT_MODEL  # a name, or a model already loaded (the Python API)
    device: str = "auto"  # auto | cpu | cuda | mps (cuda:N accepted)
    dtype: str = "fp32"  # UNet autocast dtype: bf16 on CUDA or CPU, fp16 on CUDA
    compile: bool = False  # torch.compile the UNet
    overwrite: bool = False  # start the output folder's run again instead of resuming it
    loras: tuple[str, ...] = ()  # "PATH_OR_ID[:SCALE]" LoRA weights fused into the model
    revision: str | None = None  # hub branch, tag or commit
    variant: str | None = None  # weight-file variant, e.g. "fp16"
    command_line: list[str] | None = None  # as the user typed it (the CLI sets it), for the run header


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


def process_state():
    """accelerate's view of the processes of this run (one, or those `accelerate launch` /
    `torchrun` started): process_index, num_processes, local_process_index."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return resolve_cuda(name, torch.device("cuda"))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiginError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        return resolve_cuda(name, device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiginError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DiginError(f"unsupported device '{name}'; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_cuda(name: str, device: torch.device) -> torch.device:
    """This process's GPU, always with its index: `cuda` (and auto) is the process's own GPU
    under accelerate launch / torchrun, one per process; `cuda:N` only for a single process."""
    if not torch.cuda.is_available():
        raise DiginError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    count = torch.cuda.device_count()
    state = process_state()
    if device.index is None:
        device = torch.device("cuda", state.local_process_index % count)
    elif state.num_processes > 1:
        raise DiginError(f"--device {name} would put all {state.num_processes} processes on one GPU; use --device cuda "
                         "or auto to give each process its own GPU")  # fmt: skip
    elif device.index >= count:
        raise DiginError(f"--device {name}: there is no such GPU, this machine has {count} (cuda:0-{count - 1}); use one of them or auto")
    # Tensors made without a device (the text encoder's token ids) go to the current device,
    # which must be the GPU the models are on.
    torch.cuda.set_device(device)
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


def model_name(options: RuntimeOptions) -> str:
    """The model as the records name it: as given, or where a loaded model came from."""
    return options.model if isinstance(options.model, str) else options.model.source


def model_family(options: RuntimeOptions) -> Family:
    """The family of the model the options name (from its config files: no weights are
    loaded), or of the model already loaded."""
    if isinstance(options.model, DiffusionComponents):
        return FAMILIES[options.model.family]
    return detect_family(options.model, revision=options.revision)


def with_family_defaults(job):
    """`job` (any task's job: it has runtime, sampler, optim) with the model family's defaults
    in every sampler option left open, and the loss on the last min(3, T) steps unless given."""
    check_resolution(job.sampler)  # the user's value: the family's default would hide a 0
    check_model_path(model_name(job.runtime))  # a missing folder is named as such, not as a hub id
    sampler = job.sampler.resolved(model_family(job.runtime))
    optim = getattr(job, "optim", None)
    if optim is None:
        return replace(job, sampler=sampler)
    if optim.loss_steps is None:
        optim = replace(optim, loss_steps=min(3, max(sampler.num_steps, 1)))
    return replace(job, sampler=sampler, optim=optim)


def check_resolution(sampler: SamplerConfig) -> None:
    """The multiple of pixels a model samples is checked once it is loaded (sampling_components)."""
    if sampler.resolution is not None and sampler.resolution < 8:
        raise DiginError(f"--resolution must be at least 8 pixels, got {sampler.resolution}")


def open_engine(options: RuntimeOptions, device: torch.device, unet_dtype: torch.dtype, sampler: SamplerConfig) -> GuidedDDIM:
    """Load the diffusion model (unless it is loaded already) and put the engine around it,
    sampling at the sampler's resolution and timestep spacing."""
    if isinstance(options.model, str):
        components = load_diffusion(options.model, options.revision, options.variant, options.loras)
    else:
        components = options.model
    return GuidedDDIM(sampling_components(components, sampler), device=device, unet_dtype=unet_dtype,
                      compile_unet=options.compile)  # fmt: skip


def sampling_components(components: DiffusionComponents, sampler: SamplerConfig) -> DiffusionComponents:
    """The same modules with the sampler's resolution and a scheduler of its spacing (a copy:
    a model the Python API hands in stays as it was)."""
    changes: dict[str, Any] = {}
    if sampler.resolution is not None and sampler.resolution != components.resolution:
        # The latents must go through every down-sampling of the UNet.
        multiple = components.vae_scale_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)
        if sampler.resolution % multiple:
            raise DiginError(f"--resolution {sampler.resolution}: this model samples multiples of {multiple} pixels")
        changes["resolution_override"] = sampler.resolution
    spacing = sampler.timestep_spacing
    if spacing is not None and spacing != components.scheduler.config.timestep_spacing:
        changes["scheduler"] = DDIMScheduler.from_config(components.scheduler.config, timestep_spacing=spacing)
    return replace(components, **changes) if changes else components


def check_number(option: str, value: float, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True) -> None:  # fmt: skip
    """A finite number within [low, high] (or (low, high] without `low_inclusive`), else one line naming the option."""
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value < low if low_inclusive else value <= low))
    bad = bad or (high is not None and value > high)
    if bad:
        lower = "" if low is None else (f"at least {low:g}" if low_inclusive else f"above {low:g}")
        upper = "" if high is None else f"at most {high:g}"
        wanted = " and ".join(part for part in (lower, upper) if part) or "a finite number"
        raise DiginError(f"{option} must be {wanted}, got {value}")


def check_out(out: Path) -> None:
    """The output folder exists or can be created (tried, then undone: nothing stays behind)."""
    if out.exists():
        if not out.is_dir():
            raise DiginError(f"--out {out} exists and is not a folder; give a folder path")
        return
    missing = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)  # exist_ok: another process of the run may make it first
    except OSError as error:
        raise DiginError(f"--out {out} cannot be created ({error.strerror or type(error).__name__}); give a folder you can write to") from None
    for folder in missing:  # deepest first; a folder another process has written into stays
        try:
            folder.rmdir()
        except OSError:
            break


def check_engine_options(out: Path, sampler: SamplerConfig, optim: OptimConfig, batch_size: int,
                         runtime: RuntimeOptions) -> None:  # fmt: skip
    """Validate cheap options before anything heavy is loaded or any file is written."""
    check_out(out)  # the model path and --resolution were checked by with_family_defaults, which comes first
    if sampler.num_steps < 1:
        raise DiginError("--ddim-steps must be at least 1")
    check_number("--guidance", sampler.guidance_scale, low=0)
    if sampler.timestep_spacing not in (None, *SPACINGS):
        raise DiginError(f"--spacing must be one of {', '.join(SPACINGS)}, got '{sampler.timestep_spacing}'")
    for lora in runtime.loras:
        parse_lora(lora)
    if optim.steps < 0:
        raise DiginError("--steps must be 0 or more")
    if not 1 <= optim.loss_steps <= sampler.num_steps:
        raise DiginError(
            f"--loss-steps must be between 1 and --ddim-steps ({sampler.num_steps}), got {optim.loss_steps}"
        )
    if optim.num_cutouts < 1:
        raise DiginError("--cutouts must be at least 1")
    check_guards(optim)
    for option, lr in (("--lr-latent", optim.lr_latent), ("--lr-prompt", optim.lr_prompt), ("--lr-null", optim.lr_null)):
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise DiginError(f"{option} must be a positive learning rate, got {lr}")
    if batch_size < 1:
        raise DiginError("--batch-size must be at least 1")


def check_prompt_template(template: str) -> None:
    if "{}" not in template:
        raise DiginError(f"--prompt-template must contain {{}} where the class name goes, got '{template}'")


# Running out of memory in a batch: CUDA's allocator (a RuntimeError) or the host's.
MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)


def out_of_memory(batch_size: int, batch: str) -> str:
    """The line for a batch that ran out of memory; `batch` says what was in it."""
    return f"out of memory with --batch-size {batch_size} ({batch}); use a smaller --batch-size or --dtype bf16"


def counted(number: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{number} {noun}{'s' * (number != 1)}"


def release_memory() -> None:
    """After a batch ran out of memory (called outside the `except`, so that the error and
    the frames holding its tensors are gone): the memory goes back, on the GPU too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def finite_losses() -> Iterator[None]:
    """Inside: an optimization whose loss turns NaN or infinite fails as one line that says what to do."""
    try:
        yield
    except NonFiniteLoss as error:
        raise DiginError(f"{error}; with --dtype fp16 the UNet can overflow: use --dtype bf16 or fp32, or lower the learning rates") from None


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
    runtime: RuntimeOptions, specific: dict[str, Any], components, sampler: SamplerConfig, optim: OptimConfig
) -> dict[str, Any]:
    """Everything needed to repeat a run: the runtime, the task's own settings, what the
    model's weights are, the resolution, the sampler and the resolved optimization settings."""
    return {
        "model": model_name(runtime),
        "model_identity": components.identity,
        "family": FAMILIES[components.family].as_record(),
        "loras": list(runtime.loras),
        "revision": runtime.revision,
        "variant": runtime.variant,
        "dtype": runtime.dtype,
        "compile": runtime.compile,
        **specific,
        "resolution": components.resolution,
        "sampler": {**asdict(sampler), "timestep_spacing": components.scheduler.config.timestep_spacing},
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


@dataclass(frozen=True)
class Shard:
    """This process's share of a run's items: index, index + count, index + 2 count, ...

    `accelerate launch` (like torchrun) starts one process per GPU; accelerate's
    PartialState says which one this is and how many there are. A plain run is the only
    shard. Shards write into the same output folder; its summary is rebuilt from the
    records on disk, so it holds every shard's items."""

    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> Shard:
        state = process_state()
        return cls(state.process_index, state.num_processes)

    def take(self, items: list) -> list:
        return items[self.index :: self.count]


def check_guards(optim: OptimConfig) -> None:
    """OptimConfig.validate's error as the options name it: "noise_reg must be ..." ->
    "Error: --noise-reg must be ..."."""
    try:
        optim.validate()
    except ValueError as error:
        field_name, _, rest = str(error).partition(" ")
        raise DiginError(f"--{field_name.replace('_', '-')} {rest}") from None
