"""The command line: parse options, call a job, report. Nothing else lives here."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from digin_cli import __version__
from digin_cli.errors import DiginError

try:  # typer >= 0.24 vendors its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_exceptions

stdout = Console()
stderr = Console(stderr=True)


class OneLineErrors(TyperGroup):
    """Usage errors as one `Error: ...` line and exit code 2, without the usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError" and error.ctx is not None:
                typer.echo(error.ctx.get_help())  # `digin` alone: help, not an error
                sys.exit(0)
            hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
            typer.echo(f"Error: {error.format_message()}{hint}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Error: aborted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Explain image classifiers by optimizing the inputs of a latent diffusion model (DiG-IN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> None:
    stderr.print(f"Error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_job(job_fn, *args) -> Any:
    """Call a job; turn the errors a user can fix into one line, never a traceback."""
    try:
        return job_fn(*args)
    except DiginError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted; files already written are complete, rerun to redo the rest", 130)
    except MemoryError:
        fail("out of memory; lower --batch-size, --cutouts or --ddim-steps, or use a GPU")
    except Exception as error:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DIGIN_DEBUG"):
            raise
        if "out of memory" in str(error).lower():
            fail("out of GPU memory; lower --batch-size or --cutouts, or use --dtype bf16")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fail(f"unexpected {type(error).__name__}: {first} (set DIGIN_DEBUG=1 to see the traceback and report it)")


class RichProgress:
    """A rich progress bar over optimization steps, showing the live loss and metrics."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def start(self, label: str, total_steps: int) -> None:
        if self.task is None:
            self.bar.start()
        else:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=total_steps, status="")

    def step(self, report) -> None:
        parts = [f"loss {report.loss.mean():+.3f}"]
        parts += [f"{name} {values.mean():.3f}" for name, values in report.metrics.items()]
        self.bar.update(self.task, completed=report.step, status="  ".join(parts))

    def finish(self) -> None:
        pass

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


# -- options shared by every subcommand (defined once) -----------------------------

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="Diffusion model: a Hugging Face id, a local diffusers folder, or a built-in name (see `digin models`).",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option(help="UNet autocast: fp32, bf16 (CUDA or CPU) or fp16 (CUDA); optimization stays fp32.")]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="torch.compile the UNet: slower start (compiling), faster steps; pays off on longer runs.")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.", file_okay=True)]
DdimStepsOpt = Annotated[int, typer.Option("--ddim-steps", help="DDIM sampling steps.")]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimization (Adam) steps.")]
LrLatentOpt = Annotated[float, typer.Option("--lr-latent", help="Learning rate of z_T.")]
LrPromptOpt = Annotated[
    float | None,
    typer.Option("--lr-prompt", help="Learning rate of the per-step prompt deltas [default: the model's, else 0.01]."),
]
LrNullOpt = Annotated[
    float | None,
    typer.Option("--lr-null", help="Learning rate of the per-step null-text deltas [default: the model's, else 0.01]."),
]
OptLatentOpt = Annotated[bool, typer.Option("--optimize-latent/--freeze-latent", help="Optimize z_T.")]
OptPromptOpt = Annotated[bool, typer.Option("--optimize-prompt/--freeze-prompt", help="Optimize prompt deltas.")]
OptNullOpt = Annotated[bool, typer.Option("--optimize-null/--freeze-null", help="Optimize null-text deltas.")]
LossStepsOpt = Annotated[int, typer.Option("--loss-steps", help="Put the loss on the last K DDIM steps.")]
CutoutsOpt = Annotated[int, typer.Option("--cutouts", help="Augmented classifier views per image.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images optimized together in one batch.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")]
# Options of the real-image commands (uvce, neuron-cf).
InputsArg = Annotated[Path, typer.Argument(help="An image file, or a folder of images.", show_default=False)]
CaptionerOpt = Annotated[
    str | None, typer.Option(help="transformers image-to-text model that extends the default caption (off).")
]
MaskOpt = Annotated[
    Path | None,
    typer.Option("--mask", help="Your own object mask (white = object), or for a folder a folder of masks named like the images."),
]
SamCheckpointOpt = Annotated[Path | None, typer.Option("--sam-checkpoint", help="SAM-HQ weights to refine the attention mask.")]
SamTypeOpt = Annotated[str | None, typer.Option(help="SAM-HQ architecture (default: read from the file name).")]
CutoutSeedOpt = Annotated[int, typer.Option(help="Seeds the cutout randomness.")]


def _sampler_and_optim(ddim_steps, guidance, steps, lr_latent, lr_prompt, lr_null, opt_latent, opt_prompt,
                       opt_null, loss_steps, cutouts, seed):  # fmt: skip
    from digin_cli.engine import OptimConfig, SamplerConfig

    sampler = SamplerConfig(num_steps=ddim_steps, guidance_scale=guidance)
    optim = OptimConfig(
        steps=steps,
        lr_latent=lr_latent,
        lr_prompt=lr_prompt,
        lr_null=lr_null,
        optimize_latent=opt_latent,
        optimize_prompt=opt_prompt,
        optimize_null=opt_null,
        loss_steps=loss_steps,
        num_cutouts=cutouts,
        seed=seed,
    )
    return sampler, optim


@app.command()
def disagree(
    classifier_f: Annotated[
        str, typer.Option("--classifier-f", "-f", help="Classifier that should see the class (spec, see README).")
    ],
    classifier_g: Annotated[
        str, typer.Option("--classifier-g", "-g", help="Classifier that should not see the class.")
    ],
    class_name: Annotated[str, typer.Option("--class", "-c", help="Target class: a name (any case) or an index.")],
    model: ModelOpt = "CompVis/stable-diffusion-v1-4",
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="How many images (seeds) to make.")] = 1,
    seed: Annotated[int, typer.Option(help="First seed; image i uses seed + i.")] = 0,
    prompt_template: Annotated[str, typer.Option(help="Initial prompt; {} is the class name.")] = (
        "a photograph of a {}"
    ),
    ddim_steps: DdimStepsOpt = 20,
    guidance: GuidanceOpt = 3.0,
    steps: StepsOpt = 20,
    lr_latent: LrLatentOpt = 1e-3,
    lr_prompt: LrPromptOpt = None,
    lr_null: LrNullOpt = None,
    optimize_latent: OptLatentOpt = True,
    optimize_prompt: OptPromptOpt = True,
    optimize_null: OptNullOpt = True,
    loss_steps: LossStepsOpt = 3,
    cutouts: CutoutsOpt = 16,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    compile_unet: CompileOpt = False,
    out: OutOpt = Path("digin-out/disagree"),
    quiet: QuietOpt = False,
) -> None:
    """Make images that classifier f assigns to CLASS and classifier g does not (paper section 4)."""
    from digin_cli.runs import DisagreeJob, RuntimeOptions, run_disagree

    if num_images < 1:
        fail("--num-images must be at least 1")
    sampler, optim = _sampler_and_optim(ddim_steps, guidance, steps, lr_latent, lr_prompt, lr_null,
                                        optimize_latent, optimize_prompt, optimize_null, loss_steps, cutouts,
                                        seed)  # fmt: skip
    job = DisagreeJob(
        classifier_f=classifier_f,
        classifier_g=classifier_g,
        class_name=class_name,
        out=out,
        seeds=list(range(seed, seed + num_images)),
        prompt_template=prompt_template,
        batch_size=batch_size,
        runtime=RuntimeOptions(model=model, device=device, dtype=dtype, compile=compile_unet),
        sampler=sampler,
        optim=optim,
    )
    progress = None if quiet else RichProgress(stderr)
    try:
        record = run_job(run_disagree, job, progress)
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        table = Table(title=f"disagree: '{record['config']['class_name']}'  (p_f up, p_g down)")
        for column in ("seed", "p_f before", "p_g before", "p_f after", "p_g after", "best step", "sheet"):
            table.add_column(column)
        for item in record["images"]:
            b, a = item["initial"], item["optimized"]
            table.add_row(str(item["seed"]), f"{b['p_f']:.3f}", f"{b['p_g']:.3f}", f"{a['p_f']:.3f}",
                          f"{a['p_g']:.3f}", str(item["best_step"]), item["files"]["sheet"])  # fmt: skip
        stdout.print(table)
    stdout.print(f"Wrote {len(record['images'])} image(s) and {record['json']}", highlight=False)


@app.command()
def neuron(
    classifier: Annotated[str, typer.Option("--classifier", help="Classifier whose neuron is explained.")],
    neuron_index: Annotated[
        int | None, typer.Option("--neuron", "-u", help="Neuron index in the feature map.")
    ] = None,
    direction: Annotated[
        Path | None, typer.Option("--direction", help="A .npy/.pt vector in feature space to maximize instead.")
    ] = None,
    layer: Annotated[
        str | None, typer.Option(help="Named module to read (default: the input of the last linear layer).")
    ] = None,
    minimize: Annotated[bool, typer.Option("--minimize", help="Minimize instead of maximize.")] = False,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Candidate initial prompt; repeat for several.")
    ] = None,
    select_samples: Annotated[int, typer.Option(help="Images per candidate prompt when choosing the start.")] = 8,
    candidates: Annotated[int, typer.Option(help="Prompts proposed from the last layer when none are given.")] = 3,
    model: ModelOpt = "CompVis/stable-diffusion-v1-4",
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="How many images (seeds) to make.")] = 1,
    seed: Annotated[int, typer.Option(help="First seed; image i uses seed + i.")] = 0,
    prompt_template: Annotated[str, typer.Option(help="Template for proposed prompts; {} is a class.")] = (
        "a photograph of a {}"
    ),
    ddim_steps: DdimStepsOpt = 20,
    guidance: GuidanceOpt = 3.0,
    steps: StepsOpt = 20,
    lr_latent: LrLatentOpt = 1e-3,
    lr_prompt: LrPromptOpt = None,
    lr_null: LrNullOpt = None,
    optimize_latent: OptLatentOpt = True,
    optimize_prompt: OptPromptOpt = True,
    optimize_null: OptNullOpt = True,
    loss_steps: LossStepsOpt = 3,
    cutouts: CutoutsOpt = 16,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    compile_unet: CompileOpt = False,
    out: OutOpt = Path("digin-out/neuron"),
    quiet: QuietOpt = False,
) -> None:
    """Show what a neuron (or feature direction) of a classifier looks for (paper section 6)."""
    from digin_cli.runs import NeuronJob, RuntimeOptions, run_neuron

    if num_images < 1:
        fail("--num-images must be at least 1")
    sampler, optim = _sampler_and_optim(ddim_steps, guidance, steps, lr_latent, lr_prompt, lr_null,
                                        optimize_latent, optimize_prompt, optimize_null, loss_steps, cutouts,
                                        seed)  # fmt: skip
    job = NeuronJob(
        classifier=classifier,
        out=out,
        seeds=list(range(seed, seed + num_images)),
        neuron=neuron_index,
        direction_file=direction,
        layer=layer,
        maximize=not minimize,
        prompts=list(prompt or []),
        num_candidates=candidates,
        select_samples=select_samples,
        prompt_template=prompt_template,
        batch_size=batch_size,
        runtime=RuntimeOptions(model=model, device=device, dtype=dtype, compile=compile_unet),
        sampler=sampler,
        optim=optim,
    )
    progress = None if quiet else RichProgress(stderr)
    try:
        record = run_job(run_neuron, job, progress)
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        config = record["config"]
        if config["selection_scores"]:
            stdout.print("start prompt chosen by mean activation:", highlight=False)
            for text, score in config["selection_scores"].items():
                mark = "*" if text == config["prompt"] else " "
                stdout.print(f" {mark} {score:+.3f}  {text}", highlight=False, markup=False)
        table = Table(title=f"neuron: {config['mode']} {config['neuron'] if config['neuron'] is not None else config['direction_file']}")
        for column in ("seed", "activation before", "activation after", "top class after", "best step"):
            table.add_column(column)
        for item in record["images"]:
            b, a = item["initial"], item["optimized"]
            table.add_row(str(item["seed"]), f"{b['activation']:.3f}", f"{a['activation']:.3f}",
                          f"{a['top_class_name']} {a['top_p']:.2f}", str(item["best_step"]))  # fmt: skip
        stdout.print(table)
    stdout.print(f"Wrote {len(record['images'])} image(s) and {record['json']}", highlight=False)


@app.command()
def uvce(
    inputs: InputsArg,
    classifier: Annotated[str, typer.Option("--classifier", help="Classifier to explain (spec, see README).")],
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Target class (name or index); repeat for several.")
    ] = None,
    source_class: Annotated[
        str | None, typer.Option("--source-class", help="Class of the image(s) (default: the classifier's prediction).")
    ] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option("--csv", help="For a folder: rows file,class[,target]; a header row may add a caption column. Overrides --source-class."),
    ] = None,
    caption: Annotated[
        str | None, typer.Option(help="Caption for inversion; must name the source class (default 'an image of a <class>').")
    ] = None,
    captioner: CaptionerOpt = None,
    mask: MaskOpt = None,
    sam_checkpoint: SamCheckpointOpt = None,
    sam_model_type: SamTypeOpt = None,
    p2p_fraction: Annotated[
        float, typer.Option("--p2p-fraction", help="Share of DDIM steps with injected cross-attention.")
    ] = 0.3,
    w_latent: Annotated[float, typer.Option("--w-latent", help="Weight of the latent background distance.")] = 25.0,
    w_pixel: Annotated[float, typer.Option("--w-pixel", help="Weight of the pixel background distance.")] = 250.0,
    model: ModelOpt = "CompVis/stable-diffusion-v1-4",
    seed: CutoutSeedOpt = 0,
    ddim_steps: DdimStepsOpt = 20,
    guidance: GuidanceOpt = 3.0,
    steps: StepsOpt = 20,
    lr_latent: LrLatentOpt = 1e-3,
    lr_prompt: LrPromptOpt = None,
    lr_null: LrNullOpt = None,
    optimize_latent: OptLatentOpt = True,
    optimize_prompt: OptPromptOpt = True,
    optimize_null: OptNullOpt = True,
    loss_steps: LossStepsOpt = 3,
    cutouts: CutoutsOpt = 16,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    out: OutOpt = Path("digin-out/uvce"),
    quiet: QuietOpt = False,
) -> None:
    """Visual counterfactuals of real images: what must change for the classifier to say TARGET (paper section 5)."""
    from digin_cli.counterfactuals import RealImageOptions, UvceJob, run_uvce
    from digin_cli.runs import RuntimeOptions

    sampler, optim = _sampler_and_optim(ddim_steps, guidance, steps, lr_latent, lr_prompt, lr_null,
                                        optimize_latent, optimize_prompt, optimize_null, loss_steps, cutouts,
                                        seed)  # fmt: skip
    job = UvceJob(
        classifier=classifier,
        inputs=inputs,
        targets=list(target or []),
        out=out,
        source_class=source_class,
        csv_file=csv_file,
        weight_latent=w_latent,
        weight_pixel=w_pixel,
        batch_size=batch_size,
        real=RealImageOptions(caption=caption, captioner=captioner, mask_file=mask, sam_checkpoint=sam_checkpoint,
                              sam_model_type=sam_model_type, p2p_fraction=p2p_fraction),
        runtime=RuntimeOptions(model=model, device=device, dtype=dtype),
        sampler=sampler,
        optim=optim,
    )  # fmt: skip
    progress = None if quiet else RichProgress(stderr)
    try:
        result = run_job(run_uvce, job, progress)
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        table = Table(title="uvce: p(target) before -> after, background kept")
        for column in ("file", "target", "p(target) before", "p(target) after", "flipped", "background PSNR", "status"):
            table.add_column(column)
        for item in result["items"]:
            if item.get("status") != "ok":
                table.add_row(Path(item["file"]).name, item.get("target", ""), "", "", "", "", item["status"])
                continue
            table.add_row(Path(item["file"]).name, item["target"], f"{item['p_target_before']:.3f}",
                          f"{item['p_target_after']:.3f}", "yes" if item["flipped"] else "no",
                          f"{item['background_psnr_db']:.1f} dB", "ok")  # fmt: skip
        stdout.print(table)
    done = sum(1 for item in result["items"] if item.get("status") == "ok")
    stdout.print(f"Wrote {done} counterfactual(s) and {Path(result['out']) / 'summary.jsonl'}", highlight=False)


@app.command("neuron-cf")
def neuron_cf(
    inputs: InputsArg,
    classifier: Annotated[str, typer.Option("--classifier", help="Classifier whose neuron is tested.")],
    neuron_index: Annotated[int | None, typer.Option("--neuron", "-u", help="Neuron index in the feature map.")] = None,
    direction: Annotated[
        Path | None, typer.Option("--direction", help="A .npy/.pt vector in feature space instead of one neuron.")
    ] = None,
    layer: Annotated[
        str | None, typer.Option(help="Named module to read (default: the input of the last linear layer).")
    ] = None,
    class_name: Annotated[
        str | None,
        typer.Option("--class", "-c", help="Class the neuron may be spurious for (default: the image's predicted class)."),
    ] = None,
    direction_mode: Annotated[str, typer.Option("--direction-mode", help="max, min or both.")] = "both",
    from_other_class: Annotated[
        bool, typer.Option("--from-other-class", help="Images of other classes: does maximizing the neuron trigger --class?")
    ] = False,
    source_class: Annotated[
        str | None, typer.Option("--source-class", help="With --from-other-class: what the images show (default: predicted).")
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="For a folder: rows file,class; a header row may add a caption column.")
    ] = None,
    caption: Annotated[str | None, typer.Option(help="Caption for inversion; must name the image's class.")] = None,
    captioner: CaptionerOpt = None,
    mask: MaskOpt = None,
    sam_checkpoint: SamCheckpointOpt = None,
    sam_model_type: SamTypeOpt = None,
    drop_threshold: Annotated[
        float, typer.Option(help="Flag as spurious when minimizing drops p(class) by at least this much.")
    ] = 0.3,
    object_error_ratio: Annotated[
        float,
        typer.Option(help="...and the object's squared error stays within this factor of the reconstruction's."),
    ] = 2.0,
    hold_object: Annotated[
        bool,
        typer.Option(
            help="Hold the object as reconstructed, on top of the distance term: its latents follow the reconstruction's "
            "at every DDIM step (blended latent diffusion) and the reconstruction is laid over each image by the mask; "
            "--no-hold-object keeps the object by the distance term alone, as the paper."
        ),
    ] = True,
    w_latent: Annotated[float, typer.Option("--w-latent", help="Weight of the latent object distance.")] = 25.0,
    w_pixel: Annotated[float, typer.Option("--w-pixel", help="Weight of the pixel object distance.")] = 250.0,
    model: ModelOpt = "CompVis/stable-diffusion-v1-4",
    seed: CutoutSeedOpt = 0,
    ddim_steps: DdimStepsOpt = 20,
    guidance: GuidanceOpt = 3.0,
    steps: StepsOpt = 20,
    lr_latent: LrLatentOpt = 1e-3,
    lr_prompt: LrPromptOpt = None,
    lr_null: LrNullOpt = None,
    optimize_latent: OptLatentOpt = True,
    optimize_prompt: OptPromptOpt = True,
    optimize_null: OptNullOpt = True,
    loss_steps: LossStepsOpt = 3,
    cutouts: CutoutsOpt = 16,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    compile_unet: CompileOpt = False,
    out: OutOpt = Path("digin-out/neuron-cf"),
    quiet: QuietOpt = False,
) -> None:
    """Neuron counterfactuals of real images: keep the object, raise or lower a neuron, flag spurious ones (paper section 6)."""
    from digin_cli.counterfactuals import NeuronCfJob, RealImageOptions, run_neuron_cf
    from digin_cli.runs import RuntimeOptions

    sampler, optim = _sampler_and_optim(ddim_steps, guidance, steps, lr_latent, lr_prompt, lr_null,
                                        optimize_latent, optimize_prompt, optimize_null, loss_steps, cutouts,
                                        seed)  # fmt: skip
    job = NeuronCfJob(
        classifier=classifier, inputs=inputs, out=out, neuron=neuron_index, direction_file=direction, layer=layer,
        class_name=class_name, source_class=source_class, csv_file=csv_file, direction_mode=direction_mode,
        from_other_class=from_other_class, drop_threshold=drop_threshold, object_error_ratio=object_error_ratio,
        hold_object=hold_object, weight_latent=w_latent, weight_pixel=w_pixel, batch_size=batch_size,
        real=RealImageOptions(caption=caption, captioner=captioner, mask_file=mask, sam_checkpoint=sam_checkpoint,
                              sam_model_type=sam_model_type),
        runtime=RuntimeOptions(model=model, device=device, dtype=dtype, compile=compile_unet), sampler=sampler,
        optim=optim,
    )  # fmt: skip
    progress = None if quiet else RichProgress(stderr)
    try:
        result = run_job(run_neuron_cf, job, progress)
    finally:
        if progress is not None:
            progress.close()
    if not quiet:
        table = Table(title="neuron-cf: activation and p(class), original -> max / min")
        for column in ("file", "class", "activation", "p(class)", "verdict"):
            table.add_column(column)
        for item in result["items"]:
            if item.get("status") != "ok":
                table.add_row(Path(item["file"]).name, "", "", "", item["status"])
                continue
            acts = " / ".join(f"{item[k]:.2f}" for k in ("activation_before", "activation_max", "activation_min") if k in item)
            probs = " / ".join(f"{item[k]:.2f}" for k in ("p_class_before", "p_class_max", "p_class_min") if k in item)
            verdict = item.get("verdict") or ("triggers the class" if item.get("triggers_class") else "does not trigger the class" if "triggers_class" in item else "")
            table.add_row(Path(item["file"]).name, item["class"], acts, probs, verdict)
        stdout.print(table)
    stdout.print(f"Flagged as spurious on {result['flagged']} of {result['judged']} image(s); wrote {Path(result['out']) / 'summary.jsonl'}", highlight=False)


@app.command()
def neurons(
    classifier: Annotated[str, typer.Option("--classifier", help="Classifier to inspect.")],
    class_name: Annotated[str, typer.Option("--class", "-c", help="Class whose logit is attributed.")],
    top: Annotated[int, typer.Option(help="How many neurons to list.")] = 10,
    samples: Annotated[int, typer.Option(help="Generated images of the class to average over.")] = 8,
    model: ModelOpt = "CompVis/stable-diffusion-v1-4",
    seed: Annotated[int, typer.Option(help="First seed of the generated images.")] = 0,
    prompt_template: Annotated[str, typer.Option(help="Prompt for the class images; {} is the class.")] = (
        "a photograph of a {}"
    ),
    ddim_steps: DdimStepsOpt = 20,
    guidance: GuidanceOpt = 3.0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the list to this JSON file.")] = None,
) -> None:
    """List the penultimate neurons that contribute most to a class logit (weight x mean activation)."""
    from digin_cli.engine import SamplerConfig
    from digin_cli.io import write_json
    from digin_cli.runs import NeuronSearchJob, RuntimeOptions, find_neurons

    if samples < 1 or top < 1:
        fail("--samples and --top must be at least 1")
    if "{}" not in prompt_template:
        fail(f"--prompt-template must contain {{}} where the class name goes, got '{prompt_template}'")
    job = NeuronSearchJob(classifier=classifier, class_name=class_name, top=top, samples=samples, seed=seed,
                          prompt_template=prompt_template,
                          runtime=RuntimeOptions(model=model, device=device, dtype=dtype),
                          sampler=SamplerConfig(num_steps=ddim_steps, guidance_scale=guidance))  # fmt: skip
    result = run_job(find_neurons, job)
    table = Table(title=f"neurons driving '{result['class_name']}' in {classifier} ({samples} images of '{result['prompt']}')")
    for column in ("neuron", "contribution", "weight", "mean activation"):
        table.add_column(column)
    for entry in result["neurons"]:
        table.add_row(str(entry["neuron"]), f"{entry['contribution']:+.3f}", f"{entry['weight']:+.3f}",
                      f"{entry['mean_activation']:.3f}")  # fmt: skip
    stdout.print(table)
    best = result["neurons"][0]["neuron"]
    stdout.print(f"Next: digin neuron --classifier {classifier} --neuron {best} --model {model}", highlight=False, markup=False)
    if json_out is not None:
        run_job(write_json, result, json_out)


@app.command()
def bench(
    out: OutOpt = Path("digin-out/bench"),
    shapes: Annotated[
        str | None, typer.Option(help="Comma-separated shapes to run (default: all of them).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Runs (seeds) per shape.")] = 4,
    steps: StepsOpt = 20,
    ddim_steps: DdimStepsOpt = 20,
    batch_size: BatchOpt = 8,
    uvce_seeds: Annotated[int, typer.Option(help="Scenes per shape for the uvce row.")] = 2,
    neuron_seeds: Annotated[int, typer.Option(help="Seeds per starting prompt for the neuron row.")] = 2,
    neuron_cf_seeds: Annotated[int, typer.Option(help="Scenes per mode (max, min, control) for the neuron-cf row.")] = 3,
    rows: Annotated[
        str | None, typer.Option(help="Comma-separated rows to run: disagree, neuron, uvce, neuron-cf (default: all).")
    ] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    perf: Annotated[
        bool, typer.Option("--perf", help="Run the performance benchmark instead (step cost, memory, batching).")
    ] = False,
    perf_resolution: Annotated[
        int | None, typer.Option(help="--perf: image side of the SD-sized pipeline [default: 512 on CUDA, else 128].")
    ] = None,
    perf_steps: Annotated[
        int | None, typer.Option(help="--perf: DDIM steps T [default: 20; 5 for the SD-sized pipeline on CPU].")
    ] = None,
    repeats: Annotated[int, typer.Option(help="--perf: timed repeats per figure (after one warm-up).")] = 3,
    pipelines: Annotated[
        str, typer.Option(help="--perf: comma-separated pipelines: shapes, sd1-random, or a model folder / hub id.")
    ] = "shapes,sd1-random",
    batch_sizes: Annotated[str, typer.Option(help="--perf: comma-separated batch sizes for throughput.")] = "1,2,4",
    feature_pipelines: Annotated[
        str, typer.Option(help="--perf: pipelines on which to time the speed features against their absence.")
    ] = "shapes,sd1-random",
) -> None:
    """Quality benchmark on the built-in shapes world, judged by ground truth (fixed seeds);
    with --perf, the performance benchmark."""
    if perf:
        _perf(out, device, perf_resolution, perf_steps, repeats, pipelines, batch_sizes, feature_pipelines, quiet)
        return
    from digin_cli.bench import ROWS, BenchConfig, run_bench
    from digin_cli.world.scenes import SHAPES

    chosen = [s.strip() for s in shapes.split(",")] if shapes else list(SHAPES)
    unknown = [s for s in chosen if s not in SHAPES]
    if unknown:
        fail(f"unknown shape(s) {', '.join(unknown)}; the shapes world has {', '.join(SHAPES)}")
    if min(seeds, uvce_seeds, neuron_seeds, neuron_cf_seeds) < 1:
        fail("--seeds, --uvce-seeds, --neuron-seeds and --neuron-cf-seeds must be at least 1")
    chosen_rows = [r.strip() for r in rows.split(",") if r.strip()] if rows is not None else list(ROWS)
    unknown_rows = [r for r in chosen_rows if r not in ROWS]
    if unknown_rows or not chosen_rows:
        fail(f"--rows: unknown or no row(s) '{rows}'; the rows are {', '.join(ROWS)}")
    config = BenchConfig(out=out, shapes=chosen, seeds_per_shape=seeds, steps=steps, ddim_steps=ddim_steps,
                         batch_size=batch_size, uvce_seeds=uvce_seeds, neuron_seeds=neuron_seeds,
                         neuron_cf_seeds=neuron_cf_seeds, rows=chosen_rows, device=device)  # fmt: skip
    progress = None if quiet else RichProgress(stderr)
    try:
        result = run_job(run_bench, config, progress)
    finally:
        if progress is not None:
            progress.close()
    table = Table(title="digin bench: shapes world, judged by ground truth")
    for column in ("row", "figure", "value"):
        table.add_column(column)
    for row in result["rows"]:
        for k, (figure, value) in enumerate({**row["headline"], "time": f"{row['seconds']:.0f} s"}.items()):
            table.add_row(row["row"] if k == 0 else "", figure, value)
    stdout.print(table)
    stdout.print(f"Wrote {result['json']} ({result['seconds']:.0f} s)", highlight=False)


def _perf(out: Path, device: str, resolution: int | None, steps: int | None, repeats: int, pipelines: str,
          batch_sizes: str, feature_pipelines: str, quiet: bool) -> None:  # fmt: skip
    from digin_cli.perf import PerfConfig, run_perf
    from digin_cli.runs import resolve_device

    chosen = [p.strip() for p in pipelines.split(",") if p.strip()]
    if not chosen:
        fail("--pipelines is empty; give shapes, sd1-random or a model")
    try:
        batches = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        fail(f"--batch-sizes must be comma-separated integers, got '{batch_sizes}'")
    if not batches or min(batches) < 1:
        fail("--batch-sizes needs at least one size, each 1 or more")
    if repeats < 1:
        fail("--repeats must be at least 1")
    if resolution is not None and (resolution < 64 or resolution % 64):
        fail(f"--perf-resolution must be a multiple of 64, got {resolution}")
    if steps is not None and steps < 3:
        fail("--perf-steps must be at least 3 (the loss reads the last 3 steps)")
    config = PerfConfig(out=out, device=device, pipelines=chosen, sd_resolution=resolution, ddim_steps=steps, repeats=repeats,
                        batch_sizes=batches, feature_pipelines=[p.strip() for p in feature_pipelines.split(",") if p.strip()])  # fmt: skip
    log = (lambda message: None) if quiet else (lambda message: stderr.print(message, highlight=False))
    result = run_job(lambda c, _progress: run_perf(c, resolve_device(c.device), log), config, None)
    table = Table(title=f"digin bench --perf on {result['machine']['device']} ({result['machine']['cpu']})")
    for column in ("pipeline", "px", "T", "forward s", "step s", "step/forward", "memory 4T/T", "images/s (batch)"):
        table.add_column(column)
    for row in result["rows"]:
        throughput = ", ".join(f"{v['images_per_second']:.2f} ({b})" for b, v in row["throughput"].items())
        table.add_row(row["pipeline"], str(row["resolution"]), str(row["ddim_steps"]), f"{row['forward_sample_seconds']:.3f}",
                      f"{row['optimization_step_seconds']:.3f}", f"{row['step_over_forward']:.2f}",
                      f"{row['memory']['ratio_above_loaded']:.2f}", throughput)  # fmt: skip
    stdout.print(table)
    stdout.print(f"Wrote {result['json']} ({result['seconds']:.0f} s)", highlight=False)


@app.command()
def models() -> None:
    """List the built-in offline models and classifiers, and the accepted spec forms."""
    from digin_cli.models.builtin import builtin_catalog

    catalog = builtin_catalog()
    table = Table(title="Built-in models (offline, no download)")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("what it is")
    for kind, entries in catalog.items():
        for name, description in entries:
            table.add_row(kind, name, description)
    stdout.print(table)
    stdout.print(
        "Also: --model <hub id or diffusers folder>; classifiers timm:NAME[,checkpoint=PATH][,classes=FILE], "
        "openclip:ARCH/PRETRAINED[,classes=FILE], torchscript:PATH,classes=FILE",
        highlight=False,
    )


def _version(value: bool) -> None:
    if value:
        stdout.print(f"digin {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Explain image classifiers by optimizing the inputs of a latent diffusion model (DiG-IN)."""


def main() -> None:
    if not os.environ.get("DIGIN_DEBUG"):
        # Libraries report through logging and warnings (retries, deprecations, a root
        # ERROR line from open_clip before it raises); digin reports every problem itself
        # as one `Error:` line, so their messages only bury it. DIGIN_DEBUG=1 shows them.
        logging.getLogger().addHandler(logging.NullHandler())
        warnings.filterwarnings("ignore")
    app()
