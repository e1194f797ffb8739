"""Checkpoints: exact round trips, atomic writes, paired files, clear errors, weights_only loads."""
import random
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from torch import nn

from kdctl.artifact.checkpoint import (atomic_path, atomic_write_bytes, load_checkpoint_weights, load_model_weights,
                                     load_train_state, rng_state, save_checkpoint, set_rng_state)
from kdctl.errors import KdctlError


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):  # fills BatchNorm running stats and SGD momentum buffers
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
    return model, opt


def _save(run_dir, name="last", **extra):
    model, opt = _trained()
    state = {"optimizer": opt.state_dict(), "step": 2, "epoch": 0, "best_ap": 0.25, "rng": rng_state(), **extra}
    save_id = save_checkpoint(run_dir, name, model, state, {"recipe": "train:\n  lr: 0.1\n", "step": "2"})
    return model, opt, save_id


def test_round_trip_is_exact(tmp_path):
    model, opt, save_id = _save(tmp_path)
    weights, meta = load_checkpoint_weights(tmp_path)  # a run dir means last.safetensors
    assert meta == {"recipe": "train:\n  lr: 0.1\n", "step": "2", "save_id": save_id}
    fresh = _model()
    load_model_weights(fresh, weights, "last.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert int(fresh[1].num_batches_tracked) == 2

    state = load_train_state(tmp_path, "last", expect_save_id=meta["save_id"])
    assert (state["step"], state["epoch"], state["best_ap"]) == (2, 0, 0.25)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fresh_opt.load_state_dict(state["optimizer"])
    for p_old, p_new in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p_old]["momentum_buffer"], fresh_opt.state[p_new]["momentum_buffer"])


def test_path_forms(tmp_path):
    _save(tmp_path, "best")
    weights, _ = load_checkpoint_weights(tmp_path / "best")
    assert weights.keys() == load_checkpoint_weights(tmp_path / "best.safetensors")[0].keys()
    with pytest.raises(KdctlError, match="no such checkpoint; give a run directory or a .safetensors file"):
        load_checkpoint_weights(tmp_path)  # no last.safetensors here
    with pytest.raises(KdctlError, match="no such checkpoint"):
        load_checkpoint_weights(tmp_path / "nope.safetensors")


def test_state_file_is_weights_only_loadable(tmp_path):
    _save(tmp_path)
    state = torch.load(tmp_path / "last.state.pt", weights_only=True)
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_save_id_mismatch_is_detected(tmp_path):
    _save(tmp_path)
    old_state = (tmp_path / "last.state.pt").read_bytes()
    _, _, new_id = _save(tmp_path)
    (tmp_path / "last.state.pt").write_bytes(old_state)  # as if the second save died in between
    with pytest.raises(KdctlError, match=r"last.state.pt does not belong to last.safetensors \(interrupted save\?\)"):
        load_train_state(tmp_path, "last", expect_save_id=new_id)
    assert load_train_state(tmp_path, "last", expect_save_id=None)["step"] == 2
    with pytest.raises(KdctlError, match="no such training state"):
        load_train_state(tmp_path, "best", expect_save_id=None)


def test_corrupt_files_give_one_line_errors(tmp_path):
    _save(tmp_path)
    good = (tmp_path / "last.safetensors").read_bytes()
    for name, data in [("garbage.safetensors", b"not a safetensors file at all"),
                       ("truncated.safetensors", good[: len(good) // 2])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KdctlError, match=r"is not a kdctl checkpoint \(safetensors header unreadable\)") as info:
            load_checkpoint_weights(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    (tmp_path / "last.state.pt").write_bytes(b"neither a zip nor a pickle")
    with pytest.raises(KdctlError, match="is not a kdctl training state"):
        load_train_state(tmp_path, "last", expect_save_id=None)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"step": 1, "x": PurePosixPath("any class a pickle names")}, tmp_path / "last.state.pt")
    with pytest.raises(KdctlError, match="unreadable with weights_only=True"):
        load_train_state(tmp_path, "last", expect_save_id=None)


def test_model_misfit_is_one_error(tmp_path):
    weights = _model().state_dict()
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1), nn.Conv2d(2, 2, 1))
    with pytest.raises(KdctlError) as info:
        load_model_weights(other, weights, "runs/x/best.safetensors")
    msg = str(info.value)
    assert msg.startswith("runs/x/best.safetensors: weights do not fit the model: 2 missing (4.weight, 4.bias)")
    assert "0.weight [4, 3, 3, 3] vs [5, 3, 3, 3]" in msg and "7 with another shape" in msg and "\n" not in msg
    weights["extra.weight"] = torch.zeros(1)
    with pytest.raises(KdctlError, match="1 unexpected \\(extra.weight\\)"):
        load_model_weights(_model(), weights, "w.safetensors")


def test_tied_and_strided_tensors_are_saved(tmp_path):
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = nn.Linear(4, 4)
    model.b.weight = model.a.weight  # tied: safetensors' save_file refuses shared storage
    model.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous
    save_checkpoint(tmp_path, "last", model, {}, {})
    weights, _ = load_checkpoint_weights(tmp_path / "last.safetensors")
    assert torch.equal(weights["b.weight"], model.a.weight) and torch.equal(weights["t"], model.t)


def _draws():
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_round_trip(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()  # and in NumPy's
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = _draws()
    set_rng_state(state)
    assert _draws() == first
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == first
