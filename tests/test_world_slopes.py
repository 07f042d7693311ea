"""world.slopes: where a shapes-world diffusion model gives the optimization a slope."""

from digin_cli.world.slopes import jump_share, measure_slopes


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
