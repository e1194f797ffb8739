"""build_optimizer: trainable parameters only; SGD decays everything, AdamW spares 1-D params."""
import pytest
import torch
from torch import nn

from kdctl.engine.optim import build_optimizer
from kdctl.recipe import TrainConfig


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    for p in model[0].parameters():  # a frozen stem, as with frozen_stages
        p.requires_grad_(False)
    return model


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_sgd_one_group_decay_on_all_trainable():
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4))
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert _ids(group["params"]) == _ids(trainable) and len(group["params"]) == 6
    assert not _ids(model[0].parameters()) & _ids(group["params"])
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.02, 0.9, 1e-4)


def test_adamw_two_groups_no_decay_on_biases_and_norms():
    model = _model()
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert (decay["name"], decay["weight_decay"], no_decay["name"], no_decay["weight_decay"]) == ("decay", 0.05, "no_decay", 0.0)
    assert _ids(decay["params"]) == {id(model[2].weight)}
    assert _ids(no_decay["params"]) == {id(model[1].weight), id(model[1].bias), id(model[2].bias),
                                        id(model[3].weight), id(model[3].bias)}
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)


def test_nothing_trainable():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())
