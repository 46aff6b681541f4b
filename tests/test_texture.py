"""texture.py: the band split, the Gaussian NLL of the missing detail and its minimiser, the draw and its seed,
and how FlowSR, its checkpoints, super_resolve and train.py carry the predictor."""
import math

import pytest
import torch

import texture
from flowsr import FlowSR, super_resolve
from texture import BANDS, TexturePredictor, bands, bicubic_x4, unit_bands


def constant_predictor(log_v):
    """A predictor whose log v is the constant log_v[k] in band k everywhere."""
    predictor = TexturePredictor(8)
    last = predictor.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(log_v))
    return predictor


@pytest.mark.parametrize("height, width", [(48, 64), (45, 61)])  # odd sizes: half spectra need the size back
def test_bands_are_disjoint_rings_of_the_spectrum(height, width):
    x = torch.randn(1, 1, height, width, generator=torch.Generator().manual_seed(0))
    split = bands(x)  # (1, K, H, W)
    assert split.shape == (1, len(BANDS), height, width)
    radius = torch.fft.fftfreq(height)[:, None].hypot(torch.fft.fftfreq(width))
    spectrum = torch.fft.fft2(x)[0, 0]
    for k, (lo, hi) in enumerate(BANDS):
        inside = (radius >= lo) & (radius < hi)
        band = torch.fft.fft2(split[0, k])
        assert torch.allclose(band[inside], spectrum[inside], atol=1e-3)  # all of the ring
        assert band[~inside].abs().max() < 1e-3  # nothing else
    assert bands(torch.ones(1, 1, 32, 32)).abs().max() < 1e-6  # a flat image has no detail in any band


def test_unit_bands_have_unit_variance_and_follow_the_seed():
    a, b, c = unit_bands(40, 56, 3, "cpu"), unit_bands(40, 56, 3, "cpu"), unit_bands(40, 56, 4, "cpu")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a.pow(2).mean((-2, -1)), torch.ones(1, len(BANDS)))


def test_nll_is_smallest_where_the_variance_is_the_mean_block_energy():
    """log v + e / v over the blocks is minimised by v = mean(e): the predictor learns the expected energy."""
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(2, 3, 8, 8, generator=g)
    hr = (bicubic_x4(lr) + 0.03 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    energy = torch.nn.functional.avg_pool2d(bands(texture.grey(hr - bicubic_x4(lr))) ** 2, 4)  # (2, K, 8, 8)
    best = energy.mean((0, 2, 3)).log()  # per band
    for k in range(len(BANDS)):
        for delta in (-0.5, 0.5):
            off = best.clone()
            off[k] += delta
            assert constant_predictor(best).nll(lr, hr) < constant_predictor(off).nll(lr, hr)


def test_predictor_learns_where_detail_is_missing():
    """Flat LR crops whose HR carries fine grain when they are red and none when they are blue: after a short fit
    the predicted variance is far larger on red, and near the grain's energy in the bands."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    predictor = TexturePredictor(16)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=3e-3)
    red, blue = torch.tensor([0.8, 0.2, 0.2]), torch.tensor([0.2, 0.2, 0.8])
    for _ in range(300):
        colours = torch.stack([red, blue] * 4)[:, :, None, None]  # (8, 3, 1, 1)
        lr = colours.expand(8, 3, 8, 8)
        grain = 0.04 * torch.randn(8, 1, 32, 32, generator=g) * torch.tensor([1.0, 0.0] * 4)[:, None, None, None]
        hr = (bicubic_x4(lr) + grain).clamp(0, 1)
        loss = predictor.nll(lr, hr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        v_red = predictor(bicubic_x4(red[None, :, None, None].expand(1, 3, 8, 8))).exp().sum(1).mean()
        v_blue = predictor(bicubic_x4(blue[None, :, None, None].expand(1, 3, 8, 8))).exp().sum(1).mean()
    in_bands = 0.04 ** 2 * sum(math.pi * (hi ** 2 - lo ** 2) for lo, hi in BANDS)  # white grain's share of the bands
    assert v_red > 20 * v_blue
    assert in_bands / 2 < v_red < 2 * in_bands


def test_fit_loss_adds_smooth_copies_of_the_crops():
    """Stage 1's loss sees each crop and a copy blurred smooth (sigma 2 .. 6 across the batch), each with its
    8-bit bicubic LR: the copies are what keep the predicted variance near 0 on smooth content."""
    from data import gaussian_blur
    from degradations import degrade_bicubic
    torch.manual_seed(0)
    predictor = TexturePredictor(8)
    hr = torch.rand(3, 3, 32, 32)
    copies = torch.stack([gaussian_blur(hr[0], 2.0), gaussian_blur(hr[1], 4.0), gaussian_blur(hr[2], 6.0)])
    both = torch.cat([hr, copies])
    assert torch.allclose(predictor.fit_loss(hr), predictor.nll(degrade_bicubic(both, 4), both))
    assert not torch.allclose(predictor.fit_loss(hr), predictor.nll(degrade_bicubic(hr, 4), hr))


def test_sample_has_the_predicted_variance_and_is_grey_and_repeatable():
    predictor = constant_predictor([math.log(4e-4), math.log(1e-4)])
    lr = torch.rand(2, 3, 16, 24)
    drawn = predictor.sample(lr, seed=5)  # (2, 1, 64, 96)
    assert drawn.shape == (2, 1, 64, 96)
    assert torch.equal(drawn[0], drawn[1])  # each image draws from the seed: independent of the batch
    assert abs(drawn.pow(2).mean().item() - 5e-4) < 1e-6  # the bands are orthogonal: variances add
    assert torch.equal(drawn, predictor.sample(lr, seed=5)) and not torch.equal(drawn, predictor.sample(lr, seed=6))
    assert constant_predictor([-30.0, -30.0]).sample(lr).abs().max() < 0.25 / 255  # the floor: under a grey level


def test_super_resolve_adds_the_draw_at_the_temperature():
    torch.manual_seed(0)
    model = FlowSR.tiny().eval()
    model.texture = constant_predictor([math.log(1e-4), math.log(1e-4)])
    lr = 0.25 + 0.5 * torch.rand(1, 3, 16, 16)
    plain = super_resolve(model, lr, texture=0)
    for t in (0.5, 1.0):
        added = super_resolve(model, lr, texture=t) - plain  # (1, 3, 64, 64): the same grey draw in R, G and B
        assert torch.allclose(added, t * model.texture.sample(lr).expand(1, 3, 64, 64), atol=1e-6)
    seeded = super_resolve(model, lr, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(seeded - plain, texture.DEFAULT_TEMPERATURE * model.texture.sample(lr, seed=3), atol=1e-6)
    model.texture = None
    assert torch.equal(super_resolve(model, lr), plain)  # a model without a predictor ignores the temperature


def test_checkpoint_round_trip_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    from plumbing.weights import WeightsError, read_metadata
    torch.manual_seed(0)
    model = FlowSR.tiny(texture=16)
    path = str(tmp_path / "tiny.safetensors")
    model.save(path)
    loaded = FlowSR.load(path)
    assert loaded.config_dict()["texture"] == 16
    saved, read = model.texture.state_dict(), loaded.texture.state_dict()
    assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
    assert FlowSR.load(path, dtype=torch.bfloat16).texture.net[0].weight.dtype == torch.bfloat16
    tensors, meta = load_file(path), read_metadata(path)
    cases = {"no-width": ({**tensors}, meta["flowsr_model"].replace('"texture": 16', '"texture": 0'),
                          r"texture\.\* tensors but no texture in the metadata"),
             "missing": ({k: v for k, v in tensors.items() if k != "texture.net.0.bias"}, meta["flowsr_model"],
                         r"1 missing: net\.0\.bias"),
             "bad-width": (tensors, meta["flowsr_model"].replace('"texture": 16', '"texture": -1'),
                           r"texture in metadata must be an integer >= 0")}
    for name, (bad_tensors, config, message) in cases.items():
        bad = str(tmp_path / f"{name}.safetensors")
        save_file(bad_tensors, bad, metadata={"flowsr_model": config})
        with pytest.raises(WeightsError, match=message):
            FlowSR.load(bad)
    FlowSR.tiny(texture=0).save(str(tmp_path / "plain.safetensors"))
    assert FlowSR.load(str(tmp_path / "plain.safetensors")).texture is None


def test_probe_oracle_has_the_photos_local_amount_and_the_gate_shuts_on_smooth_input():
    """bench/texture_probe.py: the oracle's draw has, region by region, the RMS of the HR photo's own missing
    detail in the bands; the detail gate is 0 on a smooth input and opens on texture."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import texture_probe
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, 64, 128), 0.5)
    grain = bands(torch.randn(1, 1, 64, 128, generator=g)).sum(1, keepdim=True)  # (1, 1, H, W), in the bands
    grain = 0.02 * grain / grain.std()
    grain[..., 64:] *= 0.25  # the right half has a quarter of the detail
    hr = x + grain
    drawn = texture_probe.oracle_texture(x, hr, seed=1)
    left, right = drawn[..., 12:52, 12:52].std(), drawn[..., 12:52, 76:116].std()
    assert 0.8 * 0.02 < left < 1.2 * 0.02 and 0.8 * 0.005 < right < 1.2 * 0.005
    assert texture_probe.detail_gate(x, 3).max() == 0
    assert texture_probe.detail_gate(hr, 3)[..., :64].min() > 0.5
