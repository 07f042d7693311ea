"""The one place that loads models: diffusion pipelines, classifiers, built-ins."""

from digin_cli.models import builtin  # noqa: F401  (registers the built-in models)
from digin_cli.models.classifiers import Classifier, load_classifier, resolve_class
from digin_cli.models.diffusion import DEFAULT_MODEL, load_diffusion

__all__ = ["DEFAULT_MODEL", "Classifier", "load_classifier", "load_diffusion", "resolve_class"]
