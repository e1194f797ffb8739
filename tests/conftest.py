from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared(name: str) -> Path:
    """Path to a dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared datasets live beside the repository, never in it)")
    return path


def family_parts(head: str, num_classes: int, strides=(8, 16, 32, 64, 128), box_loss: str = "auto",
                 norm_on_bbox: bool = False, **variant):
    """The parts (prior generator, assigner, decoder, loss) of ``head``'s family, as a detector
    of that family with neck ``strides`` gets them (:func:`kdctl.models.detector.build_parts`)."""
    from kdctl.models.detector import build_parts
    from kdctl.models.families import FAMILIES
    from kdctl.recipe import detector_config, VariantConfig

    cfg = detector_config(head=head, box_loss=box_loss, feat_channels=32, stacked_convs=1,
                         variant=VariantConfig(fcos_norm_on_bbox=norm_on_bbox, **variant))
    head_module = FAMILIES[head].build_head(cfg, num_classes, 32, len(strides), "none")
    return build_parts(cfg, num_classes, strides, head_module)


def family_loss(parts, out, priors, batch, reduce=lambda t: t, assignment=None):
    """The family's named losses of flattened ``out`` on ``batch`` (assigning when not given)."""
    if assignment is None:
        assignment = parts.assigner.assign(priors, batch, parts.loss.num_classes)
    return parts.loss(out, priors, assignment, reduce)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: more threads only add OpenMP barriers,
    which cost seconds when the machine's cores are busy (measured 4x slower with 2 threads under
    load). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
