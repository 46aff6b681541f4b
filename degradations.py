"""Real-world degradations: the second-order pipeline of Real-ESRGAN (SPEC section 6).

Real-ESRGAN (Wang, Xie, Dong & Shan 2021, "Real-ESRGAN: Training Real-World Blind Super-Resolution
with Pure Synthetic Data", ICCVW) makes LR training images by applying the classic degradation
model `y = JPEG(noise(resize(blur(x))))` twice, then a final resize to H/4 and a sinc filter
that imitates ringing and overshoot. Every parameter below is its x4 setting. A bicubic x4
degradation, the classic benchmark setting, is here too.

Randomness comes from a single torch.Generator, so a seeded generator reproduces the exact
same LR bits. JPEG goes through Pillow in memory (libjpeg), so the code runs on the CPU (it is
meant for DataLoader workers) and returns its result on the input's device.
"""
import io
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

KERNEL_SIZES = tuple(range(7, 22, 2))
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
SINC_PROB = 0.1
BETAG_RANGE = (0.5, 4.0)
BETAP_RANGE = (1.0, 2.0)
RESIZE_MODES = ("area", "bilinear", "bicubic")
JPEG_RANGE = (30, 95)
GRAY_NOISE_PROB = 0.4
GAUSSIAN_NOISE_PROB = 0.5

STAGE1 = dict(blur_sigma=(0.2, 3.0), resize_probs=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5),
              noise_sigma=(1.0, 30.0), poisson_scale=(0.05, 3.0))
STAGE2 = dict(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
              noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5))
FINAL_SINC_PROB = 0.8


# ----------------------------------------------------------------------------- random draws

def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _chance(p, generator):
    return torch.rand((), generator=generator, dtype=torch.float64).item() < p


def _choice(options, generator, probs=None):
    weights = torch.tensor(probs if probs is not None else [1.0] * len(options), dtype=torch.float64)
    return options[torch.multinomial(weights, 1, generator=generator).item()]


# ----------------------------------------------------------------------------- blur kernels

def _mahalanobis_grid(size, sigma_x, sigma_y, theta):
    """x^T Sigma^-1 x on a size x size grid centred on 0, Sigma = R(theta) diag(sx^2, sy^2) R^T."""
    half = size // 2
    ax = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    grid = torch.stack([xx, yy], dim=-1)  # (size, size, 2) as (x, y)
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = rotation @ torch.diag(torch.tensor([sigma_x ** 2, sigma_y ** 2], dtype=torch.float64)) @ rotation.T
    return ((grid @ torch.linalg.inv(sigma)) * grid).sum(-1)  # (size, size)


def _normalized(kernel):
    return (kernel / kernel.sum()).float()


def gaussian_kernel(size, sigma_x, sigma_y, theta):
    """Bivariate Gaussian exp(-q/2), summing to 1; isotropic when sigma_x == sigma_y."""
    return _normalized(torch.exp(-0.5 * _mahalanobis_grid(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta):
    """Generalized Gaussian exp(-q^beta / 2): flat top for beta > 1, heavy tails for beta < 1."""
    return _normalized(torch.exp(-0.5 * _mahalanobis_grid(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size, sigma_x, sigma_y, theta, beta):
    """Plateau-shaped 1 / (q^beta + 1)."""
    return _normalized(1.0 / (_mahalanobis_grid(size, sigma_x, sigma_y, theta) ** beta + 1.0))


def sinc_kernel(size, omega):
    """Circular low-pass filter with cutoff omega (2D sinc, `omega J1(omega r) / (2 pi r)`)."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    radius = torch.sqrt(xx ** 2 + yy ** 2)
    kernel = omega * torch.special.bessel_j1(omega * radius) / (2 * math.pi * radius)
    kernel[size // 2, size // 2] = omega ** 2 / (4 * math.pi)  # the limit at r = 0
    return _normalized(kernel)


def random_mixed_kernel(size, sigma_range, generator=None):
    """One of the six Real-ESRGAN kernel types, drawn with its probability, random shape and angle."""
    kind = _choice(KERNEL_TYPES, generator, KERNEL_PROBS)
    sigma_x = _uniform(*sigma_range, generator)
    if kind in ("iso", "generalized_iso", "plateau_iso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = _uniform(*sigma_range, generator), _uniform(-math.pi, math.pi, generator)
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sigma_x, sigma_y, theta)
    beta_range = BETAG_RANGE if kind.startswith("generalized") else BETAP_RANGE
    # half the draws below 1 and half above, as Real-ESRGAN does
    if _chance(0.5, generator):
        beta = _uniform(beta_range[0], 1.0, generator)
    else:
        beta = _uniform(1.0, beta_range[1], generator)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta)
    return plateau_kernel(size, sigma_x, sigma_y, theta, beta)


def random_blur_kernel(sigma_range, generator=None):
    """A blur kernel of random odd size 7..21: a sinc with probability 0.1, else a mixed kernel."""
    size = _choice(KERNEL_SIZES, generator)
    if _chance(SINC_PROB, generator):
        omega = _uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi, generator)
        return sinc_kernel(size, omega)
    return random_mixed_kernel(size, sigma_range, generator)


# ----------------------------------------------------------------------------- stages

def filter2d(img, kernel):
    """Convolve every channel of img (C, H, W) with kernel (k, k), k odd, keeping the size."""
    pad = kernel.shape[-1] // 2
    channels, h, w = img.shape
    # Reflect padding (as Real-ESRGAN) needs the image larger than the pad; tiny intermediates replicate.
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(img[None], (pad, pad, pad, pad), mode=mode)  # (1, C, H+2p, W+2p)
    weight = kernel.to(img).expand(channels, 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=channels)[0]


def _gray(img):
    r, g, b = img.unbind(0)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[None]  # (1, H, W), ITU-R 601 luma as torchvision


def _round_to_8bit(img):
    return (img.clamp(0, 1) * 255).round() / 255


def add_gaussian_noise(img, sigma, gray, generator=None):
    """Add N(0, (sigma/255)^2) noise, one field shared by the channels when gray; clamp to [0, 1]."""
    channels = 1 if gray else img.shape[0]
    noise = torch.randn((channels, *img.shape[1:]), generator=generator) * (sigma / 255)
    return (img + noise).clamp(0, 1)


def add_poisson_noise(img, scale, gray, generator=None):
    """Add scaled Poisson (shot) noise; the photon count follows the number of distinct 8-bit levels."""
    source = _round_to_8bit(_gray(img) if gray else img)
    levels = 2 ** math.ceil(math.log2(len(torch.unique(source))))
    noise = torch.poisson(source * levels, generator=generator) / levels - source
    return (img + scale * noise).clamp(0, 1)


def jpeg(img, quality):
    """JPEG-compress img (3, H, W) in [0, 1] at an integer quality with Pillow, in memory."""
    buffer = io.BytesIO()
    to_pil_image((img.clamp(0, 1) * 255).round().to(torch.uint8)).save(buffer, format="JPEG", quality=int(quality))
    return pil_to_tensor(Image.open(buffer).convert("RGB")).float() / 255


def _random_noise(img, stage, generator):
    if _chance(GAUSSIAN_NOISE_PROB, generator):
        sigma = _uniform(*stage["noise_sigma"], generator)
        gray = _chance(GRAY_NOISE_PROB, generator)
        return add_gaussian_noise(img, sigma, gray, generator)
    scale = _uniform(*stage["poisson_scale"], generator)
    gray = _chance(GRAY_NOISE_PROB, generator)
    return add_poisson_noise(img, scale, gray, generator)


def _random_jpeg(img, generator):
    return jpeg(img, torch.randint(JPEG_RANGE[0], JPEG_RANGE[1] + 1, (), generator=generator).item())


def _random_resize_factor(stage, generator):
    direction = _choice(("up", "down", "keep"), generator, stage["resize_probs"])
    low, high = stage["resize_range"]
    if direction == "up":
        return _uniform(1.0, high, generator)
    if direction == "down":
        return _uniform(low, 1.0, generator)
    return 1.0


def _resize(img, size, generator):
    mode = _choice(RESIZE_MODES, generator)
    return F.interpolate(img[None], size=size, mode=mode)[0]


def _final_resize_and_sinc(img, size, generator):
    img = _resize(img, size, generator)  # (3, H/4, W/4)
    if _chance(FINAL_SINC_PROB, generator):
        kernel_size = _choice(KERNEL_SIZES, generator)
        img = filter2d(img, sinc_kernel(kernel_size, _uniform(math.pi / 3, math.pi, generator)))
    return img


def _degrade_one(hr, scale, generator):
    _, h, w = hr.shape
    lr_size = (h // scale, w // scale)

    # stage 1: blur, resize relative to the HR size, noise, JPEG
    out = filter2d(hr, random_blur_kernel(STAGE1["blur_sigma"], generator))
    factor = _random_resize_factor(STAGE1, generator)
    out = _resize(out, (int(h * factor), int(w * factor)), generator)  # (3, h*f, w*f)
    out = _random_noise(out, STAGE1, generator)
    out = _random_jpeg(out, generator)

    # stage 2: blur, resize relative to the LR size, noise
    if _chance(STAGE2["blur_prob"], generator):
        out = filter2d(out, random_blur_kernel(STAGE2["blur_sigma"], generator))
    factor = _random_resize_factor(STAGE2, generator)
    out = _resize(out, (int(lr_size[0] * factor), int(lr_size[1] * factor)), generator)
    out = _random_noise(out, STAGE2, generator)

    # the final sinc and JPEG, in random order
    if _chance(0.5, generator):
        out = _random_jpeg(_final_resize_and_sinc(out, lr_size, generator), generator)
    else:
        out = _final_resize_and_sinc(_random_jpeg(out, generator), lr_size, generator)
    return _round_to_8bit(out)  # (3, H/4, W/4)


def _check_hr(hr, scale, min_side):
    if hr.dim() not in (3, 4) or hr.shape[-3] != 3:
        raise ValueError(f"expected an image (3, H, W) or a batch (B, 3, H, W), got shape {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale or min(h, w) < min_side:
        raise ValueError(f"image size {h}x{w} must be divisible by {scale} and at least {min_side} a side")


def degrade_realesrgan(hr, scale=4, generator=None):
    """Real-ESRGAN second-order degradation: hr (3, H, W) or (B, 3, H, W) in [0, 1] -> LR at 1/scale.

    The output lies on the 8-bit levels k/255. Each image of a batch is degraded independently,
    in order, from the same generator (None: torch's global generator).
    """
    _check_hr(hr, scale, min_side=max(4 * scale, 8))  # the smallest resize must keep a pixel
    batch = hr.detach().to("cpu", torch.float32).reshape(-1, *hr.shape[-3:])  # (B, 3, H, W)
    lr = torch.stack([_degrade_one(image, scale, generator) for image in batch])  # (B, 3, H/s, W/s)
    return lr.reshape(*hr.shape[:-2], *lr.shape[-2:]).to(hr.device)


def degrade_bicubic(hr, scale=4):
    """Classic bicubic downscaling (antialiased), clamped and rounded to 8 bit."""
    _check_hr(hr, scale, min_side=scale)
    batch = hr.reshape(-1, *hr.shape[-3:]).float()  # (B, 3, H, W)
    h, w = batch.shape[-2:]
    lr = F.interpolate(batch, size=(h // scale, w // scale), mode="bicubic", antialias=True)
    return _round_to_8bit(lr).reshape(*hr.shape[:-2], h // scale, w // scale)


# The tiny preset's input mix: clean and mildly compressed inputs beside the Real-ESRGAN ones, so that a
# model trained only on heavy degradations does not "restore" clean photos by painting texture on them.
MIX_PROBS = {"bicubic": 0.3, "bicubic_jpeg": 0.3, "realesrgan": 0.4}
MIX_JPEG_RANGE = (40, 95)


def degrade_mixed(hr, scale=4, generator=None):
    """hr (3, H, W) -> LR (3, H/s, W/s): bicubic, bicubic + JPEG, or Real-ESRGAN, drawn by MIX_PROBS (one
    image: each draws its own kind)."""
    if hr.dim() != 3:
        raise ValueError(f"degrade_mixed takes one (3, H, W) image, got shape {tuple(hr.shape)}")
    kind = _choice(tuple(MIX_PROBS), generator, tuple(MIX_PROBS.values()))
    if kind == "realesrgan":
        return degrade_realesrgan(hr, scale, generator)
    lr = degrade_bicubic(hr, scale)
    if kind == "bicubic_jpeg":
        lr = jpeg(lr, torch.randint(MIX_JPEG_RANGE[0], MIX_JPEG_RANGE[1] + 1, (), generator=generator).item())
    return lr.to(hr.device)

