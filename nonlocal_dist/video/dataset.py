"""Video clips from an annotation file, each rank of a sequence-parallel group decoding its own time
shard of the same clip; data-parallel groups read different clips.

Annotation files: mmaction2's ``path label`` lines (whitespace-separated), or a CSV with a
``path,label`` header (Kinetics-style class names map to indices in sorted order; integer labels
are used as they are). Paths are relative to ``data_prefix``.

A clip's random choices (sampling offsets, crop, flip) come from ``clip_rng(seed, epoch, index)``,
so the ranks of a group agree without communicating, in any DataLoader worker. A clip that cannot
be read (``VideoReadError``: missing, corrupt, truncated, empty file) is returned as unusable
(``ok`` False, with the error) rather than raised, and ``agree_usable`` drops it on every rank of
the group together: a rank whose shard fails never leaves its peers waiting in a collective nor
training on another batch.

``cache_mb`` keeps decoded shards (uint8, after the resize, before crop, flip and normalisation) in
a least-recently-used cache of that many MiB per process, so a dataset that fits in memory is
decoded once per rank: later epochs draw their crops and flips from the cached frames. Each
DataLoader worker holds its own cache; it lives as long as the worker (one iterator over all the
steps, as ``TrainBatchSampler`` gives, or ``persistent_workers=True``).
"""
from __future__ import annotations

import csv
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from nonlocal_dist.distributed.checks import agree_across_ranks, exchange_device
from nonlocal_dist.distributed.comm import all_reduce_max
from nonlocal_dist.video.decode import (
    FORMATS,
    VideoReadError,
    check_shard,
    output_size,
    probe,
    read_frames,
    shard_range,
)
from nonlocal_dist.video.sampling import OUT_OF_BOUND, sample_clips
from nonlocal_dist.video.transforms import ClipTransform, clip_rng


def _nbytes(clip: Tensor) -> int:
    return clip.nbytes


def read_annotations(ann_file: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str] | None]:
    """``[(path, label)]`` and the class names (None when the labels are integers)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    text = ann_file.read_text()
    if ann_file.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        where = "CSV row"
    else:
        rows = [line.split() for line in text.splitlines() if line.strip()]
        where = "line"
    if not rows:
        raise ValueError(f"{ann_file}: no clips; expected lines 'path label' (or a CSV 'path,label')")
    bad = next((i for i, r in enumerate(rows) if len(r) != 2), None)
    if bad is not None:
        raise ValueError(f"{ann_file}: {where} {bad + 1} is {rows[bad]!r}; expected two fields, a path and a "
                         "label (paths with spaces: use a CSV)")
    labels = [r[1].strip() for r in rows]
    if all(lab.lstrip("-").isdigit() for lab in labels):
        ints = [int(lab) for lab in labels]
        if min(ints) < 0:
            raise ValueError(f"{ann_file}: labels must be >= 0, got {min(ints)}")
        return [(r[0].strip(), y) for r, y in zip(rows, ints)], None
    classes = sorted(set(labels))
    lookup = {name: i for i, name in enumerate(classes)}
    return [(r[0].strip(), lookup[lab]) for r, lab in zip(rows, labels)], classes


class VideoClipDataset(Dataset):
    """Clips of the videos listed in ``ann_file``, this rank's time shard of each.

    ``dataset[index]`` or ``dataset[(index, epoch)]`` (what ``TrainBatchSampler`` yields) is a dict:
    ``clip`` float32 (C, T_r, h, w), or (num_clips, C, T_r, h, w) when ``num_clips`` > 1, with T_r =
    ``even_sizes(clip_len, world)[rank]`` for ``shard=(rank, world)`` (T_r = clip_len without a shard);
    ``label``, ``index``, ``epoch`` ints; ``ok`` bool and ``error`` str (an unusable clip has ``clip``
    None and the reason). Sampling is mmaction2's (``sample_clips``), transforms ``transform``'s.
    ``cache_mb`` > 0 keeps decoded shards in memory (see the module docstring); ``cache_info()`` gives
    this process's hits, misses and bytes held.
    """

    def __init__(self, ann_file: str | os.PathLike, data_prefix: str | os.PathLike = "", *, clip_len: int,
                 frame_interval: int = 1, num_clips: int = 1, test_mode: bool = False,
                 transform: ClipTransform | None = None, fmt: str = "rgb24", shard: tuple[int, int] | None = None,
                 seed: int = 0, out_of_bound: str = "loop", backend: str = "pyav", threads: int = 1,
                 cache_mb: float = 0) -> None:
        self.samples, self.classes = read_annotations(ann_file)
        self.data_prefix = Path(data_prefix)
        self._paths = [os.path.join(self.data_prefix, path) for path, _ in self.samples]
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
        self.transform = transform if transform is not None else ClipTransform()
        if len(self.transform.mean) != FORMATS[fmt]:
            raise ValueError(f"fmt={fmt!r} decodes {FORMATS[fmt]} channel(s), the transform's mean/std have "
                             f"{len(self.transform.mean)}; give one mean and std per channel")
        if out_of_bound not in OUT_OF_BOUND:
            raise ValueError(f"out_of_bound must be one of {OUT_OF_BOUND}, got {out_of_bound!r}")
        sample_clips(max(clip_len, 1), clip_len, frame_interval, num_clips, test_mode=True)  # validates the three
        self.shard = None if shard is None else check_shard(shard)
        self.clip_len, self.frame_interval, self.num_clips = clip_len, frame_interval, num_clips
        self.test_mode, self.fmt, self.seed, self.out_of_bound = test_mode, fmt, seed, out_of_bound
        self.backend, self.threads = backend, threads
        if not isinstance(cache_mb, (int, float)) or isinstance(cache_mb, bool) or not cache_mb >= 0:
            raise ValueError(f"cache_mb must be a number >= 0 (MiB of decoded frames kept per process), got {cache_mb!r}")
        self.cache_mb = cache_mb
        self._cache = None
        if cache_mb:
            from cachetools import LRUCache  # the video extra

            self._cache = LRUCache(int(cache_mb * 2**20), getsizeof=_nbytes)
        self._hits = self._misses = 0

    def cache_info(self) -> dict:
        """This process's decoded-shard cache: ``hits``, ``misses`` (reads that decoded), ``bytes`` held,
        ``clips`` held and ``max_bytes`` (all 0 without ``cache_mb``)."""
        cache = self._cache
        return {"hits": self._hits, "misses": self._misses, "bytes": int(cache.currsize) if cache else 0,
                "clips": len(cache) if cache else 0, "max_bytes": int(cache.maxsize) if cache else 0}

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return self._paths[index]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"clip index {index} out of range for {len(self.samples)} clips")
        item = {"label": self.samples[index][1], "index": index, "epoch": epoch, "ok": True, "error": ""}
        try:
            item["clip"] = self._clip(index, epoch)
        except VideoReadError as exc:
            item.update(clip=None, ok=False, error=str(exc))
        return item

    def _clip(self, index: int, epoch: int) -> Tensor:
        path = self.path(index)
        info = probe(path)
        rng = clip_rng(self.seed, epoch, index)
        frames = sample_clips(info.num_frames, self.clip_len, self.frame_interval, self.num_clips,
                              test_mode=self.test_mode, rng=rng, out_of_bound=self.out_of_bound)
        lo, hi = shard_range(self.clip_len, self.shard)
        mine = frames[:, lo:hi].reshape(-1)
        t = self.transform
        clip = self._decoded(index, path, mine)
        box = t.draw(rng, *output_size(info.height, info.width, t.short_side), self.test_mode)
        if self.num_clips == 1:
            return t(clip, box)
        return t(clip.unflatten(1, (self.num_clips, hi - lo)).transpose(0, 1), box)  # (N, C, T_r, h, w)


    def _decoded(self, index: int, path: str, frames: np.ndarray) -> Tensor:
        """Frames ``frames`` of clip ``index`` as (C, T, h, w) uint8, from the cache or decoded (and kept)."""
        key = (index, frames.tobytes())
        if self._cache is not None and key in self._cache:
            self._hits += 1
            return self._cache[key]
        self._misses += 1
        clip = read_frames(path, frames, size=self.transform.short_side, fmt=self.fmt, backend=self.backend,
                           threads=self.threads)
        if self._cache is not None and clip.nbytes <= self._cache.maxsize:
            self._cache[key] = clip
        return clip


def collate_clips(samples: list[dict]) -> dict:
    """A batch: ``clip`` (B, ...) with zeros for unusable clips, ``label``/``index``/``epoch`` int64 (B,),
    ``ok`` bool (B,), ``error`` list of str."""
    shapes = {tuple(s["clip"].shape) for s in samples if s["ok"]}
    if len(shapes) > 1:
        raise ValueError(f"clips of one batch differ in shape {sorted(shapes)}: give the transform a crop_size "
                         "(or a short_side on videos of one aspect ratio) so every clip has one size")
    shape = shapes.pop() if shapes else (0,)
    clips = torch.zeros((len(samples), *shape), dtype=torch.float32)
    for i, s in enumerate(samples):
        if s["ok"]:
            clips[i] = s["clip"]
    batch = {key: torch.tensor([s[key] for s in samples], dtype=torch.int64) for key in ("label", "index", "epoch")}
    return {"clip": clips, **batch, "ok": torch.tensor([s["ok"] for s in samples]),
            "error": [s["error"] for s in samples]}


def clip_loader(dataset: Dataset, batch_sampler: Sampler, workers: int = 0, timeout: float = 0, **kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` that batches with ``collate_clips``; ``workers`` > 0 start from a
    fork server, never by forking the caller.

    A forked worker inherits the caller's locks but not the threads that hold them: after gloo,
    DeepSpeed, a TCPStore or earlier loaders have run threads, a forked worker can wait forever on a
    lock taken at the fork (seen: an evaluation loader in training, and this package's test suite).
    A fork server is a fresh single-threaded process that imported torch and this module once, so
    each worker starts clean and fast. As with ``spawn``, the dataset, its transform and any
    ``worker_init_fn`` must pickle, and a script guards its entry point (``if __name__ ==
    "__main__"``). ``timeout``: seconds a worker's batch may take before the loader raises (0: no
    limit; without workers the batches are made in this process and nothing is timed); other keyword
    arguments (``persistent_workers``, ``prefetch_factor``, ...) go to ``DataLoader``.
    """
    context = None
    if workers:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "nonlocal_dist.video"])  # when the server starts
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_clips, num_workers=workers,
                      multiprocessing_context=context, timeout=timeout if workers else 0, **kwargs)


def agree_usable(batch: dict, group=None) -> tuple[dict, list[tuple[int, str]]]:
    """The clips of ``batch`` usable on every rank of ``group`` (a sequence-parallel group; None: this
    process alone), and the skipped ones as ``(index, this rank's error)``.

    Two small collectives: the ranks check that they hold the same clips (else every rank raises
    ``ValueError``), then drop together every clip some rank could not decode. Call it on every rank
    of the group for every batch, before the step.
    """
    ok = batch["ok"]
    if group is not None:
        keys = tuple(zip(batch["index"].tolist(), batch["epoch"].tolist()))
        agree_across_ranks(group, lambda: (None, {"clips": keys}), ("clips",),
                           what="agree_usable (every rank of a sequence-parallel group reads the same clips: sample "
                                "by the data-parallel rank, e.g. TrainBatchSampler(dp_rank=...))")
        failed = all_reduce_max((~ok).to(torch.int64).to(exchange_device(group)), group).cpu()
        ok = failed == 0
    skipped = [(int(i), err or "unreadable on another rank of the group")
               for i, err, good in zip(batch["index"].tolist(), batch["error"], ok.tolist()) if not good]
    keep = ok.nonzero().flatten()
    usable = {key: batch[key][keep] for key in ("clip", "label", "index", "epoch")}
    return usable, skipped


class TrainBatchSampler(Sampler):
    """Training batches by step: step s is batch ``s % per_epoch`` of epoch ``s // per_epoch``, where an
    epoch is a permutation of all clips (``default_rng(seed + epoch)``) cut into global batches of
    ``batch_size * dp_size`` (the tail dropped), and this data-parallel rank takes its ``batch_size``
    clips of each. Yields ``[(index, epoch)] * batch_size`` for steps ``start_step`` to ``steps - 1``:
    a pure function of the step (resume is exact), the same on every rank of a sequence-parallel group.
    """

    def __init__(self, num_clips: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1, *, steps: int,
                 start_step: int = 0, seed: int = 0) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if batch_size < 1 or num_clips < batch_size * dp_size:
            raise ValueError(f"{num_clips} clips cannot make one global batch of {batch_size} x {dp_size} "
                             "data-parallel ranks; lower the batch size or add clips")
        self.num_clips, self.batch_size, self.dp_rank, self.dp_size = num_clips, batch_size, dp_rank, dp_size
        self.steps, self.start_step, self.seed = steps, start_step, seed

    def batch(self, step: int) -> list[tuple[int, int]]:
        global_batch = self.batch_size * self.dp_size
        epoch, offset = divmod(step, self.num_clips // global_batch)
        order = np.random.default_rng(self.seed + epoch).permutation(self.num_clips)
        start = offset * global_batch + self.dp_rank * self.batch_size
        return [(int(i), epoch) for i in order[start : start + self.batch_size]]

    def __iter__(self):
        return (self.batch(step) for step in range(self.start_step, self.steps))

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)


class EvalBatchSampler(Sampler):
    """Evaluation batches: contiguous runs of ``batch_size`` clips dealt round-robin over the data-parallel
    ranks (every clip once over all ranks), as ``[(index, 0)]`` lists."""

    def __init__(self, num_clips: int, batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= dp_rank < dp_size, got {batch_size}, {dp_rank}, {dp_size}")
        self.starts = range(dp_rank * batch_size, num_clips, dp_size * batch_size)
        self.num_clips, self.batch_size = num_clips, batch_size

    def __iter__(self):
        return ([(i, 0) for i in range(s, min(s + self.batch_size, self.num_clips))] for s in self.starts)

    def __len__(self) -> int:
        return len(self.starts)
