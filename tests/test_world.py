"""The shipped shapes world: loaders, trained models, and a smoke run of the benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from digin_cli.cli import app
from digin_cli.engine import GuidedDDIM, SamplerConfig, initial_latents
from digin_cli.models import load_classifier, load_diffusion
from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.world.scenes import SHAPES, judge_colours
from digin_cli.world.train_classifiers import RECIPES, evaluate, make_scenes


def test_shipped_pipeline_loads_through_the_diffusers_loader():
    components = load_diffusion("shapes")
    assert components.resolution == 64
    assert components.unet.dtype == torch.float32  # stored fp16, optimized in fp32
    ids = components.tokenizer("a photograph of a red circle on sand").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 10  # real CLIP BPE, one token a word


@pytest.mark.parametrize("name", ["oracle", "color-biased", "background-biased", "oracle-2"])
def test_shipped_classifiers_reproduce_their_documented_accuracy(name):
    classifier = load_classifier(f"shapes:{name}")
    assert classifier.class_names == list(SHAPES) and classifier.input_size == (64, 64)
    meta = shapes_classifier_meta(name)
    scenes = make_scenes(200, meta["bias"], seed=meta["eval"]["seed"] + 7)
    accuracy = evaluate(classifier, scenes)
    assert accuracy == pytest.approx(meta["accuracy"]["in_distribution"], abs=0.05)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.name)
def test_each_shipped_classifier_is_what_its_recipe_trains(recipe):
    """`python -m digin_cli.world.train_classifiers` must make what ships: the settings
    recorded in each meta.json are the recipe's (the activation too, which the loader
    reads from there: background-biased has leaky ReLUs, the others timm's own)."""
    meta = shapes_classifier_meta(recipe.name)
    assert (meta["arch"], meta["seed"], meta["train_steps"], meta["train_scenes"]) == (
        recipe.arch, recipe.seed, recipe.steps, recipe.train_scenes)  # fmt: skip
    assert meta.get("act_layer") == recipe.act_layer and meta.get("mixup_alpha", 0.0) == recipe.mixup_alpha
    assert (recipe.name == "background-biased") == (recipe.act_layer == "leaky_relu")


def test_the_independent_judge_sees_shapes_of_every_size_a_result_may_draw():
    """oracle-2 judges counterfactuals whose new shape may be smaller or larger than the
    world's (a circle drawn inside a star's core): trained on JUDGE_RADIUS_RANGE it is right on
    rendered scenes across that range, where the oracle, trained on the world's sizes alone,
    misses the small ones (no rendered circle of radius 0.1-0.14 is a circle to it)."""
    from digin_cli.world.train_classifiers import JUDGE_RADIUS_RANGE

    judge, oracle = load_classifier("shapes:oracle-2"), load_classifier("shapes:oracle")
    assert shapes_classifier_meta("oracle-2")["radius_range"] == list(JUDGE_RADIUS_RANGE)
    scenes = make_scenes(200, None, seed=12_345, radius_range=JUDGE_RADIUS_RANGE)
    assert evaluate(judge, scenes) >= 0.97
    small_circles = make_scenes(400, None, seed=23_456, radius_range=(0.1, 0.14))
    small_circles = [s for s in small_circles if s.shape == "circle"]
    assert len(small_circles) >= 60
    assert evaluate(judge, small_circles) >= 0.95 and evaluate(oracle, small_circles) <= 0.1


def test_biased_classifiers_are_biased_and_the_oracle_is_not():
    names = ("oracle", "color-biased", "background-biased")
    broken = {name: shapes_classifier_meta(name)["accuracy"]["correlation_broken"] for name in names}
    assert broken["oracle"]["colour"] > 0.95 and broken["oracle"]["background"] > 0.95
    assert broken["color-biased"]["colour"] < 0.8
    assert broken["background-biased"]["background"] < 0.8


def test_disagreement_exists_where_the_colour_biased_classifier_has_its_shortcut():
    """The disagree row's ceiling: a classifier never disagrees with itself, and the shipped
    colour-biased one fails on bars wearing the triangle's colour but sees circles of any colour
    (which is why the row's circle runs rarely succeed; the README's figures)."""
    from digin_cli.bench.disagree_row import disagreement_exists

    oracle, biased = load_classifier("shapes:oracle"), load_classifier("shapes:color-biased")
    itself = disagreement_exists(oracle, oracle, ["bar"], per_colour=20)
    assert itself["bar"]["share"] == 0.0
    exists = disagreement_exists(oracle, biased, ["circle", "bar"], per_colour=40)
    assert exists["bar"]["by_colour"]["blue"] >= 0.9 and exists["bar"]["by_colour"]["green"] == 0.0
    assert exists["circle"]["share"] <= 0.1


def test_documented_background_neuron_responds_to_its_background():
    meta = shapes_classifier_meta("background-biased")["background_neuron"]
    classifier = load_classifier("shapes:background-biased")
    from digin_cli.world.train_classifiers import render_batch
    from digin_cli.world.scenes import sample_scene

    rng = np.random.default_rng(5)
    on = [sample_scene(rng, background=meta["background"]) for _ in range(16)]
    off = [sample_scene(rng, background=b) for b in ("sand", "water", "grass", "snow") if b != meta["background"]
           for _ in range(6)]  # fmt: skip
    with torch.no_grad():
        a_on = classifier.features(render_batch(on))[:, meta["index"]].mean()
        a_off = classifier.features(render_batch(off))[:, meta["index"]].mean()
    assert a_on > 5 * a_off + 0.1


@torch.no_grad()
def test_generation_draws_the_prompted_shape_and_colour():
    components = load_diffusion("shapes")
    engine = GuidedDDIM(components)
    oracle = load_classifier("shapes:oracle")
    prompts = [f"a photograph of a {c} {s} on {b}" for s, c, b in
               (("circle", "red", "sand"), ("bar", "blue", "snow"), ("triangle", "yellow", "water"), ("star", "green", "snow"))]  # fmt: skip
    seeds = list(range(len(prompts)))
    images = engine.sample(
        initial_latents(components, seeds), engine.encode_text(prompts),
        engine.encode_text([""] * len(prompts)), SamplerConfig(num_steps=20, guidance_scale=3.0),
    )  # fmt: skip
    shapes = [SHAPES[i] for i in oracle(images).argmax(1).tolist()]
    pixels = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    colours = [judge_colours(p).colour for p in pixels]
    assert sum(s == p.split()[-3] for s, p in zip(shapes, prompts)) >= 3, shapes
    assert sum(c == p.split()[-4] for c, p in zip(colours, prompts)) >= 3, colours


def test_bench_smoke_run(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--out", str(out), "--shapes", "circle", "--seeds", "1", "--steps", "1",
            "--ddim-steps", "4", "--batch-size", "1", "--uvce-seeds", "1", "--neuron-seeds", "1", "--neuron-cf-seeds", "1",
            "--device", "cpu", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "bench.json").read_text())
    generator, disagree, neuron, uvce, neuron_cf, directions = record["rows"]
    # The generator row: every prompt, twice, each judge's count behind its rate.
    assert generator["runs"] == 128 and sum(s["images"] for s in generator["by_shape"].values()) == 128
    for judge, key in (("oracle", "shape_by_oracle"), ("oracle-2", "shape_by_oracle_2"), ("geometry", "shape_by_geometry")):
        assert generator["rates"][key]["successes"] == sum(s[judge] for s in generator["by_shape"].values())
    assert disagree["runs"] == 1 and set(disagree["per_shape"]) == {"circle"}
    assert disagree["success_rate"] == disagree["per_shape"]["circle"]["success_rate"] in (0.0, 1.0)
    assert neuron["maximize"]["runs"] == 1 and neuron["minimize"]["runs"] == 1
    assert uvce["runs"] == 1 and uvce["items"][0]["target"] == "bar"
    item = uvce["items"][0]
    assert uvce["flip_rate"] == float(item["oracle"] == "bar")
    assert uvce["agreement_rate"] == float(item["oracle"] == item["oracle_2"] == "bar")
    # At 4 DDIM steps the searched fractions 0.3, 0.4 and 0.5 all round up to 2 injected steps.
    assert item["p2p_inject_steps"] == 2 and uvce["p2p_inject_steps_taken"] == {"2": 1}
    assert neuron_cf["runs"] == 3 and neuron_cf["neuron"] == shapes_classifier_meta("background-biased")["background_neuron"]["index"]
    assert neuron_cf["control_flagged_rate"] in (0.0, 1.0) and neuron_cf["flagged_rate"] in (0.0, 1.0)
    assert neuron_cf["control_cleared_rate"] + neuron_cf["control_flagged_rate"] <= 1.0
    assert "revealed shortcut" in result.output
    # Every headline rate carries its runs and its 95% Wilson interval, consistent with the items.
    assert disagree["rates"]["success"]["runs"] == 1 and disagree["rates"]["success"]["rate"] == disagree["success_rate"]
    # A success needs f and g, and both independent judges to see the class.
    circle = disagree["per_shape"]["circle"]
    f_and_g = disagree["rates"]["f_and_g_only"]["successes"]
    judged = circle["oracle_2_classes"] + circle["geometry_shapes"]
    assert len(judged) == 2 and circle["f_and_g_rate"] == f_and_g
    assert disagree["rates"]["success"]["successes"] == int(f_and_g == 1 and judged == ["circle", "circle"])
    # Successes from starts not already apart: the run counts there only if its start was not a success by p_f, p_g.
    fresh = disagree["rates"]["success_from_fresh_starts"]
    assert fresh["runs"] == 1 - disagree["rates"]["success_before_optimization"]["successes"]
    assert fresh["successes"] == (disagree["rates"]["success"]["successes"] if fresh["runs"] else 0)
    assert "geometric shape judge" in disagree["criterion"]
    assert circle["disagreement_exists_share"] == pytest.approx(sum(circle["disagreement_exists_by_colour"].values()) / 4)
    assert uvce["rates"]["flip"]["successes"] == int(item["oracle"] == "bar")
    low, high = uvce["rates"]["flip"]["interval_95"]
    assert (low, high) == ((0.2065, 1.0) if uvce["flip_rate"] == 1.0 else (0.0, 0.7935))
    assert neuron["maximize"]["rates"]["background_judged"]["runs"] == 1
    assert neuron_cf["rates"]["control_cleared"]["rate"] == neuron_cf["control_cleared_rate"]
    assert "95% CI" in json.dumps(record["rows"][0]["headline"])
    # uvce: the shape judge and the reconstruction's own background PSNR beside the counterfactual's.
    assert uvce["rates"]["shape_judge_agrees"]["successes"] == int(item["oracle"] == item["geometry"] == "bar")
    assert item["reconstruction_background_psnr_db"] > item["background_psnr_db"] - 15
    # directions: components judged on fresh scenes; the planted one maximized when found.
    assert [c["component"] for c in directions["components"]] == [0, 1, 2]
    planted = directions["planted_component"]
    assert planted is None or directions["components"][planted]["auc"] >= 0.95
    assert directions["maximize"]["runs"] == (1 if planted is not None else 0)


def test_bench_runs_per_rate_set_every_rows_seeds(tmp_path):
    from digin_cli.bench.config import BenchConfig

    default, full = BenchConfig(out=tmp_path), BenchConfig(out=tmp_path, runs=48)
    # 4 shapes / 4 starting prompts share the runs; neuron-cf has them per mode.
    assert (default.seeds_per_shape, default.neuron_seeds, default.uvce_seeds, default.neuron_cf_seeds) == (4, 4, 4, 16)
    assert (full.seeds_per_shape, full.neuron_seeds, full.uvce_seeds, full.neuron_cf_seeds) == (12, 12, 12, 48)
    assert BenchConfig(out=tmp_path, runs=48, uvce_seeds=2).uvce_seeds == 2  # an explicit option wins


def test_bench_empties_its_row_folders(tmp_path, monkeypatch):
    from digin_cli.bench import quality as bench

    stale = tmp_path / "uvce" / "scenes" / "old_scene.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier bench")
    keep = tmp_path / "notes.txt"
    keep.write_text("the user's")
    seen = []
    monkeypatch.setattr(bench, "ROWS", {"uvce": lambda config, progress=None: seen.append(stale.exists()) or {"row": "uvce", "headline": {}}})
    bench.run_bench(bench.BenchConfig(out=tmp_path, rows=["uvce"], jobs=1))  # in this process: the patched rows
    assert seen == [False] and keep.read_text() == "the user's"


def test_bench_rejects_unknown_shapes(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--shapes", "hexagon"])
    assert result.exit_code != 0 and "unknown shape(s) hexagon" in result.stderr
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--rows", "neuron,nuvce"])
    assert result.exit_code != 0 and "the rows are generator, disagree, neuron, uvce, neuron-cf, directions" in result.stderr
    assert not (tmp_path / "bench.json").exists()


def test_bench_runs_a_candidate_world_model_and_another_g(tmp_path, monkeypatch):
    # --model: a retrained world's folder is benched before it replaces the shipped weights;
    # --disagree-g: the disagree row against another g. Both reach the rows and bench.json.
    from digin_cli.bench import generator_row

    folder = tmp_path / "candidate"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    models = []

    def fake_evaluation(seeds, sampler, device, model, seed_offset):
        models.append(model)
        assert seed_offset == 1_000_000  # the test split's seeds
        return {"images": 4, "recognised": {"oracle": 3, "oracle-2": 2, "geometry": 1}, "colours_correct": 4,
                "backgrounds_correct": 4, "by_shape": {}}  # fmt: skip

    monkeypatch.setattr(generator_row, "evaluate_generation", fake_evaluation)
    out = tmp_path / "out"
    args = ["bench", "--out", str(out), "--rows", "generator", "--model", str(folder), "--disagree-g", "shapes:oracle-2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "bench.json").read_text())
    assert models == [str(folder)] and record["rows"][0]["row"] == f"generator: the {folder} model, every prompt"
    assert record["config"]["model"] == str(folder) and record["config"]["disagree_g"] == "shapes:oracle-2"
    assert record["rows"][0]["rates"]["shape_by_oracle"]["successes"] == 3
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out2"), "--model", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "--model" in result.stderr and "model_index.json" in result.stderr
    assert not (tmp_path / "out2" / "bench.json").exists()


def test_bench_runs_only_the_chosen_rows(tmp_path, monkeypatch):
    from digin_cli.bench import quality as bench

    ran = []

    def fake(name):
        def row(config, progress=None):
            ran.append(name)
            return {"row": name, "headline": {}}

        return row

    monkeypatch.setattr(bench, "ROWS", {name: fake(name) for name in bench.ROWS})
    result = bench.run_bench(bench.BenchConfig(out=tmp_path, rows=["neuron-cf", "disagree"], jobs=1))
    assert ran == ["disagree", "neuron-cf"]  # in the benchmark's order, not the option's
    assert [row["row"] for row in result["rows"]] == ran and result["config"]["rows"] == ran
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["rows"] == ran


def test_bench_rows_at_once_give_what_one_process_gives(tmp_path):
    # Two real rows, small: in two spawned processes and in this one, at one torch thread
    # each (the same arithmetic), the same figures in the benchmark's order; only the
    # seconds differ. Stale files in a row folder are gone either way.
    from digin_cli.bench import quality as bench

    def small(out, jobs):
        return bench.BenchConfig(out=out, rows=["directions", "neuron"], steps=1, ddim_steps=3, neuron_seeds=1,
                                 directions_images=8, batch_size=4, device="cpu", jobs=jobs)  # fmt: skip

    stale = tmp_path / "two" / "neuron" / "old.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        two = bench.run_bench(small(tmp_path / "two", 2))
        one = bench.run_bench(small(tmp_path / "one", 1))
    finally:
        torch.set_num_threads(threads)
    assert (two["config"]["jobs"], one["config"]["jobs"]) == (2, 1)
    assert [row["row"] for row in two["rows"]] == [row["row"] for row in one["rows"]]
    assert one["rows"][0]["row"].startswith("neuron") and one["rows"][1]["row"].startswith("directions")
    for a, b in zip(two["rows"], one["rows"]):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    assert not stale.exists() and (tmp_path / "two" / "neuron" / "maximize").is_dir()


def test_bench_row_error_in_a_process_is_one_line(tmp_path):
    # 2 DDIM steps with the 3 loss steps of the reference: each row's engine refuses it, in
    # its own process; the parent says so in one line, stops the other row, writes no bench.json.
    args = ["bench", "--out", str(tmp_path), "--rows", "neuron,directions", "--ddim-steps", "2", "--steps", "1",
            "--neuron-seeds", "1", "--directions-images", "8", "--device", "cpu", "--jobs", "2", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --loss-steps must be between 1 and --ddim-steps (2)") and "Traceback" not in result.stderr
    assert not (tmp_path / "bench.json").exists()


def test_bench_jobs_default_and_bounds(tmp_path):
    from digin_cli.bench import quality as bench

    assert bench.bench_jobs(bench.BenchConfig(out=tmp_path, device="cpu"), rows=6) == min(2, bench._cores())
    assert bench.bench_jobs(bench.BenchConfig(out=tmp_path, device="cpu", jobs=4), rows=3) == 3
    assert bench.bench_jobs(bench.BenchConfig(out=tmp_path, device="cpu"), rows=1) == 1
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--jobs", "0"])
    assert result.exit_code != 0 and "--jobs must be at least 1" in result.stderr
    # The help says the default (rich reads "[default: ...]" in a help text as markup and drops it).
    shown = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "250"}).output
    assert "(default: 2 on a CPU, 1 on a GPU)" in shown and "(default: 512 on CUDA, else 128)" in shown


def _recipes_trained_by_main(monkeypatch) -> list:
    """Make `train_classifiers.main` record the recipes it would train instead of training them."""
    from digin_cli.world import train_classifiers

    trained = []
    monkeypatch.setattr(train_classifiers, "EvalSets", lambda: None)
    monkeypatch.setattr(train_classifiers, "train_and_save", lambda recipe, out, eval_sets, log: (
        trained.append(recipe), (out / recipe.name).mkdir(), (out / recipe.name / "model.safetensors").write_bytes(b"x"),
        {"train_seconds": 0, "accuracy": {}})[-1])  # fmt: skip
    return trained


def test_train_classifiers_planted_share_overrides_the_biased_recipes_only(tmp_path, monkeypatch):
    from digin_cli.world import train_classifiers

    trained = _recipes_trained_by_main(monkeypatch)
    train_classifiers.main(["--out", str(tmp_path), "--only", "color-biased", "--only", "oracle", "--planted-share", "1.0"])
    assert [(r.name, r.planted_share) for r in trained] == [("oracle", 0.95), ("color-biased", 1.0)]
    assert train_classifiers.RECIPES[1].planted_share == 0.97  # the shipped recipe is left as it is


def test_mixup_training_is_reproducible_and_blends_the_images(tmp_path, monkeypatch):
    from dataclasses import replace

    from digin_cli.world import train_classifiers

    # A few steps on a few scenes: the same recipe gives the same weights twice (timm's
    # Mixup draws from numpy's global generator, which train seeds), and other weights
    # than the same recipe without mixup (so the blends reach the model).
    recipe = replace(train_classifiers.RECIPES[2], steps=3, train_scenes=64, batch_size=8, mixup_alpha=0.4)
    torch.set_num_threads(1)
    np.random.seed(123)  # what came before must not matter
    first = train_classifiers.train(recipe, log=lambda line: None).state_dict()
    np.random.seed(456)
    second = train_classifiers.train(recipe, log=lambda line: None).state_dict()
    plain = train_classifiers.train(replace(recipe, mixup_alpha=0.0), log=lambda line: None).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], plain[k]) for k in first if first[k].is_floating_point())

    trained = _recipes_trained_by_main(monkeypatch)
    train_classifiers.main(["--out", str(tmp_path), "--only", "background-biased", "--mixup-alpha", "0.4", "--steps", "1800",
                            "--act-layer", "leaky_relu"])  # fmt: skip
    assert [(r.name, r.mixup_alpha, r.steps, r.act_layer) for r in trained] == [("background-biased", 0.4, 1800, "leaky_relu")]
    assert train_classifiers.RECIPES[2].mixup_alpha == 0.0  # no shipped recipe uses it


def test_neuron_row_states_no_gain_factor_from_a_start_at_or_below_zero(tmp_path, monkeypatch):
    from digin_cli.bench import neuron_row as row
    from digin_cli.bench.config import BenchConfig

    # A leaky unit starts just below 0: a factor would be meaningless (and was printed "xNone").
    seen = {True: [(-0.01, 0.6, "water"), (-0.01, 0.4, "sand")], False: [(1.2, 0.1, "sand"), (1.0, 0.2, "water")]}
    monkeypatch.setattr(row, "neuron_runs", lambda config, progress, out, background, maximize, neuron: seen[maximize])
    result = row.neuron_row(BenchConfig(out=tmp_path))
    assert result["maximize"]["gain_factor"] is None
    assert result["headline"]["max: activation gain"] == "(-0.01 -> 0.50)"
    assert result["minimize"]["rates"]["lowered"]["successes"] == 2


def test_a_shapes_classifier_trained_with_another_activation_loads_with_it(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from digin_cli.models import builtin
    from digin_cli.world.train_classifiers import normalize

    # meta.json's act_layer reaches the loader: the same weights in ReLUs would answer otherwise.
    torch.manual_seed(0)
    leaky = timm.create_model("test_resnet", pretrained=False, num_classes=4, act_layer="leaky_relu").eval()
    folder = tmp_path / "classifiers" / "leaky"
    folder.mkdir(parents=True)
    save_file(leaky.state_dict(), str(folder / "model.safetensors"))
    (tmp_path / "classifiers" / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    meta = {"arch": "test_resnet", "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "act_layer": "leaky_relu"}
    (folder / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(builtin, "SHAPES_WEIGHTS", tmp_path)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(builtin.load_shapes_classifier("shapes:leaky", "cpu")(images), leaky(normalize(images)))
