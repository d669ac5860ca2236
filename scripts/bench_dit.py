"""A video diffusion transformer's forward+backward on 2 ranks: ours against diffusers' own context
parallelism (Ulysses), same model, input and run (issue 25's DiT target).

diffusers' ``WanTransformer3DModel`` (``--model wan``: latents (1, 16, T, S, S), 2x2 patches) or
``LTXVideoTransformer3DModel`` (``--model ltx``: tokens (1, T (S/2)^2, 16), the same count), small
configs, random weights, float32, text (1, 16, 64), one forward and backward of ``(out * w).sum()``:

- **one process**: the model as it is (1 thread);
- **diffusers Ulysses**: ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``
  on P gloo ranks. On a CPU build it needs two patches, applied here and nowhere else:
  ``torch.accelerator.device_count`` must not be 0 (diffusers computes ``rank % device_count()``) and
  its context-parallel hook's logger lacks ``warning_once`` (called for the 1-D timestep);
- **ours**: ``parallelize(model, pg, "t", inputs=("hidden_states",))`` on the same P ranks (LTX:
  axis ``"n"`` of layout ``"b n c"``): attention by the default (the ring, the lowest memory, or the
  all-gather where the whole keys and values take at most 1 MiB), then with each strategy named:
  ``"allgather"`` (one collective per attention: faster where the keys are few) and ``"ring"``.

Columns: the output's max abs error against one process, the best wall time of the step over
``--repeats`` (the slowest rank; the median of the rounds), the mean wall time of every timed step
(each step's slowest rank: what a training run's throughput sees, where the best time shows the
luckiest step), then four memory measures per rank (the largest rank's), each with its ratio to
diffusers' Ulysses:

- **heap peak** (``bench_utils.peak_heap_mb``; the median of the rounds): the bytes malloc holds,
  read after every op, whichever thread allocates or frees them (gloo's worker threads included):
  the memory measure of the DiT target. It misses a kernel's workspace freed inside its op;
- **allocator peak** (``bench_utils.peak_memory_mb``; the least of the rounds): torch's CPU
  allocator's events, workspaces included, but an upper bound that moves between runs of the same
  step (frees on threads the profiler does not follow; the README gives the spread);
- **tensor peak** (``bench_utils.peak_tensor_mb``; the median of the rounds): the bytes held by the
  step's tensors, counted op by op, blind to workspaces and to what gloo holds beyond a tensor;
- **saved for backward** (``bench_utils.saved_tensor_mb``): exact and the same in every run, the
  activation memory each parallel form keeps; the peaks add transients and collective buffers.

    python scripts/bench_dit.py [--model wan|ltx] [--forward] [--world 2] [--frames 8] [--size 16] [--repeats 5]
    python scripts/bench_dit.py --mesh [--frames 8] [--size 16]   # Wan on a 2 x 2 (t, h) mesh of 4 ranks
    python scripts/bench_dit.py --in-line   # adds the default with the backward's gathers in line (ablation)

diffusers' Ulysses cannot run LTX's forward+backward here: with the pipeline's text mask its forward
fails (``The size of tensor a (2) must match the size of tensor b (4) at non-singleton dimension 1``),
and without one its backward does (``shape '[1, 2, 256, 2, 32]' is invalid``: its all-to-all backward
assumes the keys as long as the queries, which the text cross-attention's are not). So LTX is
compared forward only (``--forward``), without the mask.
"""
from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch
from bench_utils import (
    peak_heap_mb,
    peak_memory_mb,
    peak_tensor_mb,
    print_table,
    saved_tensor_mb,
    spawn_ranks,
    step_times,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("wan", "ltx"), default="wan", help="which diffusers transformer")
    p.add_argument("--world", type=int, default=2, help="ranks P")
    p.add_argument("--frames", type=int, default=8, help="latent frames T")
    p.add_argument("--size", type=int, default=16, help="latent height and width S (tokens: T S^2 / 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per round (the best taken)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, each timing every run in turn (alternated); the median of the rounds' bests is reported")
    p.add_argument("--forward", action="store_true", help="forward only, under no_grad (inference)")
    p.add_argument("--in-line", action="store_true",
                   help="add an ablation row: the default with every backward gather of the keys in line (the "
                        "all-gather's RegatherAhead chain off), the form before the fourteenth session")
    p.add_argument("--mesh", action="store_true",
                   help="Wan on 4 ranks as a 2 x 2 (t, h) mesh: ours with the tokens split over the mesh, ours "
                        "with h gathered for them (the mesh's dims in the other order), ours over t alone, and "
                        "diffusers' Ulysses of degree 4")
    args = p.parse_args(argv)
    if args.mesh:
        if args.model != "wan":
            p.error("--mesh runs Wan (its latents are (b, c, t, h, w))")
        args.world = 4
    return args


def _model(args):
    import diffusers

    torch.manual_seed(0)
    if args.model == "ltx":
        return diffusers.LTXVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
            num_layers=2, caption_channels=64).eval()
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=64).eval()


def _inputs(args):
    g = torch.Generator().manual_seed(1)
    if args.model == "ltx":
        x = torch.randn(1, args.frames * (args.size // 2) ** 2, 16, generator=g)
    else:
        x = torch.randn(1, 16, args.frames, args.size, args.size, generator=g)
    text = torch.randn(1, 16, 64, generator=g)
    w = torch.randn(x.shape, generator=g)
    return x, torch.tensor([500]), text, w


def _forward(args):
    """model, latents, timestep, text -> the model's output, as its pipeline calls it."""
    if args.model == "ltx":
        mask = None  # LTX's pipeline passes a text mask; with one, diffusers' Ulysses fails (README)
        side = args.size // 2
        return lambda m, x, t, text: m(x, text, t, mask, num_frames=args.frames, height=side, width=side,
                                       return_dict=False)[0]
    return lambda m, x, t, text: m(x, t, text, return_dict=False)[0]


def _step(model, forward, x, t, text, w, backward: bool = True):
    def run():
        if not backward:
            with torch.no_grad():
                return forward(model, x, t, text)
        model.zero_grad(set_to_none=True)
        out = forward(model, x, t, text)
        (out * w).sum().backward()
        return out.detach()

    return run


def _measure(models: dict, args) -> dict:
    """Each model's output, the median over ``args.rounds`` rounds of its best step time (every round
    times every model in turn, so that a slow spell of the machine falls on all of them), then, in as
    many rounds after the timed ones (a measure's hooks stay out of the timing), its heap and tensor
    peaks (the medians) and its allocator peak (the least: a block freed on a thread the profiler does
    not follow counts until its address is reused, so each measure is an upper bound)."""
    x, t, text, w = _inputs(args)
    runs = {name: _step(model, _forward(args), x, t, text, w, backward=not args.forward) for name, model in models.items()}
    results = {name: {"out": run(), "seconds": [], "steps": [], "peak_mb": [], "heap_mb": [], "tensor_mb": [],
                      "saved_mb": saved_tensor_mb(run)} for name, run in runs.items()}
    for _ in range(args.rounds):
        for name, run in runs.items():
            steps = step_times(run, args.repeats)
            results[name]["seconds"].append(min(steps))
            results[name]["steps"] += steps
    for _ in range(args.rounds):
        for name, run in runs.items():
            run()  # the step before the measure, as in the timed rounds
            results[name]["peak_mb"].append(peak_memory_mb(run))
            results[name]["heap_mb"].append(peak_heap_mb(run))
            results[name]["tensor_mb"].append(peak_tensor_mb(run))
    for r in results.values():
        r["seconds"], r["peak_mb"] = statistics.median(r["seconds"]), min(r["peak_mb"])
        r["heap_mb"], r["tensor_mb"] = statistics.median(r["heap_mb"]), statistics.median(r["tensor_mb"])
    return results


STRATEGIES = ("allgather", "ring", "ulysses")  # named after the default: each form's time and memory
IN_LINE = "ours, backward gathers in line (ablation)"


class _GathersInLine(torch.nn.Module):
    """A parallelized model whose forward records no all-gather node in the chain (``RegatherAhead``), so
    that its backward gathers each attention's keys in line: the ablation of the chain, same code else."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        from nonlocal_dist.sequence.allgather import RegatherAhead

        with mock.patch.object(RegatherAhead, "record", classmethod(lambda cls, ctx: None)):
            return self.model(*args, **kwargs)


def _ranks(rank, world, args, group) -> dict:
    import diffusers.hooks.context_parallel as hooks
    from diffusers import ContextParallelConfig

    from nonlocal_dist import parallelize

    torch.accelerator.device_count = lambda: 1  # diffusers' rank % device_count() on a CPU build
    hooks.logger.warning_once = hooks.logger.warning  # missing on its logger
    ulysses = _model(args)
    ulysses.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    if args.mesh:
        return _measure({"diffusers Ulysses": ulysses, **_mesh_models(args, group)}, args)
    axis, layout = ("n", "b n c") if args.model == "ltx" else ("t", "b c t h w")
    models = {"diffusers Ulysses": ulysses,
              "ours": parallelize(_model(args), group, axis, layout=layout, inputs=("hidden_states",))}
    for strategy in STRATEGIES:
        models[f"ours, strategy={strategy!r}"] = parallelize(_model(args), group, axis, layout=layout,
                                                            inputs=("hidden_states",), strategy=strategy)
    if args.in_line:
        models[IN_LINE] = _GathersInLine(parallelize(_model(args), group, axis, layout=layout, inputs=("hidden_states",)))
    return _measure(models, args)


MESH_RUNS = ("ours, 2 x 2 mesh (t, h): tokens over the mesh", "ours, 2 x 2 mesh (h, t): h gathered for the tokens",
             "ours, t over 4 ranks")


def _mesh_models(args, group) -> dict:
    """Wan on a 2 x 2 mesh. With the mesh's t dim outer, the (t h w) tokens are split over all four
    ranks; named the other way round, the span's ranks do not run t-major, so the tokens stay over the
    t group with h gathered, and the two ranks of each h-line compute alike (the behaviour before)."""
    from torch.distributed.device_mesh import init_device_mesh

    from nonlocal_dist import parallelize

    models = {}
    for name, mesh in zip(MESH_RUNS, (init_device_mesh("cpu", (2, 2), mesh_dim_names=("t", "h")),
                                      init_device_mesh("cpu", (2, 2), mesh_dim_names=("h", "t")), None)):
        if mesh is None:
            model = parallelize(_model(args), group, "t", layout="b c t h w", inputs=("hidden_states",))
        else:
            model = parallelize(_model(args), mesh, ("t", "h"), layout="b c t h w", inputs=("hidden_states",))
        models[name] = model
    return models


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    ref = _measure({"one process": _model(args)}, args)["one process"]
    ranks = spawn_ranks(_ranks, args.world, args)
    rows, base, base_mean = [], None, None
    names = MESH_RUNS if args.mesh else ("ours", *(f"ours, strategy={s!r}" for s in STRATEGIES))
    names += (IN_LINE,) if args.in_line and not args.mesh else ()
    for name in ("diffusers Ulysses", *names):
        seconds = max(r[name]["seconds"] for r in ranks.values())
        # every step's time as its slowest rank's (the ranks run the steps together), averaged
        mean = statistics.mean(max(step) for step in zip(*(r[name]["steps"] for r in ranks.values())))
        base_mean = base_mean or mean
        peak = max(r[name]["peak_mb"] for r in ranks.values())
        heap = max(r[name]["heap_mb"] for r in ranks.values())
        tensors = max(r[name]["tensor_mb"] for r in ranks.values())
        saved = max(r[name]["saved_mb"] for r in ranks.values())
        err = (ranks[0][name]["out"] - ref["out"]).abs().max().item()
        base = base or (seconds, peak, heap, tensors, saved)
        rows.append([f"{name}, P = {args.world}", err, seconds, mean, heap, peak, tensors, saved, seconds / base[0],
                     mean / base_mean, heap / base[2], peak / base[1], tensors / base[3],
                     saved / base[4] if base[4] else 0.0])
    ref_mean = statistics.mean(ref["steps"])
    rows.insert(0, ["one process", 0.0, ref["seconds"], ref_mean, ref["heap_mb"], ref["peak_mb"], ref["tensor_mb"],
                    ref["saved_mb"], ref["seconds"] / base[0], ref_mean / base_mean, ref["heap_mb"] / base[2],
                    ref["peak_mb"] / base[1], ref["tensor_mb"] / base[3], ref["saved_mb"] / base[4] if base[4] else 0.0])
    tokens = args.frames * args.size ** 2 // 4
    name = "LTX-Video" if args.model == "ltx" else "Wan"
    step = "forward (no_grad)" if args.forward else "forward+backward"
    print_table(f"{name} transformer {step}, {tokens} video tokens, float32, 1 thread per process",
                ["run", "max abs err", "step (s)", "mean step (s)", "heap peak MiB per rank", "allocator peak MiB",
                 "tensor peak MiB", "saved for backward MiB", "time x Ulysses", "mean time x Ulysses",
                 "heap x Ulysses", "allocator x Ulysses", "tensor peak x Ulysses", "saved x Ulysses"], rows)


if __name__ == "__main__":
    main()
