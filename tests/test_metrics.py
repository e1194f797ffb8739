"""MetricsLog: one flushed JSON line per record, truncation on resume, optional TensorBoard."""
import json
import sys
import types

import pytest
import torch

from kdctl.engine.metrics import MetricsLog


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_flushed_json_lines(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log("train", 20, 0, {"loss": torch.tensor(1.5), "lr": 0.01, "n": 3})
    # Readable before close: each record is flushed.
    assert _records(tmp_path / "metrics.jsonl") == [{"step": 20, "epoch": 0, "kind": "train", "loss": 1.5, "lr": 0.01, "n": 3}]
    log.log("eval", 40, 1, {"bbox_mAP": 0.25, "loss": float("nan")})
    log.close()
    log.close()
    assert list(_records(tmp_path / "metrics.jsonl")[1].items()) == [
        ("step", 40), ("epoch", 1), ("kind", "eval"), ("bbox_mAP", 0.25), ("loss", None)]
    assert not (tmp_path / "tb").exists()


def test_bad_records(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="kind"):
            log.log("test", 1, 0, {"a": 1.0})
        with pytest.raises(ValueError, match="reserved"):
            log.log("train", 1, 0, {"step": 1.0})
        with pytest.raises(TypeError, match="not a number"):
            log.log("train", 1, 0, {"a": "x"})
    with pytest.raises(ValueError, match="closed"):
        log.log("train", 1, 0, {"a": 1.0})


def test_resume_appends_and_truncate_drops_rerun_steps(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        for step in (10, 20, 30, 40):
            log.log("train", step, 0, {"loss": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 50, "epo')  # a crash in the middle of a line

    with MetricsLog(tmp_path, tensorboard=False) as log:  # resuming from the checkpoint of step 20
        assert log.truncate_after(20) == (2, 1)  # steps 30 and 40, and the cut line
        log.log("train", 30, 0, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in _records(tmp_path / "metrics.jsonl")] == [(10, 1.0), (20, 2.0), (30, 9.0)]

    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 40, "epo')
    with MetricsLog(tmp_path, tensorboard=False) as log:  # appending without truncation still gives whole lines
        log.log("train", 40, 0, {"loss": 4.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[-2] == '{"step": 40, "epo' and json.loads(lines[-1])["loss"] == 4.0


class _FakeWriter:
    made: list["_FakeWriter"] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_and_purge_on_resume(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _FakeWriter.made = []
    with MetricsLog(tmp_path) as log:
        assert log.tensorboard
        log.log("train", 10, 0, {"loss": 1.0, "bad": float("inf")})
        log.log("eval", 20, 0, {"bbox_mAP": 0.5})
    first = _FakeWriter.made[0]
    assert first.log_dir == str(tmp_path / "tb") and first.purge_step is None and first.closed
    assert first.scalars == [("train/loss", 1.0, 10), ("eval/bbox_mAP", 0.5, 20)]
    with MetricsLog(tmp_path) as log:
        log.truncate_after(10)
        log.log("train", 20, 0, {"loss": 2.0})
    assert _FakeWriter.made[1].purge_step == 11


def test_tensorboard_missing_is_silent(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with MetricsLog(tmp_path) as log:
        assert not log.tensorboard
        log.log("train", 1, 0, {"loss": 1.0})
    assert not (tmp_path / "tb").exists() and (tmp_path / "metrics.jsonl").is_file()
