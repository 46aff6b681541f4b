import pytest
import torch
import torch.nn.functional as F

import flow
import schedulers
from conftest import TinyVelocityNet
from vae import PixelAutoencoder


def dyadic_batch(batch=3, size=16):
    """HR image and latents on a 1/256 grid: every flow identity below then holds bit for bit."""
    ae = PixelAutoencoder()
    x_hr = torch.randint(-256, 256, (batch, 3, size, size)) / 256
    x_lr_up = torch.randint(-256, 256, (batch, 3, size, size)) / 256
    return ae, x_hr, ae.encode(x_hr), ae.encode(x_lr_up)  # latents (B, 48, size/4, size/4)


def oracle(z_H, z_L):
    return lambda z, timesteps, context: z_L - z_H


def test_interpolate_and_endpoint():
    _, _, z_H, z_L = dyadic_batch()
    t = torch.tensor([0.0, 0.25, 1.0])
    z_t = flow.interpolate(z_H, z_L, t)
    assert torch.equal(z_t[0], z_H[0]) and torch.equal(z_t[2], z_L[2])
    assert torch.equal(z_t[1], 0.75 * z_H[1] + 0.25 * z_L[1])
    seen = {}

    def net(z, timesteps, context):
        seen["timesteps"], seen["context"] = timesteps, context
        return z_L - z_H

    context = torch.randn(3, 5, 7)
    assert torch.equal(flow.endpoint(net, z_t, t, context), z_H)
    assert torch.equal(seen["timesteps"], torch.tensor([0.0, 250.0, 1000.0])) and seen["context"] is context


def test_oracle_sampling_recovers_hr():
    _, _, z_H, z_L = dyadic_batch()
    context = torch.randn(3, 5, 7)
    assert torch.equal(flow.sample(oracle(z_H, z_L), z_L, context, [1.0, 0.0]), z_H)
    assert torch.equal(flow.sample(oracle(z_H, z_L), z_L, context, schedulers.uniform_grid(4)), z_H)
    for steps in (2, 4, 25):
        z = flow.RectifiedSRFlow.sample(oracle(z_H, z_L), z_L, context, schedulers.flow_match_sigmas(steps))
        torch.testing.assert_close(z, z_H, atol=1e-5, rtol=0)


def test_one_step_sample_is_z_L_minus_velocity_at_1000():
    _, _, _, z_L = dyadic_batch()
    net = TinyVelocityNet()
    expected = z_L - net(z_L, torch.full((3,), 1000.0), None)
    torch.testing.assert_close(flow.sample(net, z_L, None, [1.0, 0.0]), expected, atol=1e-6, rtol=0)


def test_multi_step_sample_is_euler_with_a_network_that_reads_z():
    """Each step evaluates the network at the current z and time (a constant velocity could not tell)."""
    _, _, _, z_L = dyadic_batch()
    net = TinyVelocityNet()
    sigmas = schedulers.flow_match_sigmas(3)
    z = z_L
    for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        z = z + (b - a) * net(z, torch.full((3,), 1000 * a), None)
    torch.testing.assert_close(flow.sample(net, z_L, None, sigmas), z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigmas", [[0.5, 0.0], [1.0, 0.5], [1.0, -1331.0, 0.3, 0.0], [1.0, 0.5, 0.5, 0.0], [1.0]])
def test_sample_refuses_a_grid_that_does_not_fall_from_one_to_zero(sigmas):
    _, _, _, z_L = dyadic_batch()
    with pytest.raises(ValueError, match="sigmas must fall from 1 to 0"):
        flow.sample(TinyVelocityNet(), z_L, None, sigmas)


def test_losses_decode_the_endpoint_divided_by_the_latent_scale():
    ae, x_hr, _, _ = dyadic_batch()
    ae.scaling_factor = 0.5  # a latent scale as SD has one (the pixel autoencoder's is 1): a missing 1/s shows
    z_H, z_L = ae.scaling_factor * ae.encode(x_hr), ae.scaling_factor * ae.encode(-x_hr)
    net, t = TinyVelocityNet(), torch.tensor([1.0, 0.5, 0.25])
    _, per_sample, _ = flow.RectifiedSRFlow(ae).loss(net, x_hr, z_H, z_L, t, None)
    with torch.no_grad():
        f = flow.endpoint(net, flow.interpolate(z_H, z_L, t), t, None)
        expected = flow.mse_per_sample(ae.decode(f / 0.5), x_hr)
    torch.testing.assert_close(per_sample, expected)


def test_oracle_loss_is_zero_and_wrong_velocity_is_not():
    ae, x_hr, z_H, z_L = dyadic_batch()
    objective = flow.RectifiedSRFlow(ae, latent_weight=1.0)
    loss, per_sample, stats = objective.loss(oracle(z_H, z_L), x_hr, z_H, z_L,
                                             torch.tensor([1.0, 0.5, 0.25]), None)
    assert loss.item() == 0.0 and torch.equal(per_sample, torch.zeros(3))
    assert stats == {"pixel_mse": 0.0, "latent_mse": 0.0, "loss": 0.0}
    slow_t = schedulers.sample_times(3)
    loss, _, _ = objective.loss(oracle(z_H, z_L), x_hr, z_H, z_L, slow_t, None)
    assert loss.item() < 1e-12
    wrong = lambda z, timesteps, context: z_L - z_H + 0.1
    loss, per_sample, stats = objective.loss(wrong, x_hr, z_H, z_L, torch.tensor([1.0, 0.5, 0.25]), None)
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 0.25, 0.0625]) * 0.01 + 0.01)
    assert stats["latent_mse"] == pytest.approx(0.01)


def test_loss_terms_are_weighted_and_per_sample_is_detached():
    ae, x_hr, z_H, z_L = dyadic_batch()
    net = TinyVelocityNet()
    t = torch.tensor([1.0, 0.5, 0.001])
    l1 = lambda x, y: (x - y).abs().flatten(1).mean(1)
    base, base_per_sample, _ = flow.RectifiedSRFlow(ae).loss(net, x_hr, z_H, z_L, t, None)
    full, per_sample, stats = flow.RectifiedSRFlow(ae, lpips=l1, lpips_weight=2.0, latent_weight=3.0).loss(
        net, x_hr, z_H, z_L, t, None)
    with torch.no_grad():
        z_t = flow.interpolate(z_H, z_L, t)
        v = net(z_t, 1000 * t, None)
        x_pred = ae.decode(z_t - t.view(-1, 1, 1, 1) * v)
        expected = base_per_sample + 2.0 * l1(x_pred, x_hr) + 3.0 * flow.mse_per_sample(v, z_L - z_H)
    torch.testing.assert_close(per_sample, expected)
    assert full.item() == pytest.approx(expected.mean().item(), rel=1e-6)
    assert set(stats) == {"pixel_mse", "lpips", "latent_mse", "loss"}
    assert full.requires_grad and not per_sample.requires_grad


def test_tiny_net_learns_on_a_fixed_batch():
    ae = PixelAutoencoder()
    x_hr = torch.rand(4, 3, 16, 16) * 2 - 1
    x_lr_up = F.interpolate(F.avg_pool2d(x_hr, 4), scale_factor=4, mode="bicubic")
    z_H, z_L = ae.encode(x_hr), ae.encode(x_lr_up)
    t = schedulers.sample_times(4)
    net = TinyVelocityNet()
    objective = flow.RectifiedSRFlow(ae, latent_weight=0.1)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    first, _, _ = objective.loss(net, x_hr, z_H, z_L, t, None)
    for _ in range(40):
        loss, _, _ = objective.loss(net, x_hr, z_H, z_L, t, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first.item()
