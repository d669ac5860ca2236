"""Load mmcv / mmaction2 ``NonLocal1d/2d/3d`` weights into a ``NonLocalBlock``: ``block_from_mmcv``.

mmcv keeps 1×1 convolutions (``g.conv``, ``theta.conv``, ``phi.conv``, ``conv_out.conv``; a
``Sequential(conv, MaxPool)`` under ``sub_sample``), an optional ``conv_out.bn`` and, for
concatenation, ``concat_project.conv`` of shape (1, 2·inter, 1, 1). Its ``use_scale`` divides by
sqrt(inter_channels) in ``embedded_gaussian`` only; ``gaussian`` ignores it.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from nonlocal_dist.block import NonLocalBlock

_LAYOUTS = {1: "b c n", 2: "b c h w", 3: "b c t h w"}


def _conv_key(state: Mapping[str, Tensor], name: str) -> str | None:
    for key in (f"{name}.conv.weight", f"{name}.0.conv.weight"):
        if key in state:
            return key[: -len(".weight")]
    return None


def _describe(source: nn.Module | Mapping[str, Tensor]) -> tuple[Mapping[str, Tensor], dict]:
    """The state dict and whatever settings the source itself tells (mode, use_scale, norm, train/eval)."""
    if isinstance(source, nn.Module):
        missing = [name for name in ("mode", "use_scale", "sub_sample", "g", "conv_out") if not hasattr(source, name)]
        if missing:
            raise TypeError(
                f"block_from_mmcv expects an mmcv NonLocal1d/2d/3d module (mmcv.cnn.NonLocal3d, as in mmaction2) "
                f"or its state dict; got a {type(source).__name__}, which has no {', '.join(missing)}"
            )
        settings = {"mode": source.mode, "use_scale": source.use_scale, "sub_sample": bool(source.sub_sample),
                    "training": source.training}
        norm = getattr(source.conv_out, "norm", None)
        if norm is not None and not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"the mmcv block normalises conv_out with {type(norm).__name__}; only BatchNorm (norm_cfg "
                "dict(type='BN3d') and the like) or no norm is supported: NonLocalBlock(norm='batch' or None)"
            )
        if norm is not None:
            settings.update(eps=norm.eps, momentum=norm.momentum)
        return source.state_dict(), settings
    if isinstance(source, Mapping):
        return source, {}
    raise TypeError(f"block_from_mmcv expects an mmcv NonLocal1d/2d/3d module or its state dict, got {type(source).__name__}")


def _no_override(settings: dict, name: str, given: object) -> None:
    """A module tells its own settings; a different one would not reproduce its output."""
    if given is not None and name in settings and given != settings[name]:
        raise ValueError(
            f"{name}={given!r} differs from the mmcv module's own {name}={settings[name]!r}: the block would not "
            f"give the module's output. Leave {name}= out (it is read from the module), or pass the module's "
            f"state dict with {name}= to build a different block from its weights"
        )


def block_from_mmcv(
    source: nn.Module | Mapping[str, Tensor],
    *,
    mode: str | None = None,
    use_scale: bool | None = None,
    backend: str = "auto",
) -> NonLocalBlock:
    """A ``NonLocalBlock`` giving the same output as the mmcv block ``source`` (module or state dict).

    Layout follows the mmcv class: ``"b c n"`` (1d), ``"b c h w"`` (2d), ``"b c t h w"`` (3d). From a
    bare state dict, ``mode`` is needed to tell ``embedded_gaussian`` from ``dot_product`` and
    ``use_scale`` defaults to mmcv's ``True``. From a module, mode and use_scale are the module's own
    (a different value raises: it would not reproduce the module) and the block takes its train/eval
    mode. Raises ``TypeError`` for anything but an mmcv non-local module or state dict, ``ValueError``
    for a norm other than BatchNorm after ``conv_out``.
    """
    state, settings = _describe(source)
    _no_override(settings, "mode", mode)
    _no_override(settings, "use_scale", use_scale)
    g_key = _conv_key(state, "g")
    if g_key is None:
        raise ValueError("not an mmcv non-local state dict: no 'g.conv.weight' or 'g.0.conv.weight' key")
    inferred = "concatenation" if "concat_project.conv.weight" in state else None
    if _conv_key(state, "theta") is None:
        inferred = "gaussian"
    mode = mode or settings.get("mode") or inferred
    if mode is None:
        raise ValueError(
            "the state dict has theta/phi weights but no concat_project: pass mode='embedded_gaussian' or "
            "mode='dot_product' (the weights are the same shape for both)"
        )
    if inferred is not None and mode != inferred:
        raise ValueError(f"the state dict holds a {inferred!r} block, but mode={mode!r} was given")
    use_scale = settings.get("use_scale", True) if use_scale is None else use_scale
    g_weight = state[f"{g_key}.weight"]
    dims = g_weight.dim() - 2
    if dims not in _LAYOUTS:
        raise ValueError(f"g weight of shape {tuple(g_weight.shape)} is not a 1d/2d/3d 1x1 convolution")
    unsupported = sorted(k for k in state if k.startswith("conv_out.") and not k.startswith(("conv_out.conv", "conv_out.bn")))
    if unsupported:
        raise ValueError(f"only BatchNorm (or no norm) after conv_out is supported; found {unsupported}")
    norm = "batch" if "conv_out.bn.weight" in state else None
    block = NonLocalBlock(
        g_weight.shape[1],
        layout=_LAYOUTS[dims],
        mode=mode,
        inter_channels=g_weight.shape[0],
        sub_sample=settings.get("sub_sample", g_key.startswith("g.0")),
        use_scale=use_scale and mode == "embedded_gaussian",
        norm=norm,
        backend=backend,
    ).to(g_weight.dtype)
    if norm is not None and "eps" in settings:
        block.norm.eps, block.norm.momentum = settings["eps"], settings["momentum"]
    block.load_state_dict(_convert_state(state, mode, norm), strict=True)
    return block.train(settings.get("training", True))


def _convert_state(state: Mapping[str, Tensor], mode: str, norm: str | None) -> dict[str, Tensor]:
    def linear(name: str, target: str) -> dict[str, Tensor]:
        key = _conv_key(state, name)
        weight = state[f"{key}.weight"]
        out = {f"{target}.weight": weight.reshape(weight.shape[0], weight.shape[1])}
        if f"{key}.bias" in state:
            out[f"{target}.bias"] = state[f"{key}.bias"]
        return out

    converted: dict[str, Tensor] = {}
    for name in ["g"] + ([] if mode == "gaussian" else ["theta", "phi"]):
        converted.update(linear(name, name))
    converted.update(linear("conv_out", "W_z"))
    if norm is not None:
        for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            converted[f"norm.{field}"] = state[f"conv_out.bn.{field}"]
    if mode == "concatenation":
        converted["concat_weight"] = state["concat_project.conv.weight"].reshape(-1)
    return {k: v.detach().clone() for k, v in converted.items()}


__all__ = ["block_from_mmcv"]
