"""world.slopes: where a shapes-world diffusion model gives the optimization a slope."""

import numpy as np

from digin_cli.world.slopes import jump_share, measure_slopes, pixel_lines


def test_jump_share_tells_a_ramp_from_a_jump():
    assert jump_share([2.0, 1.5, 1.0, 0.5, 0.0]) == 0.25  # an even ramp over 4 steps
    assert jump_share([1.8, 1.8, 1.8, 0.1, 0.1]) == 1.0  # one jump
    assert jump_share([1.84, 1.84, 1.83, 1.84]) is None  # hardly falls: no share to speak of


def test_slopes_on_the_shipped_model_start_on_water_and_the_latent_line_leaves_it():
    result = measure_slopes("shapes", scenes=2, points=3)
    assert result["neuron"] == 84 and result["background"] == "water"
    for row in result["scenes"]:
        # A bar on water lights the water neuron after the VAE's round trip and after
        # inversion and resampling with its caption...
        assert row["latent"][0] > 1.5 and row["caption"][0] > 1.5
        assert len(row["latent"]) == len(row["caption"]) == 3
    # ...and the latent of the other scene (a bar on grass, then on sand) does not.
    assert [row["towards"] for row in result["scenes"]] == ["grass", "sand"]
    assert all(row["latent"][-1] < row["latent"][0] - 0.5 for row in result["scenes"])


def test_pixel_lines_show_which_way_is_uphill_from_the_neuron_rows_starts(tmp_path):
    lines = {row["start"]: row["towards"] for row in pixel_lines(scenes=2, points=5)["starts"]}
    assert set(lines) == {"red circle on sand", "green bar on grass", "blue triangle on snow", "yellow star on sand"}
    for towards in lines.values():
        assert towards["water"][-1] > 1.0  # every start reaches the neuron's level on water
    # From yellow stars on sand only water is uphill; from red circles on sand a pale
    # background already raises the water neuron (the row bleaches those scenes).
    assert max(lines["yellow star on sand"]["snow"]) < 0.02
    assert lines["red circle on sand"]["snow"][-1] > lines["red circle on sand"]["snow"][0] + 0.1
    # A direction file is a projection of the same features: the neuron's one-hot gives the neuron.
    one_hot = np.zeros(96, dtype=np.float32)
    one_hot[84] = 1.0
    np.save(tmp_path / "n84.npy", one_hot)
    projected = pixel_lines(scenes=2, points=5, direction_file=tmp_path / "n84.npy")["starts"]
    assert {row["start"]: row["towards"] for row in projected} == lines
