"""What kdctl writes and reads back: the one owner of its file formats.

- :mod:`~kdctl.artifact.rundir`: run folders and atomic writes (what kdctl never overwrites and
  never leaves behind); torch-free.
- :mod:`~kdctl.artifact.checkpoint`: a checkpoint's two files (safetensors weights + metadata,
  ``.state.pt`` training state) and reading them safely.
- :mod:`~kdctl.artifact.stored`: the metadata every detector file carries
  (:func:`~kdctl.artifact.stored.detector_meta`) and the one path from a file to a detector
  (:func:`~kdctl.artifact.stored.detector_from`).

This file imports nothing: :data:`FORMAT` is read by the model-file runner without the rest.
"""

FORMAT = "kdctl.detector/1"  # metadata "format" of every kdctl detector file
