"""The PSNR and SSIM that benchmarks/pab_quality.py compares PAB samples with, checked against known values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from pab_quality import clip_scores, psnr, ssim  # noqa: E402


def video(seed: int = 0, shape=(3, 4, 16, 16)) -> torch.Tensor:
    """A smooth-ish clip in [0, 1] (C, T, H, W): a random field blurred a little, so SSIM has structure to see."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x + x.roll(1, -1) + x.roll(1, -2)) / 3
    return x


def test_identical_inputs():
    x = video()
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert psnr(x, x) == math.inf


def test_psnr_of_a_constant_offset():
    x = video() * 0.9  # in [0, 0.9], so x + 0.1 stays within the data range
    y = x + 0.1
    assert psnr(x, y) == pytest.approx(20 * math.log10(1 / 0.1), abs=1e-4)
    assert psnr(x.float(), y.float()) == pytest.approx(20.0, abs=1e-4)
    # Data range scales the peak: the same error on a range of 2 is 20 log10(2) dB better.
    assert psnr(x, y, data_range=2.0) == pytest.approx(20 + 20 * math.log10(2), abs=1e-4)


def test_ssim_falls_as_noise_grows():
    x = video()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    values = [ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(0 < v < 1 for v in values), values
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values), values
    # Symmetric in its arguments.
    y = (x + 0.1 * noise).clamp(0, 1)
    assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)


def test_ssim_of_constant_images_by_hand():
    # Constant maps have zero local variance and covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere.
    a, b = 0.5, 0.25
    c1 = (0.01 * 1) ** 2
    x = torch.full((2, 3, 12, 13), a)
    y = torch.full((2, 3, 12, 13), b)
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_of_one_window_by_hand():
    # An 11x11 image has exactly one window position: sum the Gaussian-weighted statistics with plain loops.
    g = torch.Generator().manual_seed(2)
    x = torch.rand(11, 11, generator=g, dtype=torch.float64)
    y = (0.7 * x + 0.2 * torch.rand(11, 11, generator=g, dtype=torch.float64)).clamp(0, 1)
    weights = [[math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5**2)) for j in range(11)] for i in range(11)]
    total = sum(map(sum, weights))
    xs, ys = x.tolist(), y.tolist()

    def mean(f):
        return sum(weights[i][j] * f(i, j) for i in range(11) for j in range(11)) / total

    mx, my = mean(lambda i, j: xs[i][j]), mean(lambda i, j: ys[i][j])
    vx = mean(lambda i, j: (xs[i][j] - mx) ** 2)
    vy = mean(lambda i, j: (ys[i][j] - my) ** 2)
    cxy = mean(lambda i, j: (xs[i][j] - mx) * (ys[i][j] - my))
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    assert 0 < expected < 1
    assert ssim(x, y) == pytest.approx(expected, rel=1e-10)
    # A leading channel/frame axis averages the maps: the same pair twice gives the same value.
    assert ssim(torch.stack([x, x]), torch.stack([y, y])) == pytest.approx(expected, rel=1e-10)


def test_ssim_rejects_small_or_mismatched_maps():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="different shapes"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="different shapes"):
        psnr(torch.zeros(3), torch.zeros(4))


def test_clip_scores_average_per_clip():
    # Videos in [-1, 1]: clip 0 identical, clip 1 off by 0.2 in [-1, 1] = 0.1 in [0, 1] (20 dB).
    ref = torch.stack([video(3), video(4)]) * 1.6 - 0.9  # in [-0.9, 0.7]
    out = ref.clone()
    out[1] += 0.2
    scores = clip_scores(out, ref)
    assert scores["psnr"] == math.inf  # one identical clip makes the mean infinite
    assert scores["psnr_min"] == pytest.approx(20.0, abs=1e-4)
    assert scores["ssim"] == pytest.approx((1 + ssim((ref[1] + 1.2) / 2, (ref[1] + 1) / 2)) / 2, rel=1e-12)
    assert scores["max_abs_diff"] == pytest.approx(0.1, abs=1e-12)
