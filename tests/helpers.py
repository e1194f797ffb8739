"""Helpers the CLI tests share (importable as ``helpers``: pytest puts ``tests/`` on the path)."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kdctl.cli import app


def run(*args):
    """``kdctl ARGS...`` in-process; the typer ``Result`` (``exit_code``, ``output``)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def json_of(result):
    """The JSON document a ``--json`` command printed (after any leading log lines)."""
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def assert_one_line_error(result, *needles):
    """Exit 2 and exactly one ``error:`` line containing every needle."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# a GFL student (test_resnet, 32 wide) on 160-px shapes, trained 4 steps: what the export, runtime,
# predict and quantization tests run on. Such a student scores ~0.01-0.05, so the low threshold
# (baked into end-to-end exports too) gives hundreds of detections to compare.
STUDENT_TINY = [
    "data.shapes.train_images=16", "data.shapes.val_images=8", "data.shapes.image_size=160",
    "data.short_side=160", "data.max_side=160", "data.batch_size=4", "data.num_workers=0",
    "model.student.backbone=test_resnet", "model.student.fpn_channels=32", "model.student.feat_channels=32",
    "model.student.stacked_convs=2", "train.epochs=1", "train.warmup_iters=4", "runtime.threads=1",
    "eval.score_thr=0.002",
]


def train_tiny_student(out: Path) -> Path:
    """Train the :data:`STUDENT_TINY` student into run folder ``out``; its ``best.safetensors``."""
    from kdctl.engine.trainer import Trainer
    from kdctl.recipe import load_recipe

    Trainer(load_recipe("shapes", STUDENT_TINY), out, quiet=True).fit()
    return out / "best.safetensors"
