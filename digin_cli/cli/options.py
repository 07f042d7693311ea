"""The options several commands share, each defined once.

Single options are `Annotated` types (`OutOpt`, `QuietOpt`, ...). Groups of options that
build one value (the sampler, the optimization, the runtime, the real-image options) are
`OptionGroup`s: `with_options(name=GROUP)` gives a command the group's options and hands
the command the built value as its parameter `name`, so no command spells them out.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

# models.DEFAULT_MODEL, spelt out here because importing digin_cli.models (torch, diffusers,
# timm, open_clip: seconds) would slow down every `digin --help`; a test keeps them equal.
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


@dataclass(frozen=True)
class OptionGroup:
    """Typer options that together build one value (`build(**option values)`)."""

    parameters: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def _option(name: str, kind: type, default: Any, *flags: str, help: str, panel: str,  # noqa: A002
            metavar: str | None = None) -> inspect.Parameter:  # fmt: skip
    info = typer.Option(*flags, help=help, rich_help_panel=panel, metavar=metavar)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])


def with_options(**groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add each group's options to a command; the command receives the group's built value
    under the keyword it was given here (its own parameter of that name is replaced)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name not in groups]
        added = [p for group in groups.values() for p in group.parameters]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            for name, group in groups.items():
                values[name] = group.build(**{p.name: values.pop(p.name) for p in group.parameters})
            return command(**values)

        # Typer reads the options from the signature; functools.wraps would point it at `command`.
        parameters = own + added
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def command_line() -> list[str] | None:
    """The command as the user typed it, for the run header (None when digin was not run
    from a shell, e.g. inside a test runner)."""
    program = Path(sys.argv[0]) if sys.argv else Path()
    ours = program.name == "digin" or (program.name == "__main__.py" and program.parent.name == "digin_cli")
    return ["digin", *sys.argv[1:]] if ours else None


def _engine():
    """The engine module, imported when a command runs (not when the CLI starts)."""
    from digin_cli import engine

    return engine


def _real_images():
    from digin_cli.tasks import real_images

    return real_images


# -- single options ----------------------------------------------------------------------

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.", file_okay=True)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images optimized together in one batch.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimization (Adam) steps.")]
DdimStepsOpt = Annotated[int, typer.Option("--ddim-steps", help="DDIM sampling steps.")]
InputsArg = Annotated[Path, typer.Argument(help="An image file, or a folder of images.", show_default=False)]
PromptTemplateOpt = Annotated[str, typer.Option(help="Prompt for the class; {} is the class name.")]
ClassifierOpt = Annotated[str, typer.Option("--classifier", help="Classifier to explain (spec, see README).")]
NeuronOpt = Annotated[int | None, typer.Option("--neuron", "-u", help="Neuron index in the feature map.")]
DirectionOpt = Annotated[
    Path | None, typer.Option("--direction", help="A .npy/.pt vector in feature space instead of one neuron.")
]
ConeOpt = Annotated[
    str | None,
    typer.Option("--cone", metavar="SPEC[:DEGREES]", rich_help_panel="Guards (results that fool only the guide)",
                 help="DVCE's cone: keep the guide's gradient within DEGREES (default 30) of a second, robust classifier's, e.g. shapes:robust:30."),
]
LayerOpt = Annotated[str | None, typer.Option(help="Named module to read (default: the input of the last linear layer).")]


# -- groups ------------------------------------------------------------------------------

SAMPLER = "Sampler"
SAMPLER_OPTIONS = OptionGroup(
    (
        _option("ddim_steps", int | None, None, "--ddim-steps", panel=SAMPLER,
                help="DDIM sampling steps (default: the model family's: 20, Turbo models 4; see `digin models --family`)."),
        _option("guidance", float | None, None, "--guidance", panel=SAMPLER,
                help="Classifier-free guidance scale; 1 or less samples the conditional branch alone (default: the family's: 3.0, Turbo 0)."),
        _option("spacing", str | None, None, "--spacing", panel=SAMPLER,
                help="Timestep spacing: leading, trailing or linspace (default: the scheduler config's; Turbo: trailing)."),
        _option("resolution", int | None, None, "--resolution", panel=SAMPLER,
                help="Sampling resolution in pixels (default: the UNet's own; Turbo: 512)."),
    ),  # fmt: skip
    lambda ddim_steps, guidance, spacing, resolution: _engine().SamplerConfig(
        num_steps=ddim_steps, guidance_scale=guidance, timestep_spacing=spacing, resolution=resolution
    ),
)

OPTIM = "Optimization"
GUARDS = "Guards (results that fool only the guide)"
OPTIM_OPTIONS = OptionGroup(
    (
        _option("steps", int, 20, "--steps", help="Optimization (Adam) steps.", panel=OPTIM),
        _option("lr_latent", float, 1e-3, "--lr-latent", help="Learning rate of z_T.", panel=OPTIM),
        _option("lr_prompt", float | None, None, "--lr-prompt", panel=OPTIM,
                help="Learning rate of the per-step prompt deltas (default: the model's, else 0.01)."),
        _option("lr_null", float | None, None, "--lr-null", panel=OPTIM,
                help="Learning rate of the per-step null-text deltas (default: the model's, else 0.01)."),
        _option("optimize_latent", bool, True, "--optimize-latent/--freeze-latent", help="Optimize z_T.", panel=OPTIM),
        _option("optimize_prompt", bool, True, "--optimize-prompt/--freeze-prompt", help="Optimize prompt deltas.", panel=OPTIM),
        _option("optimize_null", bool, True, "--optimize-null/--freeze-null", help="Optimize null-text deltas.", panel=OPTIM),
        _option("loss_steps", int | None, None, "--loss-steps", panel=OPTIM,
                help="Put the loss on the last K DDIM steps (default: 3, or all of fewer)."),
        _option("cutouts", int, 16, "--cutouts", help="Augmented classifier views per image.", panel=OPTIM),
        _option("augment", str, "cutouts", "--augment", panel=GUARDS, metavar="cutouts|eot",
                help="The classifier's views: cutouts (random crops + noise, the paper's) or eot (also flips, small rotations and scales, colour jitter and blur)."),
        _option("keep", str, "best-loss", "--keep", panel=GUARDS, metavar="best-loss|first-claim",
                help="Which iterate to keep: the lowest loss, or the first whose claim holds by --claim-margin (before later steps over-optimize)."),
        _option("claim_margin", float, 0.05, "--claim-margin", panel=GUARDS,
                help="With --keep first-claim: by how much (probability) the claim must hold."),
        _option("noise_reg", float, 0.0, "--noise-reg", panel=GUARDS, metavar="WEIGHT",
                help="Keep z_T typical of a standard Gaussian (DNO's noise regularization): the weight of its loss; 0 is off."),
    ),  # fmt: skip
    # The cutout seed is set by each command (--seed means more than that for runs from seeds).
    lambda cutouts, **values: _engine().OptimConfig(num_cutouts=cutouts, **values),
)

# The guards alone, for `digin bench` (whose optimization settings are otherwise its own):
# the same declared options as above, built into a dict of OptimConfig fields.
GUARD_OPTIONS = OptionGroup(
    tuple(p for p in OPTIM_OPTIONS.parameters if p.annotation.__metadata__[0].rich_help_panel == GUARDS),
    lambda **values: values,
)

RUNTIME = "Model and device"
OUTPUT = "Output"
JUDGING = "Judges"


def runtime_options(compile_unet: bool = True) -> OptionGroup:
    """--model, --device, --dtype and (where the command can use it) --compile."""
    parameters = [
        _option("model", str, DEFAULT_MODEL, "--model", panel=RUNTIME,
                help="Diffusion model: a Hugging Face id, a local diffusers folder, a .safetensors/.ckpt file, or a built-in name (see `digin models`)."),
        _option("device", str, "auto", "--device", help="auto, cpu, cuda, cuda:N or mps.", panel=RUNTIME),
        _option("dtype", str, "fp32", "--dtype", panel=RUNTIME,
                help="UNet autocast: fp32, bf16 (CUDA or CPU) or fp16 (CUDA); optimization stays fp32."),
        _option("lora", list[str] | None, None, "--lora", panel=RUNTIME, metavar="PATH[:SCALE]",
                help="LoRA weights PATH_OR_ID[:SCALE] fused into the model (diffusers' load_lora_weights); repeatable."),
        _option("revision", str | None, None, "--revision", help="Hub model: branch, tag or commit.", panel=RUNTIME),
        _option("variant", str | None, None, "--variant", help="Weight-file variant, e.g. fp16.", panel=RUNTIME),
    ]  # fmt: skip
    if compile_unet:
        parameters.append(_option("compile_unet", bool, False, "--compile", panel=RUNTIME,
                                  help="torch.compile the UNet: slower start (compiling), faster steps; pays off on longer runs."))  # fmt: skip
    def build(model: str, device: str, dtype: str, lora: list[str] | None, revision: str | None, variant: str | None,
              compile_unet: bool = False):  # fmt: skip
        from digin_cli.tasks.runtime import RuntimeOptions

        return RuntimeOptions(model=model, device=device, dtype=dtype, compile=compile_unet, loras=tuple(lora or ()),
                              revision=revision, variant=variant, command_line=command_line())  # fmt: skip

    return OptionGroup(tuple(parameters), build)


REAL = "Real images"
REAL_IMAGE_OPTIONS = OptionGroup(
    (
        _option("caption", str | None, None, "--caption", panel=REAL,
                help="Caption for the inversion; must name the image's class (default 'an image of a <class>')."),
        _option("captioner", str | None, None, "--captioner", panel=REAL,
                help="transformers image-to-text model that extends the default caption (off)."),
        _option("mask", Path | None, None, "--mask", panel=REAL,
                help="Your own object mask (white = object), or for a folder a folder of masks named like the images."),
        _option("sam_checkpoint", Path | None, None, "--sam-checkpoint", help="SAM-HQ weights to refine the attention mask.", panel=REAL),
        _option("sam_model_type", str | None, None, "--sam-model-type", help="SAM-HQ architecture (default: read from the file name).", panel=REAL),
    ),  # fmt: skip
    lambda caption, captioner, mask, sam_checkpoint, sam_model_type: _real_images().RealImageOptions(
        caption=caption, captioner=captioner, mask_file=mask, sam_checkpoint=sam_checkpoint, sam_model_type=sam_model_type
    ),
)


def real_image_options(kept: str) -> OptionGroup:
    """REAL_IMAGE_OPTIONS with --w-latent and --w-pixel, the weights of the distance that keeps
    `kept` (the background for uvce, the object for neuron-cf): (RealImageOptions, weights)."""
    weights = (
        _option("w_latent", float, 25.0, "--w-latent", help=f"Weight of the latent {kept} distance.", panel=REAL),
        _option("w_pixel", float, 250.0, "--w-pixel", help=f"Weight of the pixel {kept} distance.", panel=REAL),
    )

    def build(w_latent: float, w_pixel: float, **values: Any) -> tuple[Any, dict[str, float]]:
        return REAL_IMAGE_OPTIONS.build(**values), {"weight_latent": w_latent, "weight_pixel": w_pixel}

    return OptionGroup(REAL_IMAGE_OPTIONS.parameters + weights, build)


@dataclass
class CommonOptions:
    """What every optimizing command takes: the sampler, the optimization, the model and
    device, the batch size, the output folder and --quiet."""

    sampler: Any  # SamplerConfig
    optim: Any  # OptimConfig, its cutout seed set by job_fields
    runtime: Any  # RuntimeOptions
    batch_size: int
    out: Path
    quiet: bool
    cutout_seed: int | None = None  # --seed, where the command takes it for the cutouts alone
    judges: tuple[str, ...] = ()  # --judge specs
    fail_on: str | None = None  # --fail-on: claimed | confirmed (the CLI's exit status 3)

    def job_fields(self, seed: int | None = None) -> dict[str, Any]:
        """The fields every job dataclass has, the cutouts seeded by `seed` (else --seed)."""
        cutout_seed = self.cutout_seed if seed is None else seed
        optim = replace(self.optim, seed=cutout_seed or 0)
        return {"out": self.out, "batch_size": self.batch_size, "runtime": self.runtime, "sampler": self.sampler,
                "optim": optim, "judges": self.judges}  # fmt: skip


def common_options(out: str, compile_unet: bool = True, cutout_seed: bool = False) -> OptionGroup:
    """SAMPLER_OPTIONS, OPTIM_OPTIONS, runtime_options(compile_unet), --batch-size, --out (its
    default `out`), --quiet and, with `cutout_seed`, --seed for the cutouts."""
    groups = {"sampler": SAMPLER_OPTIONS, "optim": OPTIM_OPTIONS, "runtime": runtime_options(compile_unet)}
    own = [
        _option("batch_size", int, 1, "--batch-size", help="Images optimized together in one batch.", panel=OPTIM),
        _option("out", Path, Path(out), "--out", "-o", help="Output folder.", panel=OUTPUT),
        _option("quiet", bool, False, "--quiet", "-q", help="No progress bar or table.", panel=OUTPUT),
        _option("overwrite", bool, False, "--overwrite", panel=OUTPUT,
                help="Start the output folder's run again (its earlier files are removed) instead of resuming it."),
        _option("judge", list[str] | None, None, "--judge", panel=JUDGING, metavar="SPEC",
                help="An independent classifier (spec, as --classifier) that judges each result and never enters the loss; repeatable. Records say per item whether every judge confirms its claim."),
        _option("fail_on", str | None, None, "--fail-on", panel=JUDGING, metavar="claimed|confirmed",
                help="Exit with status 3 when at least one item is a claimed (or judge-confirmed) finding: a CI gate."),
    ]  # fmt: skip
    if cutout_seed:
        own.append(_option("cutout_seed", int, 0, "--seed", help="Seeds the cutout randomness.", panel=OPTIM))

    def build(overwrite: bool, judge: list[str] | None, fail_on: str | None, **values: Any) -> CommonOptions:
        from digin_cli.cli.app import fail
        from digin_cli.errors import DiginError
        from digin_cli.tasks.judges import check_judge_options

        try:  # before anything loads
            check_judge_options(judge or [], fail_on)
        except DiginError as error:
            fail(str(error))
        built = {name: group.build(**{p.name: values.pop(p.name) for p in group.parameters}) for name, group in groups.items()}
        built["runtime"].overwrite = overwrite
        return CommonOptions(**built, **values, judges=tuple(judge or ()), fail_on=fail_on)

    parameters = tuple(own) + tuple(p for group in groups.values() for p in group.parameters)
    return OptionGroup(parameters, build)


SEEDS = OptionGroup(
    (
        _option("num_images", int, 1, "--num-images", "-n", help="How many images (seeds) to make.", panel=OPTIM),
        _option("seed", int, 0, "--seed", help="First seed; image i uses seed + i (also seeds the cutouts).", panel=OPTIM),
    ),
    lambda num_images, seed: list(range(seed, seed + num_images)),
)
