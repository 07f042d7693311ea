"""digin: explain image classifiers by optimizing the inputs of a latent diffusion model.

    import digin_cli as digin
    run = digin.disagree("shapes:oracle", "shapes:color-biased", "circle", model="shapes")

The Python API (``api.py``): `load_model`, `load_classifier`, one function per task
(`disagree`, `neuron`, `uvce`, `neuron_cf`) returning a `Run` of `Item`s, `directions`
(neural PCA) returning its record, and `DiginError`. They are imported on first use, so that `digin --help` stays instant.
"""

__version__ = "0.1.0"

_API = ("disagree", "neuron", "uvce", "neuron_cf", "directions", "load_model", "load_classifier", "Run", "Item")
__all__ = [*_API, "DiginError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from digin_cli import api

        return getattr(api, name)
    if name == "DiginError":
        from digin_cli.errors import DiginError

        return DiginError
    raise AttributeError(f"module 'digin_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
