"""digin: explain image classifiers by optimizing the inputs of a latent diffusion model."""

__version__ = "0.1.0"
