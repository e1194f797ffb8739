"""The lr schedule against hand-computed MMDetection values, and LambdaLR resume."""
import math

import pytest
import torch

from kdctl.engine.schedule import lr_factor, make_scheduler

ONE_X = dict(steps_per_epoch=100, total_steps=1200, schedule="step", milestones=[8, 11], gamma=0.1,
             warmup_iters=500, warmup_ratio=0.001)


def test_warmup_start_middle_end():
    assert lr_factor(0, **ONE_X) == pytest.approx(0.001)
    assert lr_factor(250, **ONE_X) == pytest.approx(0.001 + 0.999 * 0.5)  # 0.5005
    assert lr_factor(499, **ONE_X) == pytest.approx(0.001 + 0.999 * 499 / 500)
    assert lr_factor(500, **ONE_X) == 1.0
    assert lr_factor(0, **{**ONE_X, "warmup_iters": 0}) == 1.0


def test_step_drops_exactly_at_milestone_epochs():
    assert lr_factor(799, **ONE_X) == 1.0
    assert lr_factor(800, **ONE_X) == pytest.approx(0.1)
    assert lr_factor(1099, **ONE_X) == pytest.approx(0.1)
    assert lr_factor(1100, **ONE_X) == pytest.approx(0.01)
    assert lr_factor(5000, **ONE_X) == pytest.approx(0.01)


def test_warmup_multiplies_the_main_schedule():
    # A milestone inside the warmup: both factors apply (mmcv's warmup scales the regular lr).
    cfg = {**ONE_X, "steps_per_epoch": 10, "milestones": [1]}
    assert lr_factor(20, **cfg) == pytest.approx(0.1 * (0.001 + 0.999 * 20 / 500))


def test_cosine_endpoints_and_midpoint():
    cfg = dict(steps_per_epoch=10, total_steps=1000, schedule="cosine", milestones=[], gamma=0.1,
               warmup_iters=0, warmup_ratio=0.001)
    assert lr_factor(0, **cfg) == 1.0
    assert lr_factor(500, **cfg) == pytest.approx(0.5)
    assert lr_factor(250, **cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1000, **cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(2000, **cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1000, **cfg, min_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor(500, **cfg, min_ratio=0.01) == pytest.approx(0.01 + 0.99 * 0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, **{**ONE_X, "schedule": "poly"})
    with pytest.raises(ValueError):
        lr_factor(-1, **ONE_X)


def _optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], lr=0.02, momentum=0.9)


def _lrs(optimizer, scheduler, n):
    out = []
    for _ in range(n):
        out.extend(g["lr"] for g in optimizer.param_groups)
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("optimizer_first", [False, True])
def test_scheduler_follows_lr_factor_and_resumes(optimizer_first):
    cfg = {**ONE_X, "steps_per_epoch": 3, "warmup_iters": 4, "milestones": [2, 3], "total_steps": 12}
    opt = _optimizer()
    sched = make_scheduler(opt, **cfg)
    first = _lrs(opt, sched, 5)
    assert first[:2] == pytest.approx([0.02 * 0.001, 0.5 * 0.001])
    assert first[::2] == pytest.approx([0.02 * lr_factor(s, **cfg) for s in range(5)])
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    rest = _lrs(opt, sched, 7)

    # Resume in a fresh optimizer/scheduler through a weights_only round trip.
    import io
    buf = io.BytesIO()
    torch.save({"opt": saved_opt, "sched": saved_sched}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    opt2 = _optimizer()
    if optimizer_first:
        opt2.load_state_dict(loaded["opt"])
        sched2 = make_scheduler(opt2, **cfg)
    else:
        sched2 = make_scheduler(opt2, **cfg)
        opt2.load_state_dict(loaded["opt"])
    sched2.load_state_dict(loaded["sched"])
    assert _lrs(opt2, sched2, 7) == pytest.approx(rest)
