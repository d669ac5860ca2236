"""The main job: a video classifier with non-local blocks (C2D, or I3D with temporal convolutions),
trained on digit clips with DeepSpeed, sequence-parallel over time and data-parallel over clips,
logged to W&B (offline by default).

    deepspeed --num_gpus 2 scripts/train.py --deepspeed_config configs/ds_zero2.json --sp-size 2
    torchrun --nproc_per_node 2 scripts/train.py --deepspeed_config configs/ds_zero2.json --sp-size 2
    ... --model i3d           # I3D on 12-frame clips (configs/experiment_i3d.json), sharded by parallelize
    ... --ablation            # the same network without non-local blocks, same budget
    ... --resume              # continue from the latest checkpoint in --ckpt-dir, exactly
    ... --videos runs/videos  # the digit clips written once as video files, read back through
                              # VideoClipDataset + DataLoader, each SP rank decoding its own frames
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from nonlocal_dist.integrations.deepspeed_sp import (
    init_distributed,
    init_sequence_parallel,
    initialize,
    loss_scale,
    model_context,
    resolve_sp_size,
    shard_batch,
)
from nonlocal_dist.integrations.faults import (
    Fault,
    SkipCounter,
    StepGuard,
    apply_group_timeout,
    begin_fresh,
    check_finite,
    load_checkpoint,
    resolve_timeout,
    save_checkpoint,
)
from nonlocal_dist.integrations.wandb_logger import RunLogger, rank_perf
from nonlocal_dist.integrations.wandb_maps import AttentionMapLogger

from nonlocal_dist import parallelize
from nonlocal_dist.checkpointing import KINDS as CHECKPOINT_KINDS
from nonlocal_dist.checkpointing import apply_activation_checkpointing
from nonlocal_dist.data import DIGIT_VIDEO_SCALE, digit_clips, write_digit_videos
from nonlocal_dist.distributed.teardown import end_process_groups
from nonlocal_dist.models import C2DNonLocal, I3DNonLocal
from nonlocal_dist.sharded import from_local
from nonlocal_dist.video import TrainBatchSampler

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"c2d": ROOT / "configs/experiment.json", "i3d": ROOT / "configs/experiment_i3d.json"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS),
                   help="c2d: 1x3x3 convolutions, frames meet only in the non-local blocks; i3d: temporal convolutions "
                        "too, sharded over time with halo exchange (default: the experiment config's model.name)")
    p.add_argument("--experiment", help="experiment config (JSON) (default: configs/experiment.json, with --model i3d "
                                        "configs/experiment_i3d.json)")
    p.add_argument("--sp-size", type=int,
                   help="ranks sharing one clip along time (default: the DeepSpeed config's sequence_parallel_size, else 1)")
    p.add_argument("--steps", type=int, help="training steps (default: the experiment config's)")
    p.add_argument("--stop-after", type=int, help="leave after this many steps of this run (a preemption)")
    p.add_argument("--ablation", action="store_true", help="no non-local blocks")
    p.add_argument("--activation-checkpoint", choices=CHECKPOINT_KINDS,
                   help="recompute the non-local blocks in the backward instead of keeping their activations")
    p.add_argument("--ckpt-dir", default="runs/checkpoints")
    p.add_argument("--ckpt-every", type=int, help="checkpoint period in steps (default: the experiment config's)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    p.add_argument("--wandb", choices=["offline", "online", "disabled"], default="offline")
    p.add_argument("--run-dir", default="runs", help="W&B run directory and metrics output")
    p.add_argument("--maps-every", type=int,
                   help="log the non-local attention maps of one held-out clip every N steps (0: never; default: the experiment config's)")
    p.add_argument("--train-clips", type=int)
    p.add_argument("--test-clips", type=int)
    p.add_argument("--timeout", type=float,
                   help="process-group timeout in seconds: a rank that dies or hangs stops the others within it; it must "
                        "exceed the longest time one rank works alone while the others wait (rank 0 writing a "
                        "checkpoint or W&B images) (default: DEEPSPEED_TIMEOUT minutes, else 600)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose input or loss is non-finite on any rank (default: stop, naming step and rank)")
    p.add_argument("--max-skips", type=int, default=5,
                   help="with --skip-nonfinite: stop after more than this many consecutive skipped steps")
    p.add_argument("--fault", metavar="KIND:RANK:STEP",
                   help=f"inject a fault to test the failure paths; KIND in {Fault.KINDS}")
    p.add_argument("--videos", metavar="DIR",
                   help="train from video files: the experiment's digit clips are written once under DIR/<model> "
                        "(FFV1, lossless) with annotation files, then read through VideoClipDataset and a DataLoader, "
                        "each sequence-parallel rank decoding only its frames (default: clips in memory)")
    p.add_argument("--video-workers", type=int, default=1, help="DataLoader workers per rank with --videos")
    p.add_argument("--video-cache-mb", type=float, default=0,
                   help="with --videos: keep this many MiB of decoded training shards per worker, so a dataset that "
                        "fits is decoded once per rank and later epochs crop and flip the kept frames (default: 0, "
                        "decode every read)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def load_configs(args):
    path = Path(args.experiment) if args.experiment else MODELS[args.model or "c2d"]
    exp = json.loads(path.read_text())
    if exp["model"].get("name") not in MODELS:
        raise ValueError(f"{path}: model.name must be one of {sorted(MODELS)}, got {exp['model'].get('name')!r}")
    if args.model is not None and args.model != exp["model"]["name"]:
        raise ValueError(f"--model {args.model} but {path} describes model {exp['model']['name']!r}; "
                         f"drop --model or pass --experiment {MODELS[args.model]}")
    ds = json.loads(Path(args.deepspeed_config).read_text())
    for key, arg in (("steps", "steps"), ("checkpoint_every", "ckpt_every")):
        if getattr(args, arg) is not None:
            exp["train"][key] = getattr(args, arg)
    for key in ("train_clips", "test_clips"):
        if getattr(args, key) is not None:
            exp["data"][key] = getattr(args, key)
    ds["train_micro_batch_size_per_gpu"] = exp["train"]["micro_batch"]
    ds["optimizer"]["params"]["lr"] = exp["train"]["lr"]
    if "warmup_fraction" in exp["train"]:
        ds["scheduler"] = cosine_schedule(exp["train"]["warmup_fraction"], exp["train"]["steps"], path)
    return exp, ds


def cosine_schedule(fraction: float, steps: int, path) -> dict:
    """DeepSpeed's scheduler section for the experiment's ``train.warmup_fraction``: the learning rate rises
    linearly from 0 to ``train.lr`` over that fraction of the steps, then falls to 0 along a cosine by the last
    step (a checkpoint carries the schedule's position, so a resumed run goes on where it stopped)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"{path}: train.warmup_fraction must be a number between 0 and 1 (0.1: a tenth of the "
                         f"steps), got {fraction!r}; drop it for a constant learning rate")
    return {"type": "WarmupCosineLR", "params": {"total_num_steps": steps, "warmup_type": "linear",
                                                 "warmup_num_steps": max(2, round(fraction * steps)),
                                                 "cos_min_ratio": 0.0}}


def build_model(exp, ds, sp, ablation: bool, checkpoint: str | None = None):
    """The experiment's network, sharded over time across the SP group, non-local blocks checkpointed if asked."""
    torch.manual_seed(exp["data"]["seed"])  # identical initial weights on every rank
    m = {key: value for key, value in exp["model"].items() if key != "name"}
    with model_context(ds, sp):
        if exp["model"]["name"] == "c2d":
            model = C2DNonLocal(in_channels=1, num_classes=2, widths=tuple(m["widths"]),
                                nonlocal_after=() if ablation else tuple(m["nonlocal_after"]), mode=m["mode"],
                                sp_group=sp.sp_group)
        else:
            m["nonlocal_stages"] = () if ablation else m["nonlocal_stages"]
            model = I3DNonLocal(in_channels=1, num_classes=2, **m)
    if exp["model"]["name"] != "c2d" and sp.sp_group is not None:
        parallelize(model, sp.sp_group, axis="t")
    return model if checkpoint is None else apply_activation_checkpointing(model, checkpoint)


def forward(engine, x, sp, dtype, local: bool = False):
    """Logits (B, classes) in float32 on the engine's device, from whole clips ``x`` (B, 1, T, H, W) on the CPU,
    or (``local``) from this rank's time shards of them (B, 1, T_r, H, W), decoded by this rank."""
    if local and sp.sp_group is not None:
        return engine(from_local(x, sp.sp_group, "b c t h w", "t").to(engine.device, dtype)).float()
    return engine(shard_batch(x, sp).to(engine.device, dtype)).float()


class VideoData:
    """The digit clips as video files read back per rank (``--videos``): this rank's time shard of each clip."""

    def __init__(self, root: Path, d: dict, sp, workers: int, cache_mb: float = 0):
        from nonlocal_dist.video import ClipTransform, VideoClipDataset

        clip_args = (d["frames"], d["size"], d["seed"], d["classes"], d.get("min_gap", 1))
        if dist.get_rank() == 0:  # one writer; the others wait at the barrier
            for split in ("train", "test"):
                write_digit_videos(root, d[f"{split}_clips"], split, *clip_args)
        dist.barrier()
        common = {"clip_len": d["frames"], "fmt": "gray", "seed": d["seed"],
                  "transform": ClipTransform(mean=(0,), std=(DIGIT_VIDEO_SCALE,))}
        shard = (sp.sp_rank, sp.sp_size)
        self.train = VideoClipDataset(root / "train.txt", root, shard=shard, cache_mb=cache_mb, **common)
        self.train_eval = VideoClipDataset(root / "train.txt", root, shard=shard, test_mode=True, **common)
        self.test = VideoClipDataset(root / "test.txt", root, shard=shard, test_mode=True, **common)
        self.whole_test = VideoClipDataset(root / "test.txt", root, test_mode=True, **common)
        self.sp, self.workers, self.skipped = sp, workers, 0

    def loader(self, dataset, batch_sampler):
        from nonlocal_dist.video import clip_loader

        return clip_loader(dataset, batch_sampler, self.workers)

    def usable(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shards and labels of the clips every rank of the SP group decoded (others counted, said)."""
        from nonlocal_dist.video import agree_usable

        usable, skipped = agree_usable(batch, self.sp.sp_group)
        self.skipped += len(skipped)
        for index, error in skipped:
            print(f"rank {dist.get_rank()}: skipping clip {index}: {error}", flush=True)
        return usable["clip"], usable["label"]


def train_step(engine, x, y, sp, dtype, scale: float, step: int, skip_nonfinite: bool, fault: Fault | None,
               local: bool = False):
    """One optimiser step; (loss, logits), or None when the loss is non-finite on some rank and the step is
    skipped, with the model's buffers (BatchNorm statistics) put back as they were before the forward."""
    buffers = [b.detach().clone() for b in engine.module.buffers()] if skip_nonfinite else None
    logits = forward(engine, x, sp, dtype, local)
    loss = F.cross_entropy(logits, y.to(logits.device))
    if fault is not None:
        fault.fire("kill", dist.get_rank(), step)
        fault.fire("hang", dist.get_rank(), step)
        if fault.fire("nan-loss", dist.get_rank(), step):
            loss = loss + float("nan")
    if not check_finite(step, skip_nonfinite, loss=loss.detach()):
        with torch.no_grad():
            for b, saved in zip(engine.module.buffers(), buffers):
                b.copy_(saved)
        return None, None
    engine.backward(loss * scale)
    engine.step()
    return loss, logits


def evaluate(engine, clips, labels, sp, micro: int, dtype, videos: VideoData | None = None, num_clips: int = 0
             ) -> tuple[float, float]:
    """Accuracy and mean loss on held-out clips, split over the data-parallel ranks: ``clips``/``labels`` in
    memory, or with ``videos`` the first ``num_clips`` of the dataset ``clips``."""
    from nonlocal_dist.video import EvalBatchSampler

    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    count = num_clips if videos is not None else len(labels)
    sampler = EvalBatchSampler(count, micro, sp.dp_rank, sp.dp_size)
    batches = videos.loader(clips, sampler) if videos is not None else sampler
    with torch.no_grad():
        for batch in batches:
            if videos is not None:
                x, y = videos.usable(batch)
            else:
                idx = [i for i, _ in batch]
                x, y = clips[idx], labels[idx]
            if len(y) == 0:
                continue
            logits = forward(engine, x, sp, dtype, local=videos is not None)
            y = y.to(logits.device)
            totals += torch.tensor([(logits.argmax(1) == y).sum().item(), F.cross_entropy(logits, y, reduction="sum").item(), len(y)], dtype=torch.float64)
    totals = totals.to(engine.device)  # NCCL reduces device tensors only
    dist.all_reduce(totals)
    totals /= sp.sp_size  # every SP rank of a group counted the same clips
    engine.train()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def main(argv=None):
    args = parse_args(argv)
    timeout, fault = resolve_timeout(args.timeout), Fault.parse(args.fault)
    init_distributed(timeout=timeout)
    apply_group_timeout(timeout)
    with StepGuard(dist.get_rank(), timeout, args.ckpt_dir) as guard:
        train(args, fault, guard)
    end_process_groups()  # on torch < 2.8 with gloo: skipped (it can hang there); __main__ leaves by os._exit


def train(args, fault: Fault | None, guard: StepGuard) -> None:
    """Set-up, training, evaluation and logging; failures anywhere here go through ``guard``."""
    rank = dist.get_rank()
    exp, ds = load_configs(args)
    sp = init_sequence_parallel(resolve_sp_size(ds, args.sp_size))
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    d, t = exp["data"], exp["train"]
    clip_args = (d["frames"], d["size"], d["seed"], d["classes"], d.get("min_gap", 1))
    videos = None
    if args.videos:
        videos = VideoData(Path(args.videos) / exp["model"]["name"], d, sp, args.video_workers, args.video_cache_mb)
        train_x, train_y, test_x, test_y = videos.train, None, videos.test, None
        first_test = videos.whole_test[0]["clip"][None]
    else:
        train_x, train_y = digit_clips(d["train_clips"], "train", *clip_args)
        test_x, test_y = digit_clips(d["test_clips"], "test", *clip_args)
        first_test = test_x[:1]
    engine = initialize(build_model(exp, ds, sp, args.ablation, args.activation_checkpoint), ds, sp)
    start_step = load_checkpoint(engine, args.ckpt_dir)["step"] if args.resume else begin_fresh(args.ckpt_dir)
    guard.step = start_step
    model_name = "" if exp["model"]["name"] == "c2d" else f"{exp['model']['name']}-"  # c2d: the names of earlier runs
    variant = "ablation" if args.ablation else "nonlocal"
    name = f"{model_name}{variant}-sp{sp.sp_size}-zero{ds.get('zero_optimization', {}).get('stage', 0)}"
    logger = RunLogger(rank, args.wandb, exp["wandb"]["project"], {"experiment": exp, "deepspeed": ds,
                       "sp_size": sp.sp_size, "ablation": args.ablation, "world": dist.get_world_size()},
                       args.run_dir, name)
    micro, global_batch = t["micro_batch"], t["micro_batch"] * sp.dp_size
    scale = loss_scale(ds, sp)
    maps_every = exp["wandb"].get("maps_every", 0) if args.maps_every is None else args.maps_every
    maps = AttentionMapLogger(engine, logger, maps_every, first_test, lambda clip: forward(engine, clip, sp, dtype))
    history, skipped, skips = [], [], SkipCounter(args.max_skips)
    steps_this_run = t["steps"] - start_step if args.stop_after is None else min(args.stop_after, t["steps"] - start_step)
    progress = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=t["steps"], initial=start_step, desc=name, unit="step")
    sampler = TrainBatchSampler(d["train_clips"], micro, sp.dp_rank, sp.dp_size, steps=start_step + steps_this_run,
                                start_step=start_step, seed=d["seed"])
    batches = iter(videos.loader(train_x, sampler) if videos is not None else sampler)
    data_seconds = step_seconds = data_total = 0.0
    clock = loop_start = time.perf_counter()
    for step in range(start_step, start_step + steps_this_run):
        guard.step = step + 1
        begin = time.perf_counter()
        if videos is not None:
            x, y = videos.usable(next(batches))
        else:
            idx = [i for i, _ in next(batches)]
            x, y = train_x[idx], train_y[idx]
        fed = torch.tensor([len(y)])
        dist.all_reduce(fed, op=dist.ReduceOp.MIN)  # a data-parallel group left with no usable clip: all skip
        data_seconds += time.perf_counter() - begin
        data_total += time.perf_counter() - begin
        if fault is not None and fault.fire("nan", rank, step + 1):
            x = x.clone().fill_(float("nan"))
        lr = engine.get_lr()[0]  # this step's learning rate (the scheduler moves it on in the step)
        if int(fed) > 0 and check_finite(step + 1, args.skip_nonfinite, input=x):
            loss, logits = train_step(engine, x, y, sp, dtype, scale, step + 1, args.skip_nonfinite, fault,
                                      local=videos is not None)
        else:
            loss = None
        step_seconds += time.perf_counter() - begin
        skips.record(step + 1, loss is None)
        if loss is None:
            skipped.append(step + 1)
        else:
            history.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        if loss is not None and ((step + 1) % t["log_every"] == 0 or step + 1 == t["steps"]):
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            acc = (logits.argmax(1).cpu() == y).float().mean().item()
            logger.log({"train/loss": loss.item(), "train/accuracy": acc, "train/lr": lr,
                        "train/skipped_steps": len(skipped),
                        "data/skipped_clips": videos.skipped if videos is not None else 0,
                        "perf/samples_per_s": t["log_every"] * global_batch / elapsed,
                        "perf/data_seconds_per_step": data_seconds / t["log_every"],
                        "perf/step_seconds": step_seconds / t["log_every"],
                        "perf/peak_rss_mb_rank0": peak_rss_mb()}, engine.global_samples)
            data_seconds = step_seconds = 0.0
        maps.maybe_log(step + 1, engine.global_samples)
        if (step + 1) % t["checkpoint_every"] == 0 or step + 1 == t["steps"]:
            save_checkpoint(engine, args.ckpt_dir, f"step{step + 1}", {"step": step + 1}, fault, step + 1)
        if progress is not None:
            progress.update(1)
            if loss is not None:
                progress.set_postfix(loss=f"{loss.item():.3f}")
    if progress is not None:
        progress.close()
    del batches  # the training loader's workers (and their decoded-shard caches) end here
    logger.rank_table("perf/ranks", rank_perf(steps_this_run * micro, time.perf_counter() - loop_start - maps.seconds,
                                              sp_rank=sp.sp_rank, dp_rank=sp.dp_rank))
    finished = start_step + steps_this_run == t["steps"]
    result = {"name": name, "history": history, "skipped_steps": skipped, "finished": finished,
              "skipped_clips": videos.skipped if videos is not None else 0,
              "train_seconds": round(time.perf_counter() - loop_start, 1), "data_seconds": round(data_total, 1)}
    if finished:
        if videos is not None:
            train_acc, train_loss = evaluate(engine, videos.train_eval, None, sp, micro, dtype, videos, d["test_clips"])
            test_acc, test_loss = evaluate(engine, test_x, None, sp, micro, dtype, videos, d["test_clips"])
        else:
            train_acc, train_loss = evaluate(engine, train_x[: d["test_clips"]], train_y[: d["test_clips"]], sp, micro,
                                             dtype)
            test_acc, test_loss = evaluate(engine, test_x, test_y, sp, micro, dtype)
        result.update(train_accuracy=train_acc, test_accuracy=test_acc, test_loss=test_loss, train_loss=train_loss)
        logger.log({"eval/test_accuracy": test_acc, "eval/test_loss": test_loss, "eval/train_accuracy": train_acc},
                   engine.global_samples)
        logger.summary({"test_accuracy": test_acc})
        if rank == 0:
            print(f"\n| run | steps | clips seen | train acc | held-out acc | held-out loss |\n|---|---|---|---|---|---|\n"
                  f"| {name} | {t['steps']} | {int(engine.global_samples)} | {train_acc:.3f} | {test_acc:.3f} | {test_loss:.3f} |")
    where = logger.finish()
    if rank == 0:
        result["wandb_dir"] = where
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.run_dir) / f"{name}.json").write_text(json.dumps(result, indent=1))
        if where:
            print(f"W&B run ({args.wandb}) written to {where}")
    dist.barrier()


if __name__ == "__main__":
    faulthandler.enable()  # a C++ abort or crash prints every thread's Python stack
    main()
    # Trained, written, W&B finished and every process group destroyed: leave without interpreter
    # finalization, where the destructors of objects still alive (DeepSpeed's groups and engine, gloo's
    # worker threads) aborted a finished rank once in CI ("terminate called without an active
    # exception", exit -6: about 1 exit in 100+, not reproduced in 70 here).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
