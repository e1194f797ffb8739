"""kdctl: small, fast object detectors by knowledge distillation from big ones."""

from kdctl.version import __version__


def load_detector(path, device="cpu"):
    """The detector of a kdctl checkpoint, in eval mode on ``device``.

    ``path``: a training checkpoint (``RUN/best.safetensors``, or a run directory for its
    ``last.safetensors``) or a file written by ``kdctl export --format safetensors``. The
    detector is rebuilt from the recipe stored in the file's metadata; only its own weights are
    loaded (a teacher's or adapters' keys in the file are ignored) and float16 files come back as
    float32. Call it as ``model(images)`` for raw outputs or ``model.predict(images, valid_sizes,
    scales)`` for detections. torch is imported here, not by ``import kdctl``.
    """
    from kdctl.artifact.stored import load_detector as load

    return load(path, device=device)[0]
