"""Float64 oracles written independently of the library: explicit formulas, permute/reshape, max_pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_nonlocal(theta, phi, g, mode, scale=1.0, concat_weight=None):
    """y_i = 1/C Σ_j f(theta_i, phi_j) g_j with the affinity written out; (B, [H,] N, d) inputs."""
    squeeze = theta.dim() == 3
    if squeeze:
        theta, phi, g = theta[:, None], phi[:, None], g[:, None]
    y = torch.einsum("bhnm,bhme->bhne", naive_affinity(theta, phi, mode, scale, concat_weight), g)
    return y[:, 0] if squeeze else y


def naive_affinity(theta, phi, mode, scale=1.0, concat_weight=None):
    """The whole matrix f(theta_i, phi_j)/C(x) (B, H, N, M) for (B, H, N, d) inputs, written out."""
    m = phi.shape[2]
    if mode in ("gaussian", "embedded_gaussian"):
        s = scale * torch.einsum("bhnd,bhmd->bhnm", theta, phi)
        e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)
    if mode == "dot_product":
        return torch.einsum("bhnd,bhmd->bhnm", theta, phi) / m
    d = theta.shape[-1]
    w = concat_weight.reshape(-1, 2 * d)
    a = (theta * w[None, :, None, :d]).sum(-1)
    b = (phi * w[None, :, None, d:]).sum(-1)
    s = a[..., :, None] + b[..., None, :]
    # ReLU as torch's: ReLU'(0) = 0, and NaN stays NaN (mmcv's concat_project applies nn.ReLU).
    return torch.where((s > 0) | s.isnan(), s, torch.zeros_like(s)) / m


def _linear(layer, t):
    out = t @ layer.weight.t()
    return out if layer.bias is None else out + layer.bias


def _positions(block, x):
    """x permuted to (B', *axes sizes, C) with plain torch ops, and what undoes it."""
    names = block.layout.names
    axes = block.layout.axes
    folded = [n for n in names if n not in ("b", "c") and n not in axes]
    order = [names.index("b")] + [names.index(n) for n in folded] + [names.index(a) for a in axes] + [names.index("c")]
    xp = x.permute(*order)
    lead = xp.shape[: 1 + len(folded)]
    sizes = xp.shape[1 + len(folded) : -1]
    c = x.shape[names.index("c")]
    return xp.reshape(-1, *sizes, c), order, lead, sizes


def oracle_embed(block, x):
    """theta (B', H, N, d), phi and g (B', H, M, d) of the block on x, and the pooled key grid sizes."""
    xp, _, _, _ = _positions(block, x)
    axes = block.layout.axes

    def pool(t):
        if not block.sub_sample:
            return t
        kernel = tuple(block.sub_sample.get(a, 1) for a in axes)
        chan_first = t.movedim(-1, 1)
        pooled = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(axes)](chan_first, kernel)
        return pooled.movedim(1, -1)

    theta = xp if block.theta is None else _linear(block.theta, xp)
    phi = pool(xp if block.phi is None else _linear(block.phi, xp))
    g = pool(_linear(block.g, xp))
    heads = block.heads

    def split(t):
        t = t.reshape(t.shape[0], -1, t.shape[-1])
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    return split(theta), split(phi), split(g), tuple(phi.shape[1:-1])


def oracle_block(block, x):
    """The block's forward recomputed from its parameters with plain torch ops (no einops)."""
    xp, order, lead, sizes = _positions(block, x)
    c = xp.shape[-1]
    theta, phi, g, _ = oracle_embed(block, x)
    y = naive_nonlocal(theta, phi, g, block.mode, block.scale, block.concat_weight)
    y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    z = _linear(block.W_z, y).reshape(-1, c)
    if block.norm is not None:
        bn = block.norm
        if bn.training:
            mean, var = z.mean(0), z.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        z = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    z = z.reshape(*lead, *sizes, c)
    inverse = [order.index(i) for i in range(len(order))]
    return x + z.permute(*inverse)
