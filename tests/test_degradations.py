import math
import os
from statistics import mean

import pytest
import scipy.special
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import degradations
from conftest import PHOTOS
from degradations import (add_gaussian_noise, add_poisson_noise, degrade_bicubic, degrade_realesrgan, filter2d,
                          gaussian_kernel, generalized_gaussian_kernel, jpeg, plateau_kernel, random_blur_kernel,
                          sinc_kernel)

TRAIN = os.path.join(PHOTOS, "train")



def photo_crop(name="astronaut.png", box=(160, 160, 224, 224)):
    image = Image.open(os.path.join(TRAIN, name)).convert("RGB").crop(box)
    return pil_to_tensor(image).float() / 255  # (3, 64, 64)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def coarse(image):
    return F.avg_pool2d(image[None], 4)[0]  # (3, H/4, W/4): the picture's content without detail or noise


def high_frequency_energy(image):
    laplacian = 4 * image[..., 1:-1, 1:-1] - image[..., :-2, 1:-1] - image[..., 2:, 1:-1] \
        - image[..., 1:-1, :-2] - image[..., 1:-1, 2:]
    return laplacian.pow(2).mean().item()


# ----------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("make", [
    lambda: gaussian_kernel(21, 2.0, 2.0, 0.0),
    lambda: gaussian_kernel(15, 0.5, 2.8, 1.0),
    lambda: generalized_gaussian_kernel(11, 1.5, 0.7, -2.0, 0.5),
    lambda: generalized_gaussian_kernel(9, 2.5, 2.5, 0.0, 4.0),
    lambda: plateau_kernel(13, 1.0, 3.0, 0.3, 1.0),
    lambda: plateau_kernel(7, 0.2, 0.2, 0.0, 2.0),
    lambda: sinc_kernel(21, math.pi / 5),
    lambda: sinc_kernel(7, math.pi),
])
def test_kernels_sum_to_one_and_peak_at_centre(make):
    kernel = make()
    size = kernel.shape[0]
    assert kernel.shape == (size, size) and size % 2 == 1 and kernel.dtype == torch.float32
    assert abs(kernel.sum().item() - 1) < 1e-6
    assert kernel[size // 2, size // 2] == kernel.max()


def test_isotropic_kernels_are_symmetric():
    for kernel in (gaussian_kernel(15, 2.2, 2.2, 0.0), generalized_gaussian_kernel(15, 1.7, 1.7, 0.0, 3.0),
                   plateau_kernel(15, 1.3, 1.3, 0.0, 1.5), sinc_kernel(15, 1.1)):
        assert torch.allclose(kernel, kernel.T, atol=1e-8)
        assert torch.allclose(kernel, kernel.flip(0), atol=1e-8)
        assert torch.allclose(kernel, kernel.flip(1), atol=1e-8)


def test_isotropic_gaussian_is_the_outer_product_of_1d_gaussians():
    x = torch.arange(-10, 11, dtype=torch.float64)
    g = torch.exp(-x ** 2 / (2 * 1.7 ** 2))
    expected = torch.outer(g, g) / torch.outer(g, g).sum()
    assert (gaussian_kernel(21, 1.7, 1.7, 0.0).double() - expected).abs().max() < 1e-7


def test_anisotropic_gaussian_orientation_and_rotation():
    wide_x = gaussian_kernel(21, 3.0, 1.0, 0.0)
    columns = torch.arange(21.0) - 10
    spread_along_x = (wide_x.sum(0) * columns ** 2).sum()
    spread_along_y = (wide_x.sum(1) * columns ** 2).sum()
    assert spread_along_x > 5 * spread_along_y
    # a quarter turn swaps the axes
    assert torch.allclose(gaussian_kernel(21, 3.0, 1.0, math.pi / 2), wide_x.T, atol=1e-7)
    assert torch.allclose(gaussian_kernel(21, 1.0, 3.0, 0.0), wide_x.T, atol=1e-7)


def test_generalized_gaussian_with_beta_one_is_gaussian():
    assert torch.allclose(generalized_gaussian_kernel(13, 1.2, 2.0, 0.7, 1.0), gaussian_kernel(13, 1.2, 2.0, 0.7),
                          atol=1e-7)


def test_sinc_kernel_matches_the_bessel_formula():
    size, omega = 13, 2.0
    centre = (size - 1) / 2
    expected = torch.zeros(size, size, dtype=torch.float64)
    for y in range(size):
        for x in range(size):
            r = math.hypot(x - centre, y - centre)
            if r == 0:
                expected[y, x] = omega ** 2 / (4 * math.pi)
            else:
                expected[y, x] = omega * scipy.special.j1(omega * r) / (2 * math.pi * r)
    expected /= expected.sum()
    assert (sinc_kernel(size, omega).double() - expected).abs().max() < 1e-7


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_anisotropic_kernels_match_real_esrgans_formulas(beta):
    """q = x^T Sigma^-1 x with Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T, x = (column, row) from the centre;
    generalized Gaussian exp(-q^beta / 2), plateau 1 / (q^beta + 1), written out pixel by pixel."""
    size, sx, sy, theta = 11, 2.0, 0.7, 0.6
    c, s = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    variances = torch.diag(torch.tensor([sx ** 2, sy ** 2], dtype=torch.float64))
    inverse = torch.linalg.inv(rotation @ variances @ rotation.T)
    q = torch.zeros(size, size, dtype=torch.float64)
    for row in range(size):
        for col in range(size):
            x = torch.tensor([col - size // 2, row - size // 2], dtype=torch.float64)
            q[row, col] = x @ inverse @ x
    for kernel, expected in ((gaussian_kernel(size, sx, sy, theta), torch.exp(-q / 2)),
                             (generalized_gaussian_kernel(size, sx, sy, theta, beta), torch.exp(-q ** beta / 2)),
                             (plateau_kernel(size, sx, sy, theta, beta), 1 / (q ** beta + 1))):
        assert (kernel.double() - expected / expected.sum()).abs().max() < 1e-7


def test_random_kernels_are_odd_sized_7_to_21_and_normalized():
    generator = seeded(0)
    sizes = set()
    for _ in range(150):
        kernel = random_blur_kernel((0.2, 3.0), generator)
        sizes.add(kernel.shape[0])
        assert kernel.shape[0] == kernel.shape[1] and abs(kernel.sum().item() - 1) < 1e-5
    assert sizes == set(range(7, 22, 2))


# ----------------------------------------------------------------------------- single stages, forced

def test_filter2d_delta_is_identity_and_blur_removes_detail():
    image = photo_crop()
    delta = torch.zeros(9, 9)
    delta[4, 4] = 1
    assert torch.equal(filter2d(image, delta), image)
    blurred = filter2d(image, gaussian_kernel(9, 1.5, 1.5, 0.0))
    assert blurred.shape == image.shape
    assert high_frequency_energy(blurred) < 0.2 * high_frequency_energy(image)
    constant = torch.full((3, 5, 5), 0.3)  # smaller than the kernel: the padding falls back to replicate
    assert torch.allclose(filter2d(constant, gaussian_kernel(21, 3.0, 3.0, 0.0)), constant, atol=1e-6)


def test_gaussian_noise_has_the_drawn_sigma_and_gray_noise_is_shared():
    image = torch.full((3, 64, 64), 0.5)
    color = add_gaussian_noise(image, 10.0, gray=False, generator=seeded(0)) - image
    assert abs(color.std().item() - 10 / 255) < 0.1 * 10 / 255
    assert not torch.equal(color[0], color[1])
    gray = add_gaussian_noise(image, 10.0, gray=True, generator=seeded(0)) - image
    assert gray.abs().max() > 0 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert abs(gray.std().item() - 10 / 255) < 0.1 * 10 / 255


def test_poisson_noise_changes_the_image_keeps_its_mean_and_gray_is_shared():
    image = photo_crop()
    noisy = add_poisson_noise(image, 2.0, gray=False, generator=seeded(0))
    assert (noisy - image).abs().mean() > 0.01
    assert abs(noisy.mean().item() - image.mean().item()) < 0.01
    gray = add_poisson_noise(torch.full((3, 32, 32), 0.5), 1.0, gray=True, generator=seeded(0)) - 0.5
    assert gray.abs().max() > 0 and torch.equal(gray[0], gray[2])
    # 176 distinct levels make 256 photon levels: the noise std at value v is scale * sqrt(v / 256)
    ramp = (torch.arange(40, 216).float() / 255).expand(3, 200, 176).contiguous()
    for scale in (1.0, 2.0):
        noise = add_poisson_noise(ramp, scale, gray=False, generator=seeded(1)) - ramp
        assert noise.std().item() == pytest.approx(scale * (ramp.mean().item() / 256) ** 0.5, rel=0.05)


def test_jpeg_changes_the_image_more_at_low_quality_and_gives_8_bit_levels():
    image = photo_crop()
    low, high = jpeg(image, 30), jpeg(image, 95)
    assert low.shape == image.shape and low.dtype == torch.float32
    assert torch.equal((low * 255).round(), low * 255)
    error_low, error_high = (low - image).abs().mean().item(), (high - image).abs().mean().item()
    assert error_low > 0.01 and error_high < error_low
    assert torch.equal(jpeg(image, 30), low)


# ----------------------------------------------------------------------------- the whole pipeline

def test_same_seed_same_bits_different_seed_different_image():
    image = photo_crop()
    batch = torch.stack([image] * 4)  # four images draw every branch (gaussian and poisson noise, both orders)
    firsts = [degrade_realesrgan(batch, generator=seeded(seed)) for seed in (7, 8)]
    torch.manual_seed(123)  # the global generator must play no part
    assert torch.equal(degrade_realesrgan(batch, generator=seeded(7)), firsts[0])
    assert not torch.equal(firsts[1], firsts[0])


def test_global_generator_is_used_when_none_is_given():
    image = photo_crop()
    torch.manual_seed(5)
    first = degrade_realesrgan(image)
    torch.manual_seed(5)
    assert torch.equal(degrade_realesrgan(image), first)


def test_output_size_dtype_range_and_8_bit_levels():
    image = torch.rand(2, 3, 48, 64)
    for seed in range(6):
        lr = degrade_realesrgan(image, generator=seeded(seed))
        assert lr.shape == (2, 3, 12, 16) and lr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.equal((lr * 255).round(), lr * 255)
    assert degrade_realesrgan(image[0], generator=seeded(0)).shape == (3, 12, 16)


def test_batch_images_are_degraded_in_order_from_one_generator():
    image = photo_crop()
    batch = degrade_realesrgan(torch.stack([image, image]), generator=seeded(3))
    assert torch.equal(batch[0], degrade_realesrgan(image, generator=seeded(3)))
    assert not torch.equal(batch[0], batch[1])


def test_smallest_image_survives_every_draw():
    image = torch.rand(3, 16, 16)
    for seed in range(40):
        assert degrade_realesrgan(image, generator=seeded(seed)).shape == (3, 4, 4)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        degrade_realesrgan(torch.rand(3, 62, 64))
    with pytest.raises(ValueError, match="at least 16"):
        degrade_realesrgan(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        degrade_realesrgan(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="divisible by 4"):
        degrade_bicubic(torch.rand(3, 63, 64))


def test_bicubic_matches_pillow():
    image = photo_crop()
    ours = degrade_bicubic(image)
    assert ours.shape == (3, 16, 16) and torch.equal((ours * 255).round(), ours * 255)
    pixels = Image.open(os.path.join(TRAIN, "astronaut.png")).convert("RGB").crop((160, 160, 224, 224))
    reference = pil_to_tensor(pixels.resize((16, 16), Image.BICUBIC)).float() / 255
    assert (ours - reference).abs().max() <= 2.5 / 255  # Pillow rounds to 8 bit between its two passes
    assert torch.equal(degrade_bicubic(image[None])[0], ours)


def test_second_order_pipeline_runs_its_stages_in_order(monkeypatch):
    """Recorded operations of degrade_realesrgan over many draws: blur, resize (relative to the HR size), noise,
    JPEG; then blur (80 %), resize (relative to the LR size), noise; then resize to the LR size + sinc and JPEG,
    in either order. (Each operation's own numbers are tested above.)"""
    calls = []

    def record(name):
        def operation(img, *args):
            if name == "resize":
                calls.append(("resize", tuple(args[0])))
                return F.interpolate(img[None], size=args[0], mode="nearest")[0]
            calls.append((name, tuple(img.shape[1:])))
            return img
        return operation
    for name, function in (("blur", "filter2d"), ("resize", "_resize"), ("noise", "_random_noise"),
                           ("jpeg", "_random_jpeg")):
        monkeypatch.setattr(degradations, function, record(name))
    hr, generator, sequences = torch.rand(3, 64, 64), seeded(0), set()
    for _ in range(200):
        calls.clear()
        assert degrade_realesrgan(hr, 4, generator).shape == (3, 16, 16)
        names = [name for name, _ in calls]
        assert names[:4] == ["blur", "resize", "noise", "jpeg"] and calls[0][1] == (64, 64)
        assert 64 * 0.15 - 1 <= calls[1][1][0] <= 64 * 1.5  # stage 1 resizes relative to the HR size
        stage2 = names[4:7] if names[4] == "blur" else names[4:6]  # [blur,] resize, noise
        assert stage2 in (["blur", "resize", "noise"], ["resize", "noise"])
        resize2 = calls[4 + len(stage2) - 2][1]
        assert 16 * 0.3 - 1 <= resize2[0] <= 16 * 1.2  # stage 2 resizes relative to the LR size
        final = names[4 + len(stage2):]
        assert final in (["resize", "blur", "jpeg"], ["resize", "jpeg"], ["jpeg", "resize", "blur"], ["jpeg", "resize"])
        assert ("resize", (16, 16)) in calls[4 + len(stage2):]
        sequences.add((len(stage2), final[0]))
    assert sequences == {(2, "resize"), (2, "jpeg"), (3, "resize"), (3, "jpeg")}  # every branch was taken


def test_real_photo_is_degraded_beyond_bicubic():
    image = photo_crop("astronaut.png", (100, 100, 228, 228))  # (3, 128, 128)
    bicubic = degrade_bicubic(image)
    bicubic_energy = high_frequency_energy(bicubic)
    distances, content_errors, energies = [], [], []
    for seed in range(16):
        lr = degrade_realesrgan(image, generator=seeded(seed))
        distances.append((lr - bicubic).abs().mean().item())
        content_errors.append((coarse(lr) - coarse(bicubic)).abs().mean().item())
        energies.append(high_frequency_energy(lr))
    # far from the bicubic LR: an identity, bicubic-only or nearly so pipeline fails
    assert mean(distances) > 0.04
    # blurrier than bicubic on average (the blur, resizes and sinc outweigh the noise)
    assert mean(energies) < 0.6 * bicubic_energy
    # yet still a picture of the same content: the coarse structure survives
    assert mean(content_errors) < 0.6 * mean(distances)



def test_mixed_degradation_draws_each_kind_at_its_rate(monkeypatch):
    from degradations import MIX_PROBS, degrade_mixed
    hr = torch.rand(3, 64, 64)
    assert torch.equal(degrade_mixed(hr, 4, torch.Generator().manual_seed(5)),
                       degrade_mixed(hr, 4, torch.Generator().manual_seed(5)))
    calls = []
    monkeypatch.setattr(degradations, "degrade_realesrgan", lambda x, s, g: calls.append("realesrgan") or x[:, ::s, ::s])
    monkeypatch.setattr(degradations, "jpeg", lambda x, q: calls.append(f"jpeg{q}") or x)
    kinds = []
    for seed in range(400):
        calls.clear()
        lr = degrade_mixed(hr, 4, torch.Generator().manual_seed(seed))
        assert lr.shape == (3, 16, 16)
        kinds.append(calls[0] if calls else "bicubic")
    assert set(kinds) == {"realesrgan", "bicubic"} | {f"jpeg{q}" for q in range(40, 96) if f"jpeg{q}" in kinds}
    qualities = [int(k[4:]) for k in kinds if k.startswith("jpeg")]
    assert min(qualities) >= 40 and max(qualities) <= 95 and max(qualities) - min(qualities) > 40
    shares = {"bicubic": kinds.count("bicubic"), "bicubic_jpeg": len(qualities), "realesrgan": kinds.count("realesrgan")}
    for kind, p in MIX_PROBS.items():
        assert abs(shares[kind] / len(kinds) - p) < 0.07, shares
    with pytest.raises(ValueError, match=r"degrade_mixed takes one \(3, H, W\) image, got shape \(2, 3, 64, 64\)"):
        degrade_mixed(hr.expand(2, 3, 64, 64), 4, torch.Generator().manual_seed(5))  # one kind for a whole batch
