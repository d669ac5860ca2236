"""Validate locally, exchange metadata, raise on every rank (distributed/checks.py), on real gloo ranks.

A bad input on one rank raises there with its own error and on every other rank with an error naming
it (never a hang); ranks that disagree raise on every rank with the values in the user's terms
(mode and strategy names, dtypes, queries, a replicated parameter) and how to fix them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nonlocal_dist import NonLocalBlock, nonlocal_op
from nonlocal_dist.attention_maps import affinity_rows
from nonlocal_dist.sequence import shard_tensor
from nonlocal_dist.testing import run_ranks


def _outcome(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _bad_input_on_last_rank(rank, world):
    group = dist.group.WORLD
    torch.manual_seed(0)
    block = NonLocalBlock(4, mode="concatenation", sp_group=group, shard_axis="t")
    x = shard_tensor(torch.randn(1, 4, 6, 3, 3), "b c t h w", "t", group)
    bad = rank == world - 1
    wrong_channels = torch.randn(1, 5, 2, 3, 3) if bad else x
    queries = [(0, 0)] if bad else [(0, 0, 0)]
    theta = torch.randn(1, 2, 3, 4)
    outcomes = {
        "forward, wrong channels": _outcome(lambda: block(wrong_channels)),
        "forward, not a tensor": _outcome(lambda: block(x.tolist() if bad else x)),
        "affinity_rows, wrong channels": _outcome(lambda: affinity_rows(block, wrong_channels, [(0, 0, 0)])),
        "affinity_rows, malformed queries": _outcome(lambda: affinity_rows(block, x, queries)),
        "nonlocal_op, integer g": _outcome(lambda: nonlocal_op(theta, theta, theta.long() if bad else theta, group=group)),
    }
    # The group is still in step after every failure: one more collective completes on every rank.
    check = torch.ones(1)
    dist.all_reduce(check, group=group)
    return outcomes, check.item()


def test_bad_input_on_one_rank_raises_on_every_rank_naming_it():
    world = 3
    results = run_ranks(_bad_input_on_last_rank, world, timeout=90)
    own = {
        "forward, wrong channels": "ValueError: expected 4 channels",
        "forward, not a tensor": "TypeError: the input must be a torch.Tensor",
        "affinity_rows, wrong channels": "ValueError: expected 4 channels",
        "affinity_rows, malformed queries": "ValueError: queries[0] = (0, 0): expected 3 indices",
        "nonlocal_op, integer g": "TypeError: g must be a floating-point tensor",
    }
    for rank, (outcomes, total) in enumerate(results):
        assert total == world
        for case, message in outcomes.items():
            if rank == world - 1:
                assert message.startswith(own[case]), (rank, case, message)
            else:  # the others name the failing rank and its reason
                assert message.startswith("ValueError: rank(s) [2] of the sequence-parallel group rejected"), (rank, case, message)
                assert f"rank 2: {own[case]}" in message, (rank, case, message)


def _disagreements(rank, world):
    group = dist.group.WORLD
    theta = torch.randn(1, 2, 3, 4)
    other = rank % 2 == 1
    block = NonLocalBlock(4, sp_group=group, shard_axis="t")
    x = torch.randn(1, 4, 2, 3, 3)
    return {
        "block dtype": _outcome(lambda: block.to(torch.float64 if other else torch.float32)(x.to(block.g.weight.dtype))),
        "mode": _outcome(lambda: nonlocal_op(theta, theta, theta, "dot_product" if other else "embedded_gaussian", group=group)),
        "strategy": _outcome(lambda: nonlocal_op(theta, theta, theta, group=group, strategy="allgather" if other else "ring")),
        "dtype": _outcome(lambda: nonlocal_op(*[theta.double() if other else theta] * 3, group=group)),
        "scale": _outcome(lambda: nonlocal_op(theta, theta, theta, scale=0.5 if other else 0.25, group=group)),
    }


def test_disagreements_name_every_rank_value_in_the_users_terms():
    for outcomes in run_ranks(_disagreements, 2, timeout=90):
        assert "mode per rank = ['embedded_gaussian', 'dot_product']" in outcomes["mode"], outcomes["mode"]
        assert "strategy per rank = ['ring', 'allgather']" in outcomes["strategy"], outcomes["strategy"]
        assert "dtype per rank = [torch.float32, torch.float64]" in outcomes["dtype"], outcomes["dtype"]
        assert "scale per rank = [0.25, 0.5]" in outcomes["scale"], outcomes["scale"]
        assert "dtype per rank = [torch.float32, torch.float64]" in outcomes["block dtype"], outcomes["block dtype"]


def _replicated_weights(rank, world):
    group = dist.group.WORLD
    theta = torch.randn(1, 2, 3, 4)
    w = torch.full((8,), 0.1 + 0.1 * rank)
    outcomes = {"nonlocal_op": _outcome(lambda: nonlocal_op(theta, theta, theta, "concatenation", concat_weight=w, group=group))}
    torch.manual_seed(rank)  # each rank its own initial weights: what a missing broadcast gives
    block = NonLocalBlock(4, mode="concatenation", sp_group=group, shard_axis="t")
    x = shard_tensor(torch.randn(1, 4, 6, 3, 3), "b c t h w", "t", group)
    outcomes["block"] = _outcome(lambda: block(x))
    outcomes["affinity_rows"] = _outcome(lambda: affinity_rows(block, x, [(0, 0, 0)]))
    torch.manual_seed(0)
    with torch.no_grad():
        block.concat_weight.copy_(torch.randn_like(block.concat_weight))  # the fix: equal on every rank
    outcomes["equal weights"] = _outcome(lambda: (block(x), affinity_rows(block, x, [(0, 0, 0)])))
    return outcomes


def test_different_concat_weights_raise_on_every_rank_with_the_fix():
    for rank, outcomes in enumerate(run_ranks(_replicated_weights, 2, timeout=90)):
        for case in ("nonlocal_op", "block", "affinity_rows"):
            message = outcomes[case]
            assert message.startswith("ValueError: sequence-parallel ranks disagree"), (rank, case, message)
            assert "concat_weight per rank = [tensor(" in message and "broadcast it from rank 0" in message, message
        assert "sum 0.8" in outcomes["nonlocal_op"] and "sum 1.6" in outcomes["nonlocal_op"], outcomes["nonlocal_op"]
        assert outcomes["equal weights"] == "no error", outcomes["equal weights"]
