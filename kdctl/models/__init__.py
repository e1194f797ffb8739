"""Detector building blocks: backbones, necks, heads, priors, assigners, box decoders, losses,
and the detector families that combine them (:mod:`kdctl.models.families`)."""
