"""The Gaussian filter ``G`` of :mod:`kdctl.distill.ssim` and its adjoint ``G^T``.

``G`` filters every plane with the normalised Gaussian window along both axes, extending the
map mirror-wise at the border (``reflect``, continued for maps smaller than the window). Two
implementations of the same linear map: reflect-pad + a separable depthwise convolution
(:func:`_blur_padded`, adjoint :func:`_blur_padded_adjoint`: transposed convolutions, then the
padding folded back), and per-axis dense matrices for small maps (:func:`_blur_matrix`). Which
one a map takes is :func:`kdctl.distill.ssim._use_conv`'s choice.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------- the window
def gaussian_window(window_size: int = 11, sigma: float = 1.5, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The 1-D normalised Gaussian ``exp(-t^2 / (2 sigma^2))``, ``t = -(w // 2) .. w // 2``."""
    half = window_size // 2
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def _mirror(i: int, n: int) -> int:
    """Index ``i`` of the mirror extension of ``0 .. n-1`` (reflect about the edge pixels, repeated)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return i if i < n else period - i


@lru_cache(maxsize=256)
def _filter_matrix(n: int, window_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[n, n]`` matrix of the Gaussian filter along one axis of length ``n`` with the mirror
    extension: ``(M @ v)[i] = sum_t g[t] v[mirror(i + t - w // 2)]``."""
    g = gaussian_window(window_size, sigma, dtype=torch.float64).tolist()
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for t, gt in enumerate(g):
            m[i, _mirror(i + t - window_size // 2, n)] += gt
    return m.to(device=device, dtype=dtype)


@lru_cache(maxsize=256)
def _conv_weights(n: int, window_size: int, sigma: float, device: torch.device,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Depthwise weights for ``n`` channels: along W ``[n, 1, 1, w]`` and along H ``[n, 1, w, 1]``."""
    g = gaussian_window(window_size, sigma, device=device, dtype=dtype)
    return (g.view(1, 1, 1, -1).expand(n, 1, 1, window_size).contiguous(),
            g.view(1, 1, -1, 1).expand(n, 1, window_size, 1).contiguous())


# ---------------------------------------------------------------------------- filtering G and G^T
def _fill_reflect(t: Tensor, half: int) -> None:
    """In place: the ``half``-wide border of ``t [..., H + 2h, W + 2h]`` from its interior, as
    ``F.pad(interior, (h, h, h, h), mode='reflect')``."""
    hh, ww = t.shape[-2] - 2 * half, t.shape[-1] - 2 * half
    rows = t[..., half:half + hh, :]
    rows[..., :half].copy_(rows[..., half + 1:2 * half + 1].flip(-1))
    rows[..., ww + half:].copy_(rows[..., ww - 1:ww + half - 1].flip(-1))
    t[..., :half, :].copy_(t[..., half + 1:2 * half + 1, :].flip(-2))
    t[..., hh + half:, :].copy_(t[..., hh - 1:hh + half - 1, :].flip(-2))


def _fold_reflect(z: Tensor, dim: int, half: int) -> Tensor:
    """Adjoint of reflect padding along ``dim``: ``z`` has ``n + 2 half`` entries there; the
    padded entries are added back onto the ones they mirror. Returns a view of ``z``."""
    n = z.size(dim) - 2 * half
    core = z.narrow(dim, half, n)
    core.narrow(dim, 1, half).add_(z.narrow(dim, 0, half).flip(dim))
    core.narrow(dim, n - 1 - half, half).add_(z.narrow(dim, n + half, half).flip(dim))
    return core


def _blur_padded(s: Tensor, window_size: int, sigma: float) -> Tensor:
    """``G``: ``s [k, n, H + 2h, W + 2h]`` already reflect-padded -> ``[k, n, H, W]``."""
    n = s.shape[1]
    wx, wy = _conv_weights(n, window_size, sigma, s.device, s.dtype)
    return F.conv2d(F.conv2d(s, wx, groups=n), wy, groups=n)


def _blur_padded_adjoint(a: Tensor, window_size: int, sigma: float) -> Tensor:
    """``G^T`` of :func:`_blur_padded` followed by the fold of the reflect padding:
    ``a [k, n, H, W]`` -> ``[k, n, H, W]`` (a strided view)."""
    n, half = a.shape[1], window_size // 2
    wx, wy = _conv_weights(n, window_size, sigma, a.device, a.dtype)
    z = _fold_reflect(F.conv2d(a, wy, padding=(2 * half, 0), groups=n), -2, half)
    return _fold_reflect(F.conv2d(z, wx, padding=(0, 2 * half), groups=n), -1, half)


def _blur_matrix(s: Tensor, window_size: int, sigma: float, adjoint: bool = False) -> Tensor:
    """``G`` (or ``G^T``) with the per-axis mirror-extension matrices: ``[..., H, W]``."""
    mh = _filter_matrix(s.shape[-2], window_size, sigma, s.device, s.dtype)
    mw = _filter_matrix(s.shape[-1], window_size, sigma, s.device, s.dtype)
    if adjoint:
        return torch.matmul(mh.mT, torch.matmul(s, mw))
    return torch.matmul(mh, torch.matmul(s, mw.mT))
