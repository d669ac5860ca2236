"""Weights & Biases logging from rank 0, on DeepSpeed's ``global_samples`` axis; never fatal."""
from __future__ import annotations

import os


class RunLogger:
    """Logs metrics to W&B on rank 0 (``mode``: offline, online or disabled).

    Without wandb installed, or with ``mode="disabled"``, it says so once and does nothing, so
    training continues.
    """

    def __init__(self, rank: int, mode: str, project: str, config: dict, run_dir: str, name: str | None = None):
        self.run = None
        self.dir = None
        if rank != 0:
            return
        if mode == "disabled":
            print("W&B logging disabled (--wandb disabled)")
            return
        try:
            import wandb
        except ImportError:
            print("W&B logging off: wandb is not installed (pip install 'nonlocal-dist[wandb]'); training continues")
            return
        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(project=project, config=config, mode=mode, dir=run_dir, name=name, reinit=True)
        self.run.define_metric("global_samples")
        self.run.define_metric("*", step_metric="global_samples")
        self.dir = self.run.dir

    def log(self, metrics: dict, global_samples: int) -> None:
        if self.run is not None:
            self.run.log({"global_samples": global_samples, **metrics})

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> str | None:
        """Close the run; returns where it went (the local run directory), or None."""
        if self.run is None:
            return None
        where = os.path.dirname(self.run.dir)
        self.run.finish()
        return where
