"""``kdctl predict``: any model file over images, files written a person can look at and kdctl
can train on.

- :mod:`kdctl.predict.predictor`: :func:`predict` opens the model file
  (:func:`kdctl.export.model_file.load_model_file`), letterboxes every image through the data layer
  (:mod:`kdctl.data.images`), batches, detects, filters classes and hands each image to the writer;
- :mod:`kdctl.predict.outputs`: the output folder rule (never a silent overwrite), drawn images,
  ``predictions.json`` and, with ``--save-labels``, YOLO labels + ``data.yaml``.
"""
from kdctl.predict.predictor import predict

__all__ = ["predict"]
