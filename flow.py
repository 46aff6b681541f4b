"""Rectified SR flow: stage 1 of FlowSR (SPEC section 2).

Rectified flow: Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data
with Rectified Flow" (ICLR). FlowSR: Xu et al. 2025, "Fast Image Super-Resolution via Consistency
Rectified Flow" (ICCV), which runs the flow between the HR and the LR latent instead of noise and data.

A straight path joins the HR latent (t = 0) to the LR latent (t = 1):

    z_t = (1 - t) z_H + t z_L,        dz_t/dt = z_L - z_H

The network v(z_t, t, c) learns this constant velocity. The HR latent it implies is the endpoint

    f(z_t, t) = z_t - t v(z_t, t, c)

Stage 1 decodes the endpoint and compares it with the HR image in pixel space (l2 + LPIPS,
optionally + the latent velocity MSE). Sampling integrates the flow from t = 1 to t = 0 with
Euler steps; with one step it is one-step SR, z_H_hat = z_L - v(z_L, 1).

The network is called with timesteps 1000 * t (the UNet's 0..1000 scale); the context c (text
embeddings) is passed through untouched.
"""
import torch


def expand_time(t, like):
    """(B,) -> (B, 1, 1, ...) so that t broadcasts over a tensor shaped like `like`."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(z_H, z_L, t):
    """The point z_t = (1 - t) z_H + t z_L on the straight path; t is (B,)."""
    t = expand_time(t, z_H)
    return (1 - t) * z_H + t * z_L


def endpoint(net, z_t, t, context):
    """The predicted HR latent f(z_t, t) = z_t - t v(z_t, 1000 t, c); f(z, 0) = z by construction."""
    v = net(z_t, 1000 * t, context)
    return z_t - expand_time(t, z_t) * v


def mse_per_sample(a, b):
    """Mean squared error of each example, shape (B,)."""
    return (a - b).pow(2).flatten(1).mean(1)


@torch.no_grad()
def sample(net, z_L, context, sigmas):
    """Euler integration of dz/dt = v from t = 1 (z_L) down to t = 0 (SPEC 2):

        z <- z + (sigma_{i+1} - sigma_i) v(z, 1000 sigma_i, c)

    sigmas: descending times from 1 to 0, e.g. schedulers.flow_match_sigmas(steps).
    sigmas = [1, 0] is one-step SR, z_L - v(z_L, 1); the distilled stage-2 model samples so.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).tolist()
    if len(sigmas) < 2 or sigmas[0] != 1 or sigmas[-1] != 0 or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sample: sigmas must fall from 1 to 0, got {sigmas}")
    z = z_L
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((z.shape[0],), sigma, device=z.device)
        z = z + (sigma_next - sigma) * net(z, 1000 * t, context)
    return z


class RectifiedSRFlow:
    """Stage-1 objective and the Euler sampler of the rectified SR flow.

    ae: autoencoder with decode(z) and scaling_factor (latents are scaling_factor * E(x)).
    lpips: None (term off) or a callable lpips(x, y) -> (B,) on [-1, 1] images.
    """

    def __init__(self, ae, lpips=None, lpips_weight=1.0, latent_weight=0.0):
        self.ae = ae
        self.lpips = lpips
        self.lpips_weight = lpips_weight
        self.latent_weight = latent_weight

    def loss(self, net, x_hr, z_H, z_L, t, context):
        """L1 = ||D(f/s) - x_HR||^2 + lpips_weight LPIPS(D(f/s), x_HR) + latent_weight ||v - (z_L - z_H)||^2, each
        ||.||^2 a mean over elements (per example).

        Returns (loss scalar, per-example loss (B,) detached, stats dict of floats).
        """
        z_t = interpolate(z_H, z_L, t)
        v = net(z_t, 1000 * t, context)
        f = z_t - expand_time(t, z_t) * v  # the endpoint, as in `endpoint`; v is kept for the latent term
        x_pred = self.ae.decode(f / self.ae.scaling_factor)  # (B, 3, H, W)
        pixel_mse = mse_per_sample(x_pred, x_hr)
        per_sample = pixel_mse
        stats = {"pixel_mse": pixel_mse.mean().item()}
        if self.lpips is not None and self.lpips_weight > 0:
            perceptual = self.lpips(x_pred, x_hr)
            per_sample = per_sample + self.lpips_weight * perceptual
            stats["lpips"] = perceptual.mean().item()
        if self.latent_weight > 0:
            latent_mse = mse_per_sample(v, z_L - z_H)
            per_sample = per_sample + self.latent_weight * latent_mse
            stats["latent_mse"] = latent_mse.mean().item()
        loss = per_sample.mean()
        stats["loss"] = loss.item()
        return loss, per_sample.detach(), stats

    sample = staticmethod(sample)  # the module's Euler sampler, so flow.sample is RectifiedSRFlow.sample
