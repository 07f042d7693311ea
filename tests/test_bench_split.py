"""The benchmark's seed splits and its claims (issue 38): dev and test share no seed, scene or
start at any size the bench runs, dev keeps the seeds everything so far was tuned on, and a
row's claimed / confirmed / precision are the counts its run folders' records state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from digin_cli.bench import directions_row, disagree_row, generator_row, neuron_cf_row, neuron_row, uvce_row
from digin_cli.bench.claims import JUDGE
from digin_cli.bench.config import FULL_RUNS, MAX_SEEDS, SPLIT_OFFSET, BenchConfig
from digin_cli.cli import app
from digin_cli.errors import DiginError
from digin_cli.world.scenes import COLOURS, SHAPES, one_start_per_shape, sample_scene


def _splits(tmp_path, **settings) -> tuple[BenchConfig, BenchConfig]:
    """The dev and the test config at --full size (the most seeds a bench draws by default)."""
    return (BenchConfig(out=tmp_path, runs=FULL_RUNS, split="dev", **settings),
            BenchConfig(out=tmp_path, runs=FULL_RUNS, split="test", **settings))  # fmt: skip


def _exists_seeds(config: BenchConfig) -> set[int]:
    """The disagree row's "a disagreement exists" scene seeds (disagreement_exists: first + 10 * shape + colour)."""
    first = config.seed(disagree_row.EXISTS_FIRST_SEED)
    return {first + 10 * k + c for k in range(len(SHAPES)) for c in range(len(COLOURS))}


def _row_seeds(config: BenchConfig) -> dict[str, set]:
    """Every seed and start of every row on the config's split, by what it seeds."""
    background = "grass"
    return {
        "generator row seeds": set(generator_row.generator_seeds(config)),
        "disagree generator seeds": set(disagree_row.disagree_seeds(config)),
        "disagree exists scenes": _exists_seeds(config),
        "uvce scenes": set(uvce_row.scene_seeds(config).values()),
        "neuron-cf scenes": set(neuron_cf_row.scene_seeds(config)),
        "neuron / directions generator seeds": set(neuron_row.neuron_seeds(config)),
        "neuron prompts off": set(neuron_row.neuron_prompts(config, background, on=False)),
        "neuron prompts on": set(neuron_row.neuron_prompts(config, background, on=True)),
        "directions scenes": {config.seed(directions_row.FOLDER_SEED), config.seed(directions_row.HELD_OUT_SEED)},
        "cutouts": {config.optim().seed},
    }


def test_dev_and_test_share_no_seed_or_start_of_any_row_at_full_size(tmp_path):
    dev, test = _splits(tmp_path)
    dev_seeds, test_seeds = _row_seeds(dev), _row_seeds(test)
    for kind in dev_seeds:
        assert dev_seeds[kind] and len(dev_seeds[kind]) == len(test_seeds[kind]), kind
        assert not dev_seeds[kind] & test_seeds[kind], kind
    # Across rows too: no integer seed of one split is any seed of the other.
    every = lambda seeds: set().union(*(s for s in seeds.values() if all(isinstance(x, int) for x in s)))  # noqa: E731
    assert not every(dev_seeds) & every(test_seeds)
    assert max(every(dev_seeds)) < SPLIT_OFFSET <= min(every(test_seeds))


def test_the_splits_render_no_common_scene(tmp_path):
    dev, test = _splits(tmp_path)
    # uvce: each split's scenes, as the row draws them; none is drawn in both.
    def uvce(config):
        return {json.dumps(sample_scene(np.random.default_rng(seed), shape=name.rsplit("_", 1)[0]).to_dict(), sort_keys=True)
                for name, seed in uvce_row.scene_seeds(config).items()}  # fmt: skip

    assert len(uvce(dev)) == 4 * 12 and not uvce(dev) & uvce(test)
    # neuron-cf: the three modes' scenes of each split.
    def neuron_cf(config):
        modes = neuron_cf_row._scenes(neuron_cf_row.scene_seeds(config), "triangle", "grass", "circle")
        return {json.dumps(scene.to_dict(), sort_keys=True) for scenes in modes for scene in scenes}

    assert len(neuron_cf(dev)) == 3 * FULL_RUNS and not neuron_cf(dev) & neuron_cf(test)


def test_dev_keeps_the_seeds_everything_so_far_was_tuned_on(tmp_path):
    dev = BenchConfig(out=tmp_path, split="dev")
    assert disagree_row.disagree_seeds(dev) == [0, 1, 2, 3]
    assert _exists_seeds(dev) == {77_000 + 10 * k + c for k in range(4) for c in range(4)}
    assert uvce_row.scene_seeds(dev)["bar_3"] == 7_103
    assert neuron_cf_row.scene_seeds(dev) == list(range(9_000, 9_016))
    assert generator_row.generator_seeds(dev)[:3] == [0, 1, 1000] and len(generator_row.generator_seeds(dev)) == 128
    assert neuron_row.neuron_seeds(dev) == [0, 1, 2, 3] and dev.optim().seed == 0
    assert (dev.seed(directions_row.FOLDER_SEED), dev.seed(directions_row.HELD_OUT_SEED)) == (1901, 1902)
    starts = one_start_per_shape("grass", on=False)
    assert neuron_row.neuron_prompts(dev, "grass", on=False) == [f"a photograph of a {c} {s} on {b}" for s, c, b in starts]
    # The test split's starts are of the same kind: every shape once, every colour once.
    test = BenchConfig(out=tmp_path)
    assert test.split == "test"
    prompts = neuron_row.neuron_prompts(test, "grass", on=True)
    assert sorted(p.split()[-3] for p in prompts) == sorted(SHAPES) and sorted(p.split()[-4] for p in prompts) == sorted(COLOURS)


def test_split_seed_bounds(tmp_path):
    test = BenchConfig(out=tmp_path)
    assert test.seed(0) == SPLIT_OFFSET and test.seed(SPLIT_OFFSET - 1) == 2 * SPLIT_OFFSET - 1
    with pytest.raises(ValueError):
        test.seed(SPLIT_OFFSET)  # would be a test seed on dev
    with pytest.raises(DiginError, match="must be from 1 to"):
        BenchConfig(out=tmp_path, uvce_seeds=MAX_SEEDS + 1).check()
    with pytest.raises(DiginError, match="--split must be dev or test, got 'train'"):
        BenchConfig(out=tmp_path, split="train").check()


def test_bad_split_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--split", "nonsense"])
    assert result.exit_code == 1
    assert result.stderr == "Error: --split must be dev or test, got 'nonsense'\n"
    assert not (tmp_path / "bench.json").exists()
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--full", "--runs", "8"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: give --full or --runs")


def _summary(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "summary.jsonl").read_text().splitlines()]


def test_a_rows_claims_are_the_counts_of_its_records(tmp_path):
    # The disagree and uvce rows, as small as they run: one shape, two seeds / one scene,
    # one step. Their claimed / confirmed / precision are what the run folders' records say.
    from digin_cli.bench.quality import run_bench

    config = BenchConfig(out=tmp_path, rows=["disagree", "uvce"], shapes=["triangle"], seeds_per_shape=2, uvce_seeds=1,
                         steps=1, ddim_steps=4, batch_size=2, device="cpu", jobs=1, split="dev")  # fmt: skip
    result = run_bench(config)
    assert result["config"]["split"] == "dev" and result["config"]["judges"] == [JUDGE]
    assert "dev split" in (tmp_path / "index.html").read_text()  # the bench page shows it
    disagree, uvce = result["rows"]
    for row, folder, cls_key in ((disagree, tmp_path / "disagree" / "triangle", "class"),
                                 (uvce, tmp_path / "uvce" / "out", "target")):  # fmt: skip
        records = _summary(folder)
        claimed = sum(r["claimed"] is True for r in records)
        confirmed = sum(r["confirmed"] is True for r in records)
        header = json.loads((folder / "run.json").read_text())["items"]
        assert (header["claimed"], header["confirmed"]) == (claimed, confirmed)
        # confirmed: claimed and the judge's top class on the kept image is the claimed class.
        assert confirmed == sum(r["claimed"] and r["judges"][JUDGE]["after"]["top_class_name"] == r["classes"][cls_key]
                                for r in records)  # fmt: skip
        rates = row["rates"]
        assert (rates["claimed"]["successes"], rates["claimed"]["runs"]) == (claimed, len(records))
        assert (rates["confirmed"]["successes"], rates["confirmed"]["runs"]) == (confirmed, len(records))
        assert (rates["precision"]["successes"], rates["precision"]["runs"]) == (confirmed, claimed)
        assert rates["precision_geometry"]["runs"] == claimed
        assert any(key.startswith("-> precision") for key in row["headline"])
    triangle = disagree["per_shape"]["triangle"]
    assert triangle["oracle_2_classes"] == [r["judges"][JUDGE]["after"]["top_class_name"] for r in _summary(tmp_path / "disagree" / "triangle")]
    geometry = sum(r["claimed"] and seen == "triangle" for r, seen in zip(_summary(tmp_path / "disagree" / "triangle"), triangle["geometry_shapes"]))
    assert disagree["rates"]["confirmed_geometry"]["successes"] == geometry == triangle["confirmed_geometry"]
    item = uvce["items"][0]
    assert uvce["rates"]["confirmed_geometry"]["successes"] == int(item["claimed"] and item["geometry"] == item["target"])


def test_the_guards_reach_the_rows_runs_and_bench_json(tmp_path):
    # The bench takes the commands' guard options and hands them to its jobs: the run
    # folder records them as a user's run would, and bench.json says what the rows ran with.
    from digin_cli.bench.quality import run_bench

    config = BenchConfig(out=tmp_path, rows=["disagree"], shapes=["triangle"], seeds_per_shape=2, steps=1, ddim_steps=4,
                         batch_size=2, device="cpu", jobs=1, split="dev", keep="first-claim", augment="eot",
                         claim_margin=0.1, noise_reg=0.5, cone="shapes:robust:45")  # fmt: skip
    result = run_bench(config)
    assert result["config"]["guards"] == {"keep": "first-claim", "augment": "eot", "claim_margin": 0.1,
                                          "noise_reg": 0.5, "cone": "shapes:robust:45"}  # fmt: skip
    run = json.loads((tmp_path / "disagree" / "triangle" / "run.json").read_text())["config"]
    optim = run["optim"]
    assert (optim["keep"], optim["augment"], optim["claim_margin"], optim["noise_reg"]) == ("first-claim", "eot", 0.1, 0.5)
    assert run["cone"]["spec"] == "shapes:robust" and run["cone"]["degrees"] == 45


@pytest.mark.parametrize(("extra", "message"), [
    (["--keep", "latest"], "Error: --keep must be one of best-loss, first-claim, not 'latest'"),
    (["--noise-reg", "-1"], "Error: --noise-reg must be a finite weight >= 0"),
    (["--cone", f"{JUDGE}:30"], f"Error: --judge {JUDGE} is also --cone's model"),
    (["--cone", "shapes:robust:95"], "Error: --cone"),
])  # fmt: skip
def test_bad_bench_guards_are_one_line_before_any_row_runs(tmp_path, extra, message):
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--rows", "disagree", *extra])
    assert result.exit_code == 1 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "bench.json").exists()
