"""Training engine: lr schedule, optimizer, checkpoints, metrics log and the train loop.

Import the submodules directly (``from kdctl.artifact.checkpoint import save_checkpoint``);
this package file imports nothing so that ``import kdctl.engine`` stays cheap.
"""
