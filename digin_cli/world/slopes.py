"""Does a shapes-world diffusion model give the optimization a slope between backgrounds?

DiG-IN moves an image by gradient steps through the decoder and, for the prompt
deltas, through the UNet's text conditioning. A generator that has learned a world of
four background textures can become categorical: it snaps every input to one of them,
and between the jumps the classifier's gradient is zero. This measures, on rendered
scenes of the planted shape on the documented neuron's background (the scenes the
neuron-cf row lowers the neuron on; `meta.json` names it: grass since the classifier
has leaky ReLUs, water before), that neuron of `shapes:background-biased` along two
straight lines towards another background:

- latent: the VAE decodes (1 - t) E(x_on) + t E(x_other), E the encoder's mean;
- caption: x_on is DDIM-inverted with its caption (guidance 1), then the same z_T is
  sampled at guidance 3 with (1 - t) C("... on <its background>") + t C("... on <other>").

For each line it reports the activations and the largest single fall between
neighbouring points as a share of the whole fall (1: one jump; 1 / (points - 1): an
even ramp).

`--pixels` asks the classifier alone which way is uphill from the neuron row's starts
(each shape in its row colour, off the neuron's background): the neuron, or a
`digin directions` component (`--direction FILE`), along pixel blends of a rendered
scene towards the same scene on each other background. Where another background raises
it as early as the neuron's own does, the optimization may turn the scene there instead.

    python -m digin_cli.world.slopes [--model DIR] [--scenes 4] [--points 11] [--json out.json]
    python -m digin_cli.world.slopes --pixels [--direction FILE] [--scenes 4] [--points 11]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from digin_cli.engine import GuidedDDIM, SamplerConfig
from digin_cli.engine.loop import per_step
from digin_cli.inversion import ddim_inversion, encode_image
from digin_cli.models import load_diffusion
from digin_cli.errors import DiginError
from digin_cli.models.builtin import load_shapes_classifier, shapes_classifier_meta
from digin_cli.objectives import FeatureMap, NeuronObjective
from digin_cli.tasks.neuron_target import neuron_target
from digin_cli.tasks.runtime import sampling_components
from digin_cli.world.scenes import BACKGROUNDS, one_start_per_shape, sample_scene
from digin_cli.world.train_classifiers import render_batch

OTHER_BACKGROUNDS = ("grass", "sand", "snow")
SCENE_SEED = 9000  # scene i: np.random.default_rng(SCENE_SEED + i); its partner SCENE_SEED + 100 + i
MIN_FALL = 0.2  # a line whose falls add up to less has no jump share to speak of


def jump_share(activations: list[float]) -> float | None:
    """The largest fall between neighbouring points as a share of all the falls; None where
    they add up to less than MIN_FALL (the line hardly falls at all)."""
    falls = [max(a - b, 0.0) for a, b in zip(activations, activations[1:])]
    return round(max(falls) / sum(falls), 3) if sum(falls) >= MIN_FALL else None


@torch.no_grad()
def measure_slopes(model: str = "shapes", scenes: int = 4, points: int = 11, ddim_steps: int = 8) -> dict:
    # 1. The model, the classifier and its documented background neuron.
    sampler = SamplerConfig(num_steps=ddim_steps, guidance_scale=3.0, timestep_spacing="trailing")
    components = sampling_components(load_diffusion(model), sampler)
    engine = GuidedDDIM(components, device=torch.device("cpu"))
    classifier = load_shapes_classifier("shapes:background-biased", "cpu")
    documented = shapes_classifier_meta("background-biased")["background_neuron"]
    neuron, home = documented["index"], documented["background"]
    others = [b for b in OTHER_BACKGROUNDS if b != home] or list(OTHER_BACKGROUNDS)

    def activations(images: torch.Tensor) -> list[float]:  # (points, 3, H, W) in [0, 1]
        features, _ = classifier.features_and_logits(images)
        return [round(v, 3) for v in features[:, neuron].tolist()]

    ts = torch.linspace(0, 1, points).view(-1, 1, 1, 1)  # (points, 1, 1, 1)
    null = per_step(engine.null_embedding(), ddim_steps)
    rows = []
    for i in range(scenes):
        # 2. A rendered bar on the neuron's background and one on another background.
        other = others[i % len(others)]
        scene = sample_scene(np.random.default_rng(SCENE_SEED + i), shape="bar", background=home)
        partner = sample_scene(np.random.default_rng(SCENE_SEED + 100 + i), shape="bar", background=other)
        x_home, x_other = render_batch([scene, partner]).split(1)  # (1, 3, 64, 64) each, in [0, 1]
        z_home, z_other = encode_image(engine, x_home), encode_image(engine, x_other)  # (1, 4, h, w), scaled

        # 3. The latent line, through the decoder alone.
        latent_line = activations(engine.decode((1 - ts) * z_home + ts * z_other))

        # 4. The caption line, through the UNet's text conditioning.
        c_home = engine.encode_text([f"a photograph of a {scene.colour} bar on {home}"])  # (1, 77, d)
        c_other = engine.encode_text([f"a photograph of a {scene.colour} bar on {other}"])
        z_t = ddim_inversion(engine, z_home, c_home, ddim_steps)[-1]
        decoded = []
        for t in ts.view(-1).tolist():
            z_0, _ = engine.run_chain(z_t, per_step((1 - t) * c_home + t * c_other, ddim_steps), null, 3.0)
            decoded.append(engine.decode(z_0))
        caption_line = activations(torch.cat(decoded))
        rows.append({"colour": scene.colour, "towards": other,
                     "latent": latent_line, "latent_jump_share": jump_share(latent_line),
                     "caption": caption_line, "caption_jump_share": jump_share(caption_line)})  # fmt: skip
    # 5. Per line kind: the mean largest-fall share over the scenes whose line falls.
    summary = {}
    for line in ("latent", "caption"):
        shares = [row[f"{line}_jump_share"] for row in rows]
        falling = [share for share in shares if share is not None]
        summary[line] = {"mean_jump_share": round(float(np.mean(falling)), 3) if falling else None,
                         "hardly_fall": len(shares) - len(falling)}  # fmt: skip
    return {"model": model, "neuron": neuron, "background": home, "points": points, "ddim_steps": ddim_steps,
            "scenes": rows, "summary": summary}  # fmt: skip


@torch.no_grad()
def pixel_lines(scenes: int = 4, points: int = 11, direction_file: Path | None = None) -> dict:
    """The documented neuron (or a direction's projection) along pixel blends from each of the
    neuron row's starts towards the same rendered scenes on every other background.

    Returns {"starts": [{"start": "red circle on sand", "towards": {background: [mean value
    per point]}}], ...}; the classifier alone, no diffusion model."""
    # 1. The classifier and what `digin neuron` maximizes on it: the neuron, or the
    #    projection of its features on the (checked) direction.
    classifier = load_shapes_classifier("shapes:background-biased", "cpu")
    documented = shapes_classifier_meta("background-biased")["background_neuron"]
    neuron, home = documented["index"], documented["background"]
    feature_map = FeatureMap(classifier)
    direction = neuron_target(feature_map, feature_map.width(), neuron, direction_file, "cpu")
    objective = NeuronObjective(feature_map, neuron=neuron if direction is None else None, direction=direction)
    # 2. From each of the neuron row's starts (off the neuron's background) towards the
    #    same scenes on every other background.
    ts = np.linspace(0.0, 1.0, points)
    rows = []
    for k, (shape, colour, start) in enumerate(one_start_per_shape(home, on=False)):
        rng = np.random.default_rng(SCENE_SEED + 1000 * (k + 1))
        starts = [sample_scene(rng, shape=shape, colour=colour, background=start) for _ in range(scenes)]
        x_start = render_batch(starts)  # (S, 3, 64, 64)
        towards = {}
        for target in [b for b in BACKGROUNDS if b != start]:
            x_end = render_batch([dataclasses.replace(scene, background=target) for scene in starts])
            blends = torch.cat([(1 - t) * x_start + t * x_end for t in ts])  # (points * S, 3, 64, 64)
            values, _ = objective.activation(blends[:, None])  # (points * S,): one view each
            towards[target] = [round(v, 3) for v in values.view(points, scenes).mean(dim=1).tolist()]
        rows.append({"start": f"{colour} {shape} on {start}", "towards": towards})
    what = f"neuron {neuron}" if direction_file is None else f"direction {direction_file}"
    return {"measured": what, "background": home, "points": points, "scenes": scenes, "starts": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m digin_cli.world.slopes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="diffusion model folder (default: the shipped shapes model)")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--pixels", action="store_true", help="the classifier alone, on pixel blends (see above)")
    parser.add_argument("--direction", type=Path, default=None, help="with --pixels: a digin directions .npy")
    args = parser.parse_args(argv)
    if args.points < 2 or args.scenes < 1:
        parser.error("--points must be at least 2 and --scenes at least 1")
    if args.direction is not None and not args.pixels:
        parser.error("--direction needs --pixels")
    if args.pixels:
        try:
            result = pixel_lines(args.scenes, args.points, args.direction)
        except DiginError as error:  # a direction file that is missing or of the wrong length
            parser.error(f"--direction: {error}")
        for row in result["starts"]:
            for target, values in row["towards"].items():
                print(f"{result['measured']}, {row['start']} -> {target}: " + " ".join(f"{v:.2f}" for v in values))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    result = measure_slopes(args.model, args.scenes, args.points)
    for row in result["scenes"]:
        for line in ("latent", "caption"):
            values = " ".join(f"{v:.2f}" for v in row[line])
            share = row[f"{line}_jump_share"]
            verdict = "hardly falls" if share is None else f"largest fall {share:.0%} of the whole"
            print(f"{row['colour']} bar, {result['background']} -> {row['towards']}, {line:7s} line: {values} ({verdict})")
    for line, figures in result["summary"].items():
        mean = "-" if figures["mean_jump_share"] is None else f"{figures['mean_jump_share']:.0%}"
        print(f"{line} lines: mean largest-fall share {mean}; {figures['hardly_fall']} of {args.scenes} hardly fall")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
