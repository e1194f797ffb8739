"""Detector building blocks: backbones, necks, heads, priors, box coders, assigners, losses."""
