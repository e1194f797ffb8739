"""Evaluation: COCO box mAP of result lists (:mod:`~kdctl.evaluation.box_map`) and the loops that
run a detector or a model file over a dataset and score it (:mod:`~kdctl.evaluation.inference`)."""
