"""What `digin bench` is asked to run: the rows, the shapes, the seeds, the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from digin_cli.engine import OptimConfig, SamplerConfig
from digin_cli.errors import DiginError
from digin_cli.tasks.runtime import SPACINGS, RuntimeOptions, check_guards
from digin_cli.world.scenes import BACKGROUNDS, SHAPES

ROW_NAMES = ("generator", "disagree", "neuron", "uvce", "neuron-cf", "directions")  # the rows by the names --rows takes, in run order

# Runs behind every headline rate: 16 by default (a 95% interval about +-20 points wide at
# 60%), 48 with --full (about +-14). Each row's seeds are derived from it unless given.
DEFAULT_RUNS, FULL_RUNS = 16, 48

# The seed splits: settings are chosen on "dev", figures reported on "test".
SPLITS = ("dev", "test")
# Every seed a row draws (a generator's z_T, a scene's RNG, the cutouts') is a dev seed
# handed through BenchConfig.seed, which adds SPLIT_OFFSET on the test split and refuses a
# dev seed outside [0, SPLIT_OFFSET). Dev seeds lie below the offset and test seeds at or
# above it, so the splits share no seed at any size. The dev seeds are the ones every
# setting so far was tuned on (the largest: the disagree row's rendered scenes, 77_033);
# MAX_SEEDS keeps every row's (its first seed plus its count) below the offset.
SPLIT_OFFSET = 1_000_000
MAX_SEEDS = 10_000  # runs per shape, prompt or mode: far beyond --full's 12 to 48


@dataclass
class BenchConfig:
    out: Path
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    runs: int = DEFAULT_RUNS  # runs behind each headline rate; the seeds below default to it
    seeds_per_shape: int | None = None  # disagree: runs per shape (4 shapes)
    steps: int = 20  # optimization steps, as in the paper
    # 8 trailing DDIM steps, not the paper's 20 leading: the same bench at both (16 runs a
    # rate) gave no rate apart by more than its interval, in 722 s instead of 1298 s (README).
    ddim_steps: int = 8
    spacing: str | None = "trailing"  # DDIM timestep spacing; None: the shapes model's scheduler config (leading)
    batch_size: int = 8  # every row batches its runs; 8 gave the disagree row x1.17 over 4 on a 2-core CPU
    device: str = "auto"
    neuron_seeds: int | None = None  # seeds per starting prompt for the neuron and directions rows (4 prompts)
    uvce_seeds: int | None = None  # scenes per shape for the uvce row (each needs its own inversion)
    neuron_cf_seeds: int | None = None  # scenes per mode (max, min, control) for the neuron-cf row
    directions_images: int = 64  # images of the class handed to `digin directions` (balanced backgrounds)
    rows: list[str] = field(default_factory=lambda: list(ROW_NAMES))  # which rows to run, in ROW_NAMES order
    # The diffusion model every row runs: the built-in, or a retrained world's model folder
    # judged before it replaces the shipped weights. The classifiers are always the built-ins.
    model: str = "shapes"
    disagree_g: str = "shapes:color-biased"  # the disagree row's g (f is shapes:oracle)
    # Rows run at once, each in a process of its own; None: 2 on a CPU of 2 cores or more, 1
    # on a GPU. The shapes UNet is too small for torch's threads: on 2 cores its forward and
    # backward at batch 16 take 0.093 s with 2 threads and 0.133 s with 1, so two
    # one-thread processes do 1.4x the work of one two-thread process (README, "Performance").
    jobs: int | None = None
    split: str = "test"  # the seeds: "dev" to choose settings on, "test" (disjoint from dev) to report
    # The guards, as the optimizing commands take them; the defaults are the
    # engine's, so a bench without them is the bench before them. `cone` applies to the
    # disagree and uvce rows, the only commands with --cone.
    keep: str = "best-loss"
    augment: str = "cutouts"
    claim_margin: float = 0.05
    noise_reg: float = 0.0
    cone: str | None = None

    def __post_init__(self) -> None:
        per_shape = -(-self.runs // len(SHAPES))  # ceil: 4 shapes (or 4 starting prompts) share the runs
        self.seeds_per_shape = per_shape if self.seeds_per_shape is None else self.seeds_per_shape
        self.neuron_seeds = per_shape if self.neuron_seeds is None else self.neuron_seeds
        self.uvce_seeds = per_shape if self.uvce_seeds is None else self.uvce_seeds
        self.neuron_cf_seeds = self.runs if self.neuron_cf_seeds is None else self.neuron_cf_seeds

    def check(self) -> None:
        """One-line errors for impossible settings, before any row runs."""
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise DiginError(f"unknown shape(s) {', '.join(unknown)}; the shapes world has {', '.join(SHAPES)}")
        if self.split not in SPLITS:
            raise DiginError(f"--split must be dev or test, got '{self.split}'")
        counts = (self.seeds_per_shape, self.uvce_seeds, self.neuron_seeds, self.neuron_cf_seeds, self.runs)
        if min(counts) < 1 or max(counts) > MAX_SEEDS:
            raise DiginError(f"--runs, --seeds, --uvce-seeds, --neuron-seeds and --neuron-cf-seeds must be from 1 to {MAX_SEEDS}")
        if self.directions_images < 2 * len(BACKGROUNDS):
            raise DiginError(f"--directions-images must be at least {2 * len(BACKGROUNDS)} (2 per background)")
        if self.spacing not in (None, *SPACINGS):
            raise DiginError(f"--spacing must be one of {', '.join(SPACINGS)}, got '{self.spacing}'")
        if self.model != "shapes" and not (Path(self.model).expanduser() / "model_index.json").is_file():
            raise DiginError(f"--model {self.model} is not a diffusers model folder (no model_index.json); give 'shapes' "
                             "or a folder that python -m digin_cli.world.train_diffusion --out wrote")  # fmt: skip
        if self.jobs is not None and self.jobs < 1:
            raise DiginError(f"--jobs must be at least 1, got {self.jobs}")
        check_guards(self.optim())
        if self.cone is not None:
            from digin_cli.bench.claims import JUDGES
            from digin_cli.tasks.guards import check_cone

            check_cone(self.cone, JUDGES)
        unknown_rows = [r for r in self.rows if r not in ROW_NAMES]
        if unknown_rows or not self.rows:
            raise DiginError(f"--rows: unknown or no row(s) '{','.join(self.rows)}'; the rows are {', '.join(ROW_NAMES)}")

    def seed(self, dev_seed: int) -> int:
        """The split's seed for a row's `dev_seed` (the seed that row drew before the splits):
        itself on dev, moved past every dev seed on test."""
        if not 0 <= dev_seed < SPLIT_OFFSET:
            raise ValueError(f"a bench seed must lie in [0, {SPLIT_OFFSET}) for the splits to stay apart, got {dev_seed}")
        return dev_seed + (SPLIT_OFFSET if self.split == "test" else 0)

    def seeds(self, count: int, first: int = 0) -> list[int]:
        """The split's seeds for the dev seeds first, first + 1, ..., first + count - 1."""
        return [self.seed(first + k) for k in range(count)]

    def runtime(self) -> RuntimeOptions:
        """Every row runs the bench's diffusion model on the bench's device, each run starting
        again in its folder (a bench never counts items an earlier bench made)..."""
        return RuntimeOptions(model=self.model, device=self.device, overwrite=True)

    def sampler(self) -> SamplerConfig:
        """...with the reference sampler settings but for the number of DDIM steps (and spacing)..."""
        return SamplerConfig(num_steps=self.ddim_steps, timestep_spacing=self.spacing)

    def optim(self) -> OptimConfig:
        """...and the reference optimization settings but for the number of steps, the
        guards, and the cutouts' seed, which is a seed of the split too."""
        return OptimConfig(steps=self.steps, seed=self.seed(0), keep=self.keep, augment=self.augment,
                           claim_margin=self.claim_margin, noise_reg=self.noise_reg)  # fmt: skip

    def guards(self) -> dict[str, object]:
        """The guard settings, as bench.json records them."""
        return {"keep": self.keep, "augment": self.augment, "claim_margin": self.claim_margin,
                "noise_reg": self.noise_reg, "cone": self.cone}  # fmt: skip
