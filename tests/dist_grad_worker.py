"""Worker for tests/test_distributed.py (not a test module): one training step of a tiny
recipe, saving the averaged gradients that the optimizer would apply.

    python tests/dist_grad_worker.py OUT BATCH [--set k=v ...]              # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_grad_worker.py OUT BATCH ...
"""
import sys
from pathlib import Path

import torch

from kdctl.distill.trainer import DistillTrainer
from kdctl.engine.distributed import info, shutdown
from kdctl.recipe import load_recipe


class GradTrainer(DistillTrainer):
    def _optimizer_step(self, total):
        if info().main:
            grads = {n: p.grad.detach().clone() for n, p in self.step_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.run_dir / "grads.pt")
        return super()._optimizer_step(total)


def main() -> None:
    out, batch, overrides = Path(sys.argv[1]), int(sys.argv[2]), [a for a in sys.argv[3:] if a != "--set"]
    recipe = load_recipe("shapes", [*overrides, f"data.batch_size={batch}"])
    GradTrainer(recipe, out, max_steps=1, quiet=True).fit()
    shutdown()


if __name__ == "__main__":
    main()
