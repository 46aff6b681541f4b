"""Time grids of FlowSR (SPEC sections 2 and 4).

Flow time t runs from 1 (the LR latent z_L) to 0 (the HR latent z_H). Three grids are used:

- training times of stage 1 (`sample_times`): the slow uniform grid without t = 0;
- adjacent pairs (t_n > t_{n-1}) of stage 2, from the fast or the slow uniform grid
  ("fast-slow timestep scheduling", `sample_adjacent_pairs`);
- the sampling grid (`flow_match_sigmas`): the flow-matching grid with shift 3, identical to
  diffusers' FlowMatchEulerDiscreteScheduler(shift=3.0), which the published checkpoint used (so
  `sample.py --steps N` runs on it, not on the fast grid the student was distilled on). The
  time shift is SD3's: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
  Image Synthesis" (ICML).

All functions return float32 CPU tensors; move them with `.to(device)`.
"""
import torch


def uniform_grid(n):
    """The n-step uniform grid on [0, 1], descending: [1, 1 - 1/n, ..., 1/n, 0], shape (n+1,)."""
    if n < 1:
        raise ValueError(f"uniform_grid: need at least one step, got n={n}")
    return (n - torch.arange(n + 1, dtype=torch.float64)).div(n).float()


def sample_times(batch, n=1000, generator=None):
    """Stage-1 training times, uniform over the slow grid {1/n, 2/n, ..., 1}, shape (batch,).

    t = 0 is left out (there the endpoint f(z_0, 0) = z_0 is the identity: nothing to learn);
    t = 1 is kept, because one-step SR evaluates the network exactly at t = 1.
    """
    if n < 1:
        raise ValueError(f"sample_times: need at least one step, got n={n}")
    k = torch.randint(1, n + 1, (batch,), generator=generator)
    return k.double().div(n).float()


def sample_adjacent_pairs(batch, n_fast=4, n_slow=1000, p_fast=0.5, generator=None):
    """Fast-slow timestep scheduling (SPEC 4): adjacent pairs t_n > t_prev for stage 2.

    Each example independently takes the fast grid (n_fast steps) with probability p_fast, else
    the slow grid (n_slow steps), then a uniformly random adjacent pair of that grid.
    p_fast = 0 is slow-only, p_fast = 1 is fast-only.
    Returns t_n (batch,), t_prev (batch,), is_fast (batch,) bool.
    """
    if not 0.0 <= p_fast <= 1.0:
        raise ValueError(f"sample_adjacent_pairs: p_fast must be in [0, 1], got {p_fast}")
    fast, slow = uniform_grid(n_fast), uniform_grid(n_slow)
    is_fast = torch.rand(batch, generator=generator) < p_fast  # rand is in [0, 1): p 0 and 1 are exact
    k_fast = torch.randint(0, n_fast, (batch,), generator=generator)
    k_slow = torch.randint(0, n_slow, (batch,), generator=generator)
    t_n = torch.where(is_fast, fast[k_fast], slow[k_slow])
    t_prev = torch.where(is_fast, fast[k_fast + 1], slow[k_slow + 1])
    return t_n, t_prev, is_fast


def shift_sigma(sigma, shift):
    """The flow-matching time shift g(s) = shift * s / (1 + (shift - 1) * s) of SD3 (Esser et al. 2024);
    g(0) = 0, g(1) = 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_match_sigmas(steps, shift=3.0, num_train_timesteps=1000):
    """Sampling grid of FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps), shape (steps+1,).

    sigmas = g(linspace(1, g(1/T), steps)) followed by 0 (the minimum is shifted twice, as in
    diffusers); the network is called at timestep T * sigma. steps=4 gives the timesteps
    [1000, 857.69, 602.15, 8.93].
    """
    if steps < 1:
        raise ValueError(f"flow_match_sigmas: need at least one step, got steps={steps}")
    if not 0 < shift < float("inf"):
        raise ValueError(f"flow_match_sigmas: the shift must be a positive number, got {shift}")
    sigma_min = shift_sigma(1.0 / num_train_timesteps, shift)
    sigmas = shift_sigma(torch.linspace(1.0, sigma_min, steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
