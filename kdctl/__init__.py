"""kdctl: small, fast object detectors by knowledge distillation from big ones."""

__version__ = "0.1.0"
