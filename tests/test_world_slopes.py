"""world.slopes: where a shapes-world diffusion model gives the optimization a slope."""

import numpy as np

from digin_cli.models.builtin import shapes_classifier_meta
from digin_cli.world.slopes import jump_share, measure_slopes, pixel_lines


def test_jump_share_tells_a_ramp_from_a_jump():
    assert jump_share([2.0, 1.5, 1.0, 0.5, 0.0]) == 0.25  # an even ramp over 4 steps
    assert jump_share([1.8, 1.8, 1.8, 0.1, 0.1]) == 1.0  # one jump
    assert jump_share([1.84, 1.84, 1.83, 1.84]) is None  # hardly falls: no share to speak of


def test_slopes_on_the_shipped_model_start_on_the_neurons_background_and_the_latent_line_leaves_it():
    documented = shapes_classifier_meta("background-biased")["background_neuron"]
    result = measure_slopes("shapes", scenes=2, points=3)
    assert (result["neuron"], result["background"]) == (documented["index"], "grass") == (38, "grass")
    for row in result["scenes"]:
        # A triangle on grass still lights the grass neuron after the VAE's round trip and
        # after inversion and resampling with its caption, though far less than the
        # rendered scene (about 1.7): the VAE smooths the blades the neuron reads...
        assert 0.08 < row["latent"][0] < 0.6 and 0.08 < row["caption"][0] < 0.6
        assert len(row["latent"]) == len(row["caption"]) == 3
    # ...and the latent of the other scene (a triangle on sand, then on snow) does not.
    assert [row["towards"] for row in result["scenes"]] == ["sand", "snow"]
    assert all(row["latent"][-1] < 0.01 < row["latent"][0] for row in result["scenes"])


def test_pixel_lines_show_which_way_is_uphill_from_the_neuron_rows_starts(tmp_path):
    lines = {row["start"]: row["towards"] for row in pixel_lines(scenes=2, points=5)["starts"]}
    assert set(lines) == {"red circle on sand", "green bar on water", "blue triangle on snow", "yellow star on sand"}
    for towards in lines.values():
        assert towards["grass"][-1] > 1.0  # every start reaches the neuron's level on grass
        # and grass is the only way up: a leaky unit stays near 0 along the other lines
        assert max(max(line) for background, line in towards.items() if background != "grass") < 0.05
    # From sand the grass line rises within the first quarter; from snow it is flat for half.
    assert lines["yellow star on sand"]["grass"][1] > 0.03 and lines["red circle on sand"]["grass"][2] > 0.2
    assert max(lines["blue triangle on snow"]["grass"][:3]) < 0.01
    # A direction file is a projection of the same features: the neuron's one-hot gives the neuron.
    one_hot = np.zeros(96, dtype=np.float32)
    one_hot[38] = 1.0
    np.save(tmp_path / "n38.npy", one_hot)
    projected = pixel_lines(scenes=2, points=5, direction_file=tmp_path / "n38.npy")["starts"]
    assert {row["start"]: row["towards"] for row in projected} == lines
