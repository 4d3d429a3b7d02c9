"""prism_lightning: preference-aware, influence-based data selection (PRISM) on Lightning."""

from importlib import resources

__version__ = "0.1.0"

ASSETS = resources.files("prism_lightning") / "assets"
TINY_MODEL = str(ASSETS / "tiny-llama")
DEMO_DATA = str(ASSETS / "data")

__all__ = ["__version__", "TINY_MODEL", "DEMO_DATA"]
