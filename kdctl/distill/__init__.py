"""Knowledge distillation: a frozen teacher, a student and the KD losses between them.

- :mod:`kdctl.distill.crosskd` — CrossKD (Wang et al., CVPR 2024): the student's head features
  run through the teacher's remaining head layers, and those cross-head predictions mimic the
  teacher's.
- :mod:`kdctl.distill.prediction` — the prediction-KD losses CrossKD uses (KD quality focal
  loss, distribution KL, GIoU / IoU on decoded boxes, centerness BCE), shared with the direct
  prediction-mimicking baseline.
- :mod:`kdctl.distill.ssim` — SSIM structural feature distillation (de Rijk et al., NeurIPS 2022).
- :mod:`kdctl.distill.feature` — FPN feature baselines: PKD, L2, L1.
- :mod:`kdctl.distill.distiller` — the :class:`Distiller` that composes them.
"""
