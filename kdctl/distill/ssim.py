"""SSIM structural feature distillation.

de Rijk, Schneider, Burghouts and Dijkman, "Structural Knowledge Distillation for Object
Detection", NeurIPS 2022: the student's FPN feature maps imitate the teacher's through the
structural similarity index (SSIM; Wang, Bovik, Sheikh and Simoncelli, "Image Quality
Assessment: From Error Visibility to Structural Similarity", IEEE TIP 13(4), 2004) instead of a
pixel-wise L2. Per FPN level, both maps are min-max normalised to [0, 1] per sample and channel
and the loss is ``mean((1 - SSIM) / 2)`` over the SSIM map; the caller sums the levels and
multiplies by the method's weight (:mod:`kdctl.distill.feature`).

SSIM (Wang et al. 2004, eqs. 6-12) with dynamic range ``L = 1``, ``K1 = 0.01``, ``K2 = 0.03``,
``C1 = (K1 L)^2``, ``C2 = (K2 L)^2``, ``C3 = C2 / 2`` and local statistics weighted by a
normalised Gaussian window (11 taps, sigma 1.5; :func:`gaussian_window`)::

    l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)                 luminance
    c = (2 sigma_x sigma_y + C2) / (sigma_x^2 + sigma_y^2 + C2)     contrast
    s = (sigma_xy + C3) / (sigma_x sigma_y + C3)                     structure
    SSIM = l^alpha * c^beta * s^gamma

With ``alpha = beta = gamma = 1`` this is the usual ``(2 mu_x mu_y + C1)(2 sigma_xy + C2) /
((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``; the exponents are the paper's knobs to
weight the three terms. Conventions:

- **Border**: ``reflect`` padding (mirror about the edge pixel, as ``torch.nn.functional.pad``
  and kornia's ``ssim(..., padding='same')``), so the map keeps the input's size.
- **Small maps** (a side ``<= window_size // 2``, e.g. P7 of a small image at 1x1 or 2x2, where
  ``reflect`` cannot pad): the same mirror extension is continued, reflecting again at every
  edge (the input tiled mirror-wise over the plane; scipy.ndimage's ``mirror`` mode). This is
  exactly ``reflect`` whenever ``reflect`` is possible, so the Gaussian (and sigma) never
  change with the map size; a 1-pixel side is constant along that axis, so a 1x1 map has
  ``sigma_x = sigma_y = sigma_xy = 0`` and SSIM reduces to the luminance term ``l^alpha``.
- **sigma_x sigma_y**: ``sqrt((max(var_x, 0) + e) (max(var_y, 0) + e)) - e``, ``e = 1e-8``
  (``_VAR_EPS``): exactly 0 on two flat patches and exactly ``var`` on identical patches (so
  identical maps score 1 for any exponents), with a finite gradient everywhere (at most about
  ``1 / (2 sqrt(e))`` instead of the infinite slope of ``sqrt`` at 0). It only enters when
  ``beta != gamma``: for ``beta == gamma``, ``c^beta s^beta = ((2 sigma_xy + C2) / (sigma_x^2 +
  sigma_y^2 + C2))^beta`` needs no square root (``C3 = C2 / 2`` makes ``sigma_x sigma_y``
  cancel), which is how it is computed.
- **Negative bases**: ``s`` (and ``l`` for inputs outside [0, 1]) can be negative. Powers are
  odd-symmetric, ``t^e := t * max(|t|, 1e-6)^(e - 1)``: ``sign(t) |t|^e`` for ``|t| >= 1e-6``,
  linear below (finite gradient at 0), so SSIM stays monotone in every term and anti-correlated
  structure scores below uncorrelated structure. An exponent of 1 is never raised to a power
  (``alpha = beta = gamma = 1`` is exact) and an exponent of 0 drops its term.

Implementation (the fast path behind :func:`ssim` and :func:`ssim_feature_loss`): a custom
autograd function computes the value *and* the input gradient in one pass over chunks of planes
(the ``B * C`` planes; on the CPU about 0.5 MiB per map and at least 16 planes, all planes at
once on a GPU), so every intermediate stays in cache and nothing of the level's size is
allocated but the gradient (on the CPU, fresh allocations of tens of MiB cost more in page
faults than the arithmetic on them). Per chunk: the min-max normalisation (its gradient goes to
each plane's arg-min and arg-max, as ``torch.min(dim)``'s), the five filtered statistics
``G[x, y, x^2, y^2, xy]``, the SSIM map, and the gradient of ``mean f(mu_x, mu_y, E[x^2], E[y^2],
E[xy])``, which is a filtering of per-pixel coefficient maps by the adjoint ``G^T``:
``dL/dx = G^T a + 2 x G^T b + y G^T c`` (likewise ``y``; ``G`` and ``G^T`` are
:mod:`kdctl.distill.ssim_filters`). ``G`` = reflect-pad, then a separable
depthwise convolution in channels-last layout (oneDNN's fast depthwise layout on the CPU; the
planes are the channels); ``G^T`` = the transposed convolutions (zero padding ``window_size - 1``),
each followed by folding the reflected border back onto the map. Maps with a side ``<=
window_size // 2``, and tiny maps, use the per-axis matrices of the mirror extension instead
(``G = M_H X M_W^T``, ``G^T = M_H^T X M_W``). With ``N > 1`` torch threads on the CPU the chunks
are spread over ``N`` worker threads that run their ops single-threaded
(``torch.set_num_threads(1)`` during the pass, restored after): no OpenMP barrier per small op,
and each core keeps its chunk in its own cache. The gradient is computed eagerly (one tensor of
the input's size, only for inputs that require grad under grad mode) and scaled by the incoming
gradient in backward (a second backward with ``retain_graph`` recomputes it). All arithmetic is
float32 (float64 for float64 inputs) with autocast disabled, so it runs under bf16 autocast on
any device. :func:`_ssim_map_reference` and :func:`_ssim_feature_loss_reference` are the same
maths in plain differentiable ops, the reference for the tests.

Speed (``benchmarks/bench_ssim.py``): forward + backward of the loss summed over five FPN
levels (B=2, C=256, 100x152 ... 7x10) took 152-164 ms against 412-449 ms for
``kornia.losses.ssim_loss`` on the same normalised maps (2.7x; 2-core AMD EPYC, 2 threads, quiet
machine), and about 2.3-2.9x with 1 thread. Processing the whole level at once with the same
code is about 4x slower than the chunked pass (allocation page faults and cache misses).
On glibc, the chunk temporaries (about 20 MiB per chunk) come from the heap once malloc's
dynamic mmap threshold has grown (after the first free of a tensor of a few tens of MiB, e.g.
this loss's own level-0 gradient); before that, in a fresh process, they are fresh mmaps and a
call can be up to 3x slower.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# the filter G and G^T; gaussian_window is public here, the tests check the others through this module
from kdctl.distill.ssim_filters import (  # noqa: F401 (re-exported)
    _blur_matrix, _blur_padded, _blur_padded_adjoint, _fill_reflect, _filter_matrix, gaussian_window,
)

K1, K2 = 0.01, 0.03
C1, C2 = K1 ** 2, K2 ** 2  # dynamic range L = 1
C3 = C2 / 2
_VAR_EPS = 1e-8  # sigma_x sigma_y = sqrt((max(var_x, 0) + e)(max(var_y, 0) + e)) - e, only when beta != gamma
_POW_EPS = 1e-6  # t^e = t * max(|t|, _POW_EPS)^(e - 1)
_CHUNK_BYTES = 1 << 19  # CPU: target bytes of one map of a chunk of planes
_CHUNK_ALIGN = 16  # conv path: planes per chunk a multiple of this (16 float32 = one 512-bit vector)
_CHUNK_THREADS = True  # CPU: spread the chunks over torch.get_num_threads() worker threads
_MATRIX_MAX_PIXELS = 256  # maps up to this size use the dense filter matrices


# ---------------------------------------------------------------------------- the filter path
# which G a map takes is decided here, not in ssim_filters: _use_conv reads _MATRIX_MAX_PIXELS,
# which the tests set on this module to force the convolution path
def _use_conv(h: int, w: int, window_size: int) -> bool:
    """Convolution path (reflect padding possible and the map not tiny) or the filter matrices."""
    return min(h, w) > window_size // 2 and h * w > _MATRIX_MAX_PIXELS


def _blur_reference(t: Tensor, window_size: int, sigma: float) -> Tensor:
    """``G`` on ``[B, C, H, W]`` with plain differentiable ops (reflect pad + depthwise conv)."""
    if not _use_conv(t.shape[-2], t.shape[-1], window_size):
        return _blur_matrix(t, window_size, sigma)
    half, c = window_size // 2, t.shape[1]
    g = gaussian_window(window_size, sigma, device=t.device, dtype=t.dtype)
    weight = (g[:, None] * g[None, :]).expand(c, 1, window_size, window_size)
    return F.conv2d(F.pad(t, (half, half, half, half), mode="reflect"), weight, groups=c)


# ---------------------------------------------------------------------------- pointwise terms
def _pow(t: Tensor, e: float) -> Tensor:
    """Odd-symmetric power ``t * max(|t|, eps)^(e - 1)`` (``t`` itself for ``e == 1``)."""
    return t if e == 1 else t * t.abs().clamp_min(_POW_EPS).pow(e - 1)


def _dpow(t: Tensor, e: float) -> Tensor | float:
    """Derivative of :func:`_pow`."""
    if e == 1:
        return 1.0
    a = t.abs()
    return torch.where(a >= _POW_EPS, e, 1.0) * a.clamp_min(_POW_EPS).pow(e - 1)


@dataclass(frozen=True)
class _Spec:
    window_size: int
    sigma: float
    alpha: float
    beta: float
    gamma: float
    normalize: bool  # min-max normalise each plane first (ssim_feature_loss)
    eps: float  # of the normalisation
    loss: bool  # mean((1 - SSIM) / 2) instead of mean(SSIM)

    @property
    def standard(self) -> bool:
        return self.alpha == self.beta == self.gamma == 1


def _terms_standard(f: Tensor, co: Tensor | None, need_y: bool) -> Tensor:
    """Sum (float64) of the SSIM map for ``alpha = beta = gamma = 1`` from the filtered
    statistics ``f = G[x, y, x^2, y^2, xy]`` (consumed in place). With ``co``, also writes the
    gradient coefficient maps (see :func:`_terms_general`):
    ``co[0] = dS/dmu_x / 2``, ``co[1] = -dS/dE[x^2] (= -dS/dE[y^2])``, ``co[2] = dS/dE[xy] / 2``
    and, with ``need_y``, ``co[3] = dS/dmu_y / 2``."""
    mx, my, exx, eyy, exy = f.unbind(0)
    mxy, mx2, my2 = mx * my, mx * mx, my * my
    b2 = exx.sub_(mx2).add_(eyy.sub_(my2)).add_(C2)  # var_x + var_y + C2 (each var exact 0 on flat data)
    b1 = mx2.add_(my2).add_(C1)  # mu_x^2 + mu_y^2 + C1
    a2 = exy.sub_(mxy).mul_(2).add_(C2)  # 2 cov_xy + C2
    a1 = mxy.mul_(2).add_(C1)  # 2 mu_x mu_y + C1
    den = b1 * b2
    s = a1 * a2
    s.div_(den)
    total = s.sum(dtype=torch.float64)
    if co is None:
        return total
    w1 = torch.div(s, b2, out=co[1])  # S / b2
    u = torch.div(a1, den, out=co[2])  # a1 / den
    t = a2.div_(den).sub_(u)  # (a2 - a1) / den
    v = s.div_(b1).neg_().add_(w1)  # S / b2 - S / b1
    torch.mul(my, t, out=co[0]).addcmul_(mx, v)
    if need_y:
        torch.mul(mx, t, out=co[3]).addcmul_(my, v)
    return total


def _terms_general(f: Tensor, spec: _Spec, co: Tensor | None, need_y: bool) -> Tensor:
    """Sum (float64) of the SSIM map ``l^alpha c^beta s^gamma`` and, with ``co``, the coefficient
    maps, scaled as in :func:`_terms_standard`: ``co[0] = dS/dmu_x / 2``, ``co[1] = -dS/dE[x^2]``,
    ``co[2] = dS/dE[xy] / 2``, ``co[3] = dS/dmu_y / 2``, ``co[4] = -dS/dE[y^2]`` (when
    ``beta != gamma``; else ``co[1]`` serves both). Here ``dS/dmu`` is the total derivative
    through ``var = E[x^2] - mu_x^2`` and ``cov = E[xy] - mu_x mu_y``."""
    al, be, ga = spec.alpha, spec.beta, spec.gamma
    mx, my, exx, eyy, exy = f.unbind(0)
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    b1 = mx * mx + my * my + C1
    b2 = vx + vy + C2
    lum = (2 * mx * my + C1) / b1
    lp = _pow(lum, al) if al else torch.ones_like(lum)
    if be == ga:
        q = (2 * cxy + C2) / b2  # c * s
        qp = _pow(q, be) if be else torch.ones_like(q)
        total = (lp * qp).sum(dtype=torch.float64)
        if co is None:
            return total
        ds_dq = lp * _dpow(q, be) if be else torch.zeros_like(q)
        ds_dl = _dpow(lum, al) * qp if al else torch.zeros_like(lum)
        gvx = gvy = -ds_dq * q / b2
        gc = 2 * ds_dq / b2
    else:
        rx, ry = vx.clamp_min(0) + _VAR_EPS, vy.clamp_min(0) + _VAR_EPS
        root = (rx * ry).sqrt()
        p = root - _VAR_EPS  # sigma_x sigma_y
        con = (2 * p + C2) / b2
        st = (cxy + C3) / (p + C3)
        cp = _pow(con, be) if be else torch.ones_like(con)
        sp = _pow(st, ga) if ga else torch.ones_like(st)
        total = (lp * cp * sp).sum(dtype=torch.float64)
        if co is None:
            return total
        ds_dl = _dpow(lum, al) * cp * sp if al else torch.zeros_like(lum)
        ds_dc = lp * _dpow(con, be) * sp if be else torch.zeros_like(con)
        ds_ds = lp * cp * _dpow(st, ga) if ga else torch.zeros_like(st)
        ds_dp = ds_dc * 2 / b2 - ds_ds * st / (p + C3)
        gc = ds_ds / (p + C3)
        gvx = -ds_dc * con / b2 + ds_dp * ry / (2 * root) * (vx >= 0)
        gvy = -ds_dc * con / b2 + ds_dp * rx / (2 * root) * (vy >= 0)
    gmx = ds_dl * (2 * my - 2 * mx * lum) / b1 - 2 * mx * gvx - my * gc
    co[0].copy_(gmx / 2)
    co[1].copy_(-gvx)
    co[2].copy_(gc / 2)
    if need_y:
        gmy = ds_dl * (2 * mx - 2 * my * lum) / b1 - 2 * my * gvy - mx * gc
        co[3].copy_(gmy / 2)
        if be != ga:
            co[4].copy_(-gvy)
    return total


# ---------------------------------------------------------------------------- the fused pass
def _new_stack(k: int, m: int, h: int, w: int, channels_last: bool, like: Tensor) -> Tensor:
    """Uninitialised ``[k, m, h, w]``, memory ``[k, h, w, m]`` when ``channels_last``."""
    if channels_last:
        return torch.empty(k, h, w, m, device=like.device, dtype=like.dtype).permute(0, 3, 1, 2)
    return torch.empty(k, m, h, w, device=like.device, dtype=like.dtype)


def _normalize_into(out: Tensor, t: Tensor, eps: float, with_index: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``out = (t - min) / (max - min + eps)`` per plane of ``t [m, H, W]`` (computed as
    ``(t - min) * scale``: no cancellation on flat planes, where ``scale ~ 1 / eps``). Returns
    ``scale`` and, ``with_index``, the flat arg-min and arg-max of every plane."""
    flat = t.reshape(t.shape[0], -1)
    if with_index:
        lo, i_lo = flat.min(1)
        hi, i_hi = flat.max(1)
    else:
        lo, hi = flat.amin(1), flat.amax(1)
        i_lo = i_hi = None
    scale = (hi - lo + eps).reciprocal_()
    torch.sub(t, lo[:, None, None], out=out).mul_(scale[:, None, None])
    return scale, i_lo, i_hi


def _chunk_pass(x: Tensor, y: Tensor, spec: _Spec, gx: Tensor | None, gy: Tensor | None, k: float) -> Tensor:
    """One chunk of planes ``x, y [m, H, W]``: returns the float64 sum of the SSIM map and writes
    ``k * d(sum S)/dx`` into ``gx`` (``[m, H, W]``, when given; likewise ``gy``), through the
    min-max normalisation when ``spec.normalize``."""
    m, h, w = x.shape
    ws, sigma = spec.window_size, spec.sigma
    half = ws // 2
    conv = _use_conv(h, w, ws)
    pad = half if conv else 0
    st = _new_stack(5, m, h + 2 * pad, w + 2 * pad, conv, x)  # x, y, x^2, y^2, xy (reflect-padded)
    xv, yv = st[0, :, pad:pad + h, pad:pad + w], st[1, :, pad:pad + h, pad:pad + w]
    if spec.normalize:
        norm = (_normalize_into(xv, x, spec.eps, gx is not None), _normalize_into(yv, y, spec.eps, gy is not None))
    else:
        xv.copy_(x)
        yv.copy_(y)
    if conv:
        _fill_reflect(st[:2], half)
    torch.mul(st[0], st[0], out=st[2])
    torch.mul(st[1], st[1], out=st[3])
    torch.mul(st[0], st[1], out=st[4])
    f = _blur_padded(st, ws, sigma) if conv else _blur_matrix(st, ws, sigma)
    split_var = not spec.standard and spec.beta != spec.gamma
    n_co = (5 if split_var else 4) if gy is not None else 3 if gx is not None else 0
    co = _new_stack(n_co, m, h, w, conv, x) if n_co else None
    total = _terms_standard(f, co, gy is not None) if spec.standard else _terms_general(f, spec, co, gy is not None)
    if co is None:
        return total
    bt = _blur_padded_adjoint(co, ws, sigma) if conv else _blur_matrix(co, ws, sigma, adjoint=True)
    # d(sum S)/dx = 2 [G^T co0 - x G^T co1 + y G^T co2] w.r.t. the normalised x; y alike (co3, co4)
    for g, own, other, i_mu, i_var, side in ((gx, xv, yv, 0, 1, 0), (gy, yv, xv, 3, 4 if split_var else 1, 1)):
        if g is None:
            continue
        hh = bt[i_mu].addcmul_(own, bt[i_var], value=-1).addcmul_(other, bt[2])
        if not spec.normalize:
            torch.mul(hh, 2 * k, out=g)
            continue
        # chain through t_hat = (t - min) * scale: d/dt = scale * g_hat, plus the min and max terms
        scale, i_lo, i_hi = norm[side]
        scale = scale * (2 * k)
        s_g, s_gx = hh.sum((1, 2)), (hh * own).sum((1, 2))
        torch.mul(hh, scale[:, None, None], out=g)
        flat = g.view(m, -1)
        flat.scatter_add_(1, i_lo[:, None], (scale * (s_gx - s_g))[:, None])
        flat.scatter_add_(1, i_hi[:, None], (-scale * s_gx)[:, None])
    return total


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, workers): a forked child makes its own
_POOL_LOCK = threading.Lock()


def _run_chunks(fn, ranges: list[tuple[int, int]], workers: int) -> list[Tensor]:
    """``fn(p0, p1)`` for every range: in order on this thread (``workers == 1``), or spread over
    ``workers`` threads that each run their ops single-threaded (``torch.set_num_threads(1)`` for
    the duration, restored after)."""
    if workers <= 1:
        return [fn(p0, p1) for p0, p1 in ranges]
    key = (os.getpid(), workers)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="kdctl-ssim")

    def job(r: tuple[int, int]) -> Tensor:
        with torch.no_grad():
            return fn(*r)

    with _POOL_LOCK:  # one threaded pass at a time: the thread count is process-wide
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
        except RuntimeError:  # a threading backend that cannot change its size any more
            return [fn(p0, p1) for p0, p1 in ranges]
        try:
            return list(pool.map(job, ranges))
        finally:
            torch.set_num_threads(threads)


def _fused(x: Tensor, y: Tensor, spec: _Spec, need_x: bool, need_y: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mean of the SSIM map (or of ``(1 - SSIM) / 2``) and the gradients of that mean w.r.t.
    ``x`` and ``y`` (``[B, C, H, W]``, compute dtype) where requested."""
    b, c, h, w = x.shape
    planes = b * c
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xf, yf = x.reshape(planes, h, w).to(dtype), y.reshape(planes, h, w).to(dtype)
    gx = torch.empty_like(xf) if need_x else None
    gy = torch.empty_like(yf) if need_y else None
    k = (-0.5 if spec.loss else 1.0) / x.numel()  # d(mean)/dS per pixel
    workers, chunk = 1, planes
    if x.device.type == "cpu":
        workers = torch.get_num_threads() if _CHUNK_THREADS else 1
        chunk = max(1, min(_CHUNK_BYTES // (h * w * xf.element_size()), -(-planes // workers)))  # >= 1 per worker
        if _use_conv(h, w, spec.window_size):
            chunk = -(-chunk // _CHUNK_ALIGN) * _CHUNK_ALIGN  # whole vectors of channels for the depthwise conv
    ranges = [(p0, min(planes, p0 + chunk)) for p0 in range(0, planes, chunk)]

    def run(p0: int, p1: int) -> Tensor:
        return _chunk_pass(xf[p0:p1], yf[p0:p1], spec, None if gx is None else gx[p0:p1],
                           None if gy is None else gy[p0:p1], k)

    total = torch.stack(_run_chunks(run, ranges, min(workers, len(ranges)))).sum()
    mean = total / x.numel()
    value = (0.5 - 0.5 * mean) if spec.loss else mean
    shape = (b, c, h, w)
    return value.to(dtype), None if gx is None else gx.view(shape), None if gy is None else gy.view(shape)


class _FusedSSIM(torch.autograd.Function):
    """Value and eager input gradient in forward; backward scales the stored gradient (in place
    the first time; a second backward, with ``retain_graph``, recomputes it)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, spec: _Spec, need_x: bool, need_y: bool) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            value, gx, gy = _fused(x, y, spec, need_x, need_y)
        ctx.spec, ctx.grads = spec, (gx, gy)
        ctx.dtypes = (x.dtype, y.dtype)
        ctx.save_for_backward(x, y)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        gx, gy = ctx.grads
        if gx is None and gy is None and any(ctx.needs_input_grad[:2]):  # second backward: recompute
            x, y = ctx.saved_tensors
            with torch.autocast(device_type=x.device.type, enabled=False):
                _, gx, gy = _fused(x, y, ctx.spec, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = (None, None)
        out = [None if g is None else g.mul_(grad).to(dt) for g, dt in zip((gx, gy), ctx.dtypes)]
        return out[0], out[1], None, None, None


def _check(x: Tensor, y: Tensor, window_size: int, sigma: float) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"expected two [B, C, H, W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0:
        raise ValueError(f"empty input {tuple(x.shape)}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be odd and positive, got {window_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")


def _apply(x: Tensor, y: Tensor, spec: _Spec) -> Tensor:
    _check(x, y, spec.window_size, spec.sigma)
    grad = torch.is_grad_enabled()
    need_x, need_y = grad and x.requires_grad, grad and y.requires_grad
    return _FusedSSIM.apply(x, y, spec, need_x, need_y)


# ---------------------------------------------------------------------------- public API
def ssim(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, alpha: float = 1.0,
         beta: float = 1.0, gamma: float = 1.0) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of two ``[B, C, H, W]`` maps with values in [0, 1].

    Gaussian window ``window_size`` x ``window_size`` (sigma ``sigma``), reflect border ("same"
    size), ``K1 = 0.01``, ``K2 = 0.03``, ``L = 1``; ``SSIM = l^alpha c^beta s^gamma`` with the
    conventions of the module docstring (small maps, negative bases, ``sigma_x sigma_y``). With the
    defaults it equals ``kornia.metrics.ssim(x, y, 11, padding='same').mean()``. Differentiable
    w.r.t. both inputs (once); computed in float32 (float64 for float64 inputs), returned as a
    0-d tensor of that dtype.
    """
    return _apply(x, y, _Spec(window_size, float(sigma), float(alpha), float(beta), float(gamma), False, 0.0, False))


def ssim_feature_loss(student: Tensor, teacher: Tensor, *, window_size: int = 11, sigma: float = 1.5,
                      alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """SSIM feature distillation loss of one FPN level (de Rijk et al., NeurIPS 2022).

    Both ``[B, C, H, W]`` maps are min-max normalised per sample and channel,
    ``(x - min) / (max - min + eps)``, then the loss is ``mean((1 - SSIM) / 2)`` over the SSIM
    map (:func:`ssim`'s window, border and exponents), a scalar in [0, 1] (0 for identical
    maps). The caller sums the levels, multiplies by the weight and detaches the teacher (it is
    not detached here: a teacher that requires grad gets its gradient too). Any level size works,
    down to 1x1 (see the module docstring); float32 compute, also under autocast.
    """
    spec = _Spec(window_size, float(sigma), float(alpha), float(beta), float(gamma), True, float(eps), True)
    return _apply(student, teacher, spec)


# ---------------------------------------------------------------------------- references (tests)
def _minmax_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``(x - min) / (max - min + eps)`` per sample and channel, plain differentiable ops."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - lo) / (hi - lo + eps)


def _ssim_map_reference(x: Tensor, y: Tensor, *, window_size: int = 11, sigma: float = 1.5, alpha: float = 1.0,
                        beta: float = 1.0, gamma: float = 1.0) -> Tensor:
    """The SSIM map ``[B, C, H, W]`` with plain differentiable ops (autograd): ``l``, ``c`` and
    ``s`` computed separately, the same border, ``sigma_x`` floor and powers as the fast path."""
    blur = lambda t: _blur_reference(t, window_size, sigma)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    sxy = ((vx.clamp_min(0) + _VAR_EPS) * (vy.clamp_min(0) + _VAR_EPS)).sqrt() - _VAR_EPS
    lum = (2 * mx * my + C1) / (mx * mx + my * my + C1)
    con = (2 * sxy + C2) / (vx + vy + C2)
    st = (cxy + C3) / (sxy + C3)
    out = torch.ones_like(lum)
    for term, e in ((lum, alpha), (con, beta), (st, gamma)):
        if e:
            out = out * _pow(term, e)
    return out


def _ssim_feature_loss_reference(student: Tensor, teacher: Tensor, *, eps: float = 1e-6, **kw) -> Tensor:
    """:func:`ssim_feature_loss` with plain differentiable ops."""
    smap = _ssim_map_reference(_minmax_normalize(student, eps), _minmax_normalize(teacher, eps), **kw)
    return ((1 - smap) / 2).mean()
