"""kdctl's version (pyproject.toml's), written into every checkpoint and exported file."""

__version__ = "0.1.0"
