from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared(name: str) -> Path:
    """Path to a dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared datasets live beside the repository, never in it)")
    return path
