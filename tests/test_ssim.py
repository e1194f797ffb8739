"""SSIM feature distillation (kdctl.distill.ssim): values against kornia and a direct formula,
the custom backward against autograd, small FPN levels, constant maps, normalisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kdctl.distill import ssim as S
from kdctl.distill.ssim import ssim, ssim_feature_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread (with 2 threads on a busy 2-core machine every OpenMP region of
    a gradcheck's hundreds of small convolutions can wait a scheduler slice)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def conv_path(monkeypatch):
    """Force the convolution path (reflect pad + depthwise conv, transposed conv + fold) on
    small maps that would otherwise take the filter-matrix path."""
    monkeypatch.setattr(S, "_MATRIX_MAX_PIXELS", 0)


def _grad(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*inputs)
    value.backward()
    return value.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 4, 20, 31), (2, 2, 37, 12), (1, 2, 7, 10), (1, 1, 48, 64)])
@pytest.mark.parametrize("path", ["auto", "conv"])
def test_ssim_matches_kornia(shape, path, monkeypatch):
    kornia = pytest.importorskip("kornia")
    if path == "conv":
        monkeypatch.setattr(S, "_MATRIX_MAX_PIXELS", 0)
    g = torch.Generator().manual_seed(sum(shape))
    x, y = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    for y in (y, 0.6 * x + 0.4 * y):  # independent, correlated
        expected = kornia.metrics.ssim(x, y, 11, padding="same").mean()
        assert ssim(x, y).item() == pytest.approx(expected.item(), abs=1e-5)


def test_kornia_loss_on_normalised_maps():
    kornia = pytest.importorskip("kornia")
    s, t = torch.randn(2, 8, 25, 38), torch.randn(2, 8, 25, 38)
    expected = kornia.losses.ssim_loss(S._minmax_normalize(s), S._minmax_normalize(t), 11)
    assert ssim_feature_loss(s, t).item() == pytest.approx(expected.item(), abs=1e-5)


def test_identical_inputs():
    x = torch.rand(2, 3, 20, 24)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, x, alpha=0.5, beta=2.0, gamma=1.5).item() == pytest.approx(1.0, abs=1e-5)
    f = torch.randn(2, 3, 20, 24)
    assert ssim_feature_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert ssim_feature_loss(f, f.clone(), beta=0.5).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("shape,path", [((1, 2, 6, 7), "conv"), ((1, 2, 6, 7), "matrix"), ((1, 1, 3, 5), "matrix"),
                                        ((1, 2, 2, 2), "matrix"), ((1, 1, 1, 1), "matrix")])
@pytest.mark.parametrize("exps", [(1.0, 1.0, 1.0), (0.5, 2.0, 2.0), (1.0, 0.7, 1.3)])
def test_gradcheck_float64(shape, path, exps, monkeypatch):
    """The fused value-and-gradient pass against finite differences, both inputs; ``path``:
    the conv path (window 5 so that 6x7 can be reflect-padded) or the mirror matrices."""
    window = {}
    if path == "conv":
        monkeypatch.setattr(S, "_MATRIX_MAX_PIXELS", 0)
        window = dict(window_size=5, sigma=1.0)
    kw = dict(alpha=exps[0], beta=exps[1], gamma=exps[2], **window)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: ssim(a, b, **kw), (x, y), eps=1e-6, atol=1e-7, rtol=1e-4)
    s = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a: ssim_feature_loss(a, y.detach(), **kw), (s,), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_gradcheck_conv_path_odd_sizes(conv_path):
    """Window 11 on odd sizes, normalised loss, gradients to both inputs."""
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 13, 9), (1, 2, 6, 11)]:
        x = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
        assert gradcheck(lambda a, b: ssim_feature_loss(a, b), (x, y), eps=1e-6, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("h,w", [(8, 13), (6, 6), (11, 7)])
def test_conv_filter_and_adjoint_equal_the_mirror_matrices(h, w):
    """G by reflect pad + separable conv equals the mirror-extension matrices, and the
    transposed conv + fold is exactly its adjoint."""
    ws, sigma, half = 11, 1.5, 5
    a = torch.randn(3, 4, h, w, dtype=torch.float64)
    b = torch.randn(3, 4, h, w, dtype=torch.float64)
    ga = S._blur_padded(F.pad(a, (half,) * 4, mode="reflect"), ws, sigma)
    torch.testing.assert_close(ga, S._blur_matrix(a, ws, sigma))
    gtb = S._blur_padded_adjoint(b, ws, sigma)
    torch.testing.assert_close(gtb, S._blur_matrix(b, ws, sigma, adjoint=True))
    torch.testing.assert_close((ga * b).sum(), (a * gtb).sum())


def test_mirror_matrix_small_sizes():
    m1 = S._filter_matrix(1, 11, 1.5, torch.device("cpu"), torch.float64)
    assert m1.shape == (1, 1) and m1.item() == pytest.approx(1.0, abs=1e-12)
    for n in (2, 3, 5, 6):
        m = S._filter_matrix(n, 11, 1.5, torch.device("cpu"), torch.float64)
        torch.testing.assert_close(m.sum(1), torch.ones(n, dtype=torch.float64))  # rows: weights of a mean
        assert (m >= 0).all()


def _close(a, b, rel=1e-4):
    """Equal up to ``rel`` of the largest magnitude (float32 sums and cancellations)."""
    torch.testing.assert_close(a, b, atol=rel * b.abs().max().item(), rtol=0)


def test_backward_matches_autograd_reference():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 24, 40, 56, generator=g), torch.randn(2, 24, 40, 56, generator=g)
    v1, (gs1,) = _grad(lambda a: ssim_feature_loss(a, t), s)
    v2, (gs2,) = _grad(lambda a: S._ssim_feature_loss_reference(a, t), s)
    torch.testing.assert_close(v1, v2, atol=1e-6, rtol=1e-5)
    _close(gs1, gs2)
    x, y = torch.rand(2, 8, 33, 47, generator=g), torch.rand(2, 8, 33, 47, generator=g)
    v1, g1 = _grad(ssim, x, y)
    v2, g2 = _grad(lambda a, b: S._ssim_map_reference(a, b).mean(), x, y)
    torch.testing.assert_close(v1, v2, atol=1e-6, rtol=1e-5)
    for a, b in zip(g1, g2):
        _close(a, b)
    # fractional exponents: float32 itself is only good to ~1e-2 of the largest gradient
    # (|s|^(gamma - 1) near s = 0), so compare in float64
    kw = dict(alpha=0.5, beta=1.5, gamma=0.8)
    s, t = s[:, :8].double(), t[:, :8].double()
    v1, (gs1,) = _grad(lambda a: ssim_feature_loss(a, t, **kw), s)
    v2, (gs2,) = _grad(lambda a: S._ssim_feature_loss_reference(a, t, **kw), s)
    torch.testing.assert_close(v1, v2, atol=1e-10, rtol=1e-9)
    _close(gs1, gs2, rel=1e-7)


@pytest.mark.parametrize("case", ["both", "student", "teacher"])
@pytest.mark.parametrize("exps", [(1.0, 1.0, 1.0), (0.5, 2.0, 1.0)])
def test_constant_maps_are_finite(case, exps):
    kw = dict(alpha=exps[0], beta=exps[1], gamma=exps[2])
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 16, 20, generator=g), torch.randn(2, 3, 16, 20, generator=g)
    if case in ("both", "student"):
        s = torch.full_like(s, 0.3)
    if case in ("both", "teacher"):
        t = torch.full_like(t, -2.0)
    for fn in (ssim_feature_loss, ssim):
        if fn is ssim:  # values in [0, 1]
            s, t = s.clamp(0, 1), t.clamp(0, 1)
        value, grads = _grad(lambda a, b: fn(a, b, **kw), s, t)
        assert torch.isfinite(value)
        assert all(torch.isfinite(gr).all() for gr in grads)
    if case == "both":  # two flat maps: identical after normalisation (all zeros)
        assert ssim_feature_loss(s, t, **kw).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (5, 3), (7, 10), (1, 9)])
def test_small_levels(hw):
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 4, *hw, generator=g), torch.randn(2, 4, *hw, generator=g)
    for kw in ({}, dict(alpha=1.0, beta=0.5, gamma=1.5)):
        value, (gs, gt) = _grad(lambda a, b: ssim_feature_loss(a, b, **kw), s, t)
        assert torch.isfinite(value) and 0.0 <= value.item() <= 1.0
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
        ref, (rs, rt) = _grad(lambda a, b: S._ssim_feature_loss_reference(a, b, **kw), s, t)
        torch.testing.assert_close(value, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gs, rs, atol=1e-7, rtol=1e-4)


def test_one_pixel_map_is_luminance():
    g = torch.Generator().manual_seed(9)
    x, y = torch.rand(3, 5, 1, 1, generator=g), torch.rand(3, 5, 1, 1, generator=g)
    lum = (2 * x * y + S.C1) / (x * x + y * y + S.C1)
    assert ssim(x, y).item() == pytest.approx(lum.mean().item(), abs=1e-5)
    assert ssim(x, y, alpha=2.0).item() == pytest.approx((lum ** 2).mean().item(), abs=1e-5)


def test_feature_loss_normalisation_per_sample_and_channel():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 6, 18, 22, generator=g), torch.randn(2, 6, 18, 22, generator=g)
    a = torch.rand(2, 6, 1, 1, generator=g) * 5 + 0.1  # a > 0 per sample and channel
    b = torch.randn(2, 6, 1, 1, generator=g) * 10
    v1, (g1,) = _grad(lambda u: ssim_feature_loss(u, t), s)
    v2, (g2,) = _grad(lambda u: ssim_feature_loss(a * u + b, 3 * t - 1), s)
    assert v2.item() == pytest.approx(v1.item(), abs=1e-5)
    torch.testing.assert_close(g2, g1, atol=2e-6, rtol=1e-3)  # d/ds of the same loss
    assert 0.0 <= v1.item() <= 1.0
    neg = ssim_feature_loss(s, -s)  # anti-correlated: the loss is high but stays in [0, 1]
    assert 0.4 < neg.item() <= 1.0


def _direct_ssim(x, y, ws, sigma, alpha, beta, gamma):
    """SSIM straight from the definition: reflect-padded windows via unfold, weighted sums."""
    b, c, h, w = x.shape
    half = ws // 2
    g1 = S.gaussian_window(ws, sigma, dtype=x.dtype)
    weight = (g1[:, None] * g1[None, :]).reshape(-1, 1)

    def windows(t):
        return F.unfold(F.pad(t, (half,) * 4, mode="reflect").reshape(b * c, 1, h + 2 * half, w + 2 * half), ws)

    px, py = windows(x), windows(y)  # [BC, ws*ws, HW]
    mx, my = (weight * px).sum(1), (weight * py).sum(1)
    vx = (weight * (px - mx[:, None]) ** 2).sum(1)
    vy = (weight * (py - my[:, None]) ** 2).sum(1)
    cxy = (weight * (px - mx[:, None]) * (py - my[:, None])).sum(1)
    sx, sy = vx.clamp_min(0).sqrt(), vy.clamp_min(0).sqrt()
    lum = (2 * mx * my + S.C1) / (mx ** 2 + my ** 2 + S.C1)
    con = (2 * sx * sy + S.C2) / (vx + vy + S.C2)
    st = (cxy + S.C3) / (sx * sy + S.C3)
    spow = lambda t, e: t.sign() * t.abs() ** e  # noqa: E731
    return (spow(lum, alpha) * spow(con, beta) * spow(st, gamma)).mean()


@pytest.mark.parametrize("exps", [(1.0, 1.0, 1.0), (2.0, 0.5, 1.5), (0.3, 1.0, 3.0), (1.0, 2.0, 2.0)])
def test_exponents_against_direct_formula(exps):
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 12, 15, generator=g, dtype=torch.float64)
    y = (0.5 * x + 0.5 * torch.rand(2, 3, 12, 15, generator=g, dtype=torch.float64)).clamp(0, 1)
    y[0, 0] = 1 - x[0, 0]  # an anti-correlated plane: negative structure term
    expected = _direct_ssim(x, y, 7, 1.2, *exps)
    got = ssim(x, y, window_size=7, sigma=1.2, alpha=exps[0], beta=exps[1], gamma=exps[2])
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_bf16_autocast_and_dtypes():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 16, 20, 26, generator=g), torch.randn(2, 16, 20, 26, generator=g)
    sb = s.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ssim_feature_loss(sb, t.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert sb.grad.dtype == torch.bfloat16 and torch.isfinite(sb.grad.float()).all()
    ref = ssim_feature_loss(s.bfloat16().float(), t.bfloat16().float())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_backward_twice_with_retain_graph_and_weight():
    s, t = torch.randn(2, 4, 20, 20, requires_grad=True), torch.randn(2, 4, 20, 20)
    loss = 3.0 * ssim_feature_loss(s, t)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)
    _, (ref,) = _grad(lambda a: 3.0 * S._ssim_feature_loss_reference(a, t), s)
    _close(first, ref)


def test_worker_threads_give_the_same_result():
    """With several torch threads the CPU chunks run on worker threads (one op thread each)."""
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(2, 40, 30, 41, generator=g), torch.randn(2, 40, 30, 41, generator=g)
    v1, (g1,) = _grad(lambda a: ssim_feature_loss(a, t), s)
    torch.set_num_threads(2)
    try:
        v2, (g2,) = _grad(lambda a: ssim_feature_loss(a, t), s)
        assert torch.get_num_threads() == 2  # restored after the worker pass
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(v2, v1, atol=1e-7, rtol=0)
    _close(g2, g1, rel=1e-5)  # other chunk sizes: other rounding


def test_no_grad_and_teacher_without_grad():
    s, t = torch.randn(1, 3, 16, 16, requires_grad=True), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        v = ssim_feature_loss(s, t)
    assert not v.requires_grad
    assert ssim_feature_loss(s, t).item() == pytest.approx(v.item(), abs=1e-7)


def test_invalid_inputs():
    x = torch.rand(1, 2, 8, 8)
    with pytest.raises(ValueError):
        ssim(x, x[:, :1])
    with pytest.raises(ValueError):
        ssim(x[0], x[0])
    with pytest.raises(ValueError):
        ssim(x, x, window_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    s, t = torch.randn(2, 32, 25, 38), torch.randn(2, 32, 25, 38)
    v_cpu, (g_cpu,) = _grad(lambda a: ssim_feature_loss(a, t), s)
    v_gpu, (g_gpu,) = _grad(lambda a: ssim_feature_loss(a, t.cuda()), s.cuda())
    assert v_gpu.item() == pytest.approx(v_cpu.item(), abs=1e-5)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, atol=1e-8, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(ssim_feature_loss(s.cuda().requires_grad_(), t.cuda()))
