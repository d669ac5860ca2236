"""Weights & Biases logging from rank 0, on DeepSpeed's ``global_samples`` axis; never fatal."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


class RunLogger:
    """Logs metrics, images and tables to W&B on rank 0 (``mode``: offline, online or disabled).

    Without wandb installed, or with ``mode="disabled"``, it says so once and does nothing, so
    training continues. Images also need pillow; without it they are left out, said once.
    """

    def __init__(self, rank: int, mode: str, project: str, config: dict, run_dir: str, name: str | None = None):
        self.run = None
        self.dir = None
        self.images = False
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
        try:
            import PIL.Image  # noqa: F401  (wandb.Image encodes with pillow)

            self.images = True
        except ImportError:
            print("W&B images off: pillow is not installed (pip install 'nonlocal-dist[wandb]'); metrics continue")

    def log(self, metrics: dict, global_samples: int) -> None:
        if self.run is not None:
            self.run.log({"global_samples": global_samples, **metrics})

    def log_images(self, images: dict[str, tuple[np.ndarray, str]], global_samples: int) -> None:
        """Log ``{key: (uint8 (H, W, 3) array, caption)}`` as ``wandb.Image``s (nothing when images are off)."""
        if self.images:
            import wandb

            self.log({key: wandb.Image(array, caption=caption) for key, (array, caption) in images.items()},
                     global_samples)

    def rank_table(self, key: str, row: dict) -> list[dict]:
        """Every rank's ``row`` (all ranks call it: one all-gather), logged on rank 0 as a ``wandb.Table``."""
        rows = [{"rank": 0, **row}]
        if dist.is_initialized():
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, {"rank": dist.get_rank(), **row})
        if self.run is not None:
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
        return rows

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> str | None:
        """Close the run; returns where it went (the local run directory), or None.

        Returns once the run's files are complete on disk: ``run.finish()`` alone returns while
        wandb's service process may still be writing the run file, so the service is also torn down
        (``wandb.teardown()``, which waits for it; a later ``RunLogger`` starts a new one).
        """
        if self.run is None:
            return None
        import wandb

        where = os.path.dirname(self.run.dir)
        self.run.finish()
        wandb.teardown()
        return where


def rank_perf(clips: int, seconds: float, **fields) -> dict:
    """This rank's throughput and peak memory: ``fields`` plus clips/s, peak RSS and peak CUDA MiB."""
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {**fields, "clips_per_s": clips / max(seconds, 1e-9), "seconds": seconds,
            "peak_rss_mib": rss, "peak_cuda_mib": cuda}
