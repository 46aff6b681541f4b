"""Texture of the right amount (tiny preset): a Gaussian draw of the fine detail that one-step SR cannot know.

A model trained to be right pixel by pixel estimates the posterior mean E[x_HR | x_LR]: detail whose place the LR
does not pin down (fur, grain, the texture of a surface) averages out, and the result is smoother than any photo.
A draw from the posterior keeps it, at the cost of fidelity: its expected squared error is twice the mean's
(Blau & Michaeli 2018, "The Perception-Distortion Tradeoff"). Stable Diffusion's decoder, trained adversarially,
renders such detail from its latent; the tiny preset's pixel autoencoder cannot, so this file adds the simplest
draw that has the right amount in the right place:

    r_k ~ N(0, v_k(x))              the missing detail of band k (BANDS: the frequencies that the bicubic x4
                                     up-sampling x lacks), zero-mean Gaussian of a local variance v_k that a small
                                     CNN predicts from x
    nll = log v_k + e_k / v_k        its Gaussian negative log-likelihood, e_k = the local energy of band k of
                                     grey(x_HR - x): the minimiser is v_k = E[e_k | x]   (fit_loss, stage 1)
    x_SR <- x_SR + T sum_k sqrt(v_k) n_k    n_k = band k of white noise at unit variance; T the temperature

The phase of what is added is random: it is texture of the right amount and scale, never the photo's own. T = 1
adds the whole predicted amount (a Gaussian posterior sample). The draw adds T^2 of the predicted variance to the
expected squared error, so for a calibrated predictor it costs at most 10 log10(1 + T^2) dB of PSNR:
DEFAULT_TEMPERATURE = 0.25 costs 0.26 dB, inside the 0.5 dB that the bundled model's fidelity target allows, and
makes the output far more natural by NIQE (bench/README.md, "Texture of the right amount"). On smooth content the
predicted variance is nearly 0: the predictor learns from blurred copies of its crops, whose missing detail is nil.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import gaussian_blur
from degradations import degrade_bicubic

# cycles per pixel: from where bicubic x4's response has fallen to about half (the LR's Nyquist is 0.125) to the
# corner of the spectrum, in two rings, so that fine and finer detail each get their own amount
BANDS = ((0.08, 0.18), (0.18, 0.71))
DEFAULT_TEMPERATURE = 0.25
LOG_V_FLOOR = -20.0  # v >= 2e-9: a hundredth of a grey level's variance


def grey(x):
    """(B, 3, H, W) -> (B, 1, H, W), the luma weights of ITU-R BT.601: texture is added to R, G and B alike."""
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]


def bands(x):
    """(B, 1, H, W) -> (B, K, H, W): x filtered to each of BANDS (disjoint rings of the FFT, periodic borders).
    The rings are symmetric and x is real, so half the spectrum (rfft2) holds all of it: half the memory of fft2
    on a large image, one band at a time."""
    height, width = x.shape[-2:]
    radius = torch.fft.fftfreq(height, device=x.device)[:, None].hypot(torch.fft.rfftfreq(width, device=x.device))
    spectrum = torch.fft.rfft2(x.float())  # (B, 1, H, W/2 + 1)
    return torch.cat([torch.fft.irfft2(spectrum * ((radius >= lo) & (radius < hi)), s=(height, width))
                      for lo, hi in BANDS], dim=1)


def unit_bands(height, width, seed, device):
    """Band k of white noise, each scaled to unit variance over the image: (1, K, H, W). Drawn on the CPU from
    `seed`, so that a seed gives the same texture on any device and in any batch."""
    noise = torch.randn(1, 1, height, width, generator=torch.Generator().manual_seed(seed))
    noise = bands(noise.to(device))
    return noise / noise.pow(2).mean((-2, -1), keepdim=True).sqrt()


def bicubic_x4(lr):
    """The predictor's input: lr (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1]."""
    return F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)


class TexturePredictor(nn.Module):
    """log v_k for each 4 x 4 block of x = bicubic_x4(lr): the block's 48 pixels through six 3x3 convolutions at
    the LR's resolution (0.16 M parameters at 64 channels)."""

    def __init__(self, hidden=64):
        super().__init__()
        layers = [nn.Conv2d(48, hidden, 3, padding=1)]
        for _ in range(4):
            layers += [nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1)]
        self.net = nn.Sequential(*layers, nn.SiLU(), nn.Conv2d(hidden, len(BANDS), 3, padding=1))

    def forward(self, x):
        """x (B, 3, H, W) in [0, 1] -> log v (B, K, H/4, W/4), in (LOG_V_FLOOR, 5]: a smooth floor, whose gradient
        never vanishes (a blurred crop's missing detail is nil, and a hard clamp there would stop learning for
        good), and a cap, so that exp stays finite."""
        x = F.pixel_unshuffle(x, 4).to(self.net[0].weight.dtype)  # (B, 48, H/4, W/4)
        return (LOG_V_FLOOR + F.softplus(self.net(x).float() - LOG_V_FLOOR)).clamp(max=5)

    def nll(self, lr, hr):
        """The mean negative log-likelihood of the missing detail's energy in each 4 x 4 block; lr (B, 3, h, w) and
        hr (B, 3, 4h, 4w) in [0, 1]."""
        x = bicubic_x4(lr)
        energy = F.avg_pool2d(bands(grey(hr - x)) ** 2, 4)  # (B, K, H/4, W/4)
        log_v = self(x)
        return (log_v + energy / log_v.exp()).mean()

    def fit_loss(self, hr):
        """What stage 1 adds to its loss: the nll of HR crops hr (B, 3, H, W) in [0, 1] and of copies of them
        blurred smooth (sigma 2 to 6 px across the batch), each with its clean bicubic x4 LR. A smooth LR can
        come from a blurred photo or from fine grain that down-sampling erased; the copies teach the predictor
        that smooth content lacks nothing, so that it stays smooth (texture on a blurred photo or a sky is an
        error anyone sees)."""
        sigmas = torch.linspace(2, 6, len(hr)).tolist()
        hr = torch.cat([hr, torch.stack([gaussian_blur(x, sigma) for x, sigma in zip(hr, sigmas)])])  # (2B, 3, H, W)
        return self.nll(degrade_bicubic(hr, 4), hr)

    def sample(self, lr, seed=0):
        """sum_k sqrt(v_k) n_k: grey texture (B, 1, 4h, 4w) of the predicted local amount for lr (B, 3, h, w),
        each image's noise drawn from `seed`."""
        x = bicubic_x4(lr)
        v = F.interpolate(self(x).exp(), scale_factor=4, mode="bilinear", align_corners=False)  # (B, K, H, W)
        noise = unit_bands(*x.shape[-2:], seed, x.device)  # (1, K, H, W)
        return (noise * v.sqrt()).sum(1, keepdim=True)
