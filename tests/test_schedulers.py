import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import schedulers


def test_uniform_grid_values():
    assert torch.equal(schedulers.uniform_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    slow = schedulers.uniform_grid(1000)
    assert slow.shape == (1001,) and slow[0] == 1 and slow[-1] == 0
    assert torch.allclose(slow[:-1] - slow[1:], torch.full((1000,), 1e-3), atol=1e-6)
    with pytest.raises(ValueError, match="uniform_grid"):
        schedulers.uniform_grid(0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
def test_flow_match_sigmas_match_diffusers(steps):
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    reference.set_timesteps(steps)
    sigmas = schedulers.flow_match_sigmas(steps, shift=3.0)
    assert sigmas.shape == (steps + 1,)
    torch.testing.assert_close(sigmas, reference.sigmas, atol=1e-4, rtol=0)
    torch.testing.assert_close(1000 * sigmas[:-1], reference.timesteps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shift", [0.0, -0.5, float("nan"), float("inf")])
def test_flow_match_sigmas_refuse_a_shift_that_is_not_positive(shift):
    with pytest.raises(ValueError, match="the shift must be a positive number"):
        schedulers.flow_match_sigmas(4, shift)


def test_flow_match_sigmas_spec_values():
    timesteps = 1000 * schedulers.flow_match_sigmas(4)[:-1]
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 857.69, 602.15, 8.93]), atol=0.01, rtol=0)
    torch.testing.assert_close(1000 * schedulers.flow_match_sigmas(2), torch.tensor([1000.0, 8.93, 0.0]),
                               atol=0.01, rtol=0)


def test_sample_times_on_slow_grid_without_zero():
    t = schedulers.sample_times(4000, n=4)
    assert t.shape == (4000,) and t.dtype == torch.float32
    assert set(t.tolist()) == {0.25, 0.5, 0.75, 1.0}  # t = 1 (one-step SR) included, t = 0 never drawn
    t = schedulers.sample_times(4000)
    assert (t > 0).all() and (t <= 1).all()
    assert torch.allclose(t * 1000, (t * 1000).round(), atol=1e-3)


@pytest.mark.parametrize("p_fast", [0.0, 0.3, 0.5, 1.0])
def test_adjacent_pairs_grids_and_share(p_fast):
    draws = 20000
    t_n, t_prev, is_fast = schedulers.sample_adjacent_pairs(draws, n_fast=4, n_slow=1000, p_fast=p_fast)
    assert t_n.shape == t_prev.shape == is_fast.shape == (draws,) and is_fast.dtype == torch.bool
    step = torch.where(is_fast, torch.tensor(0.25), torch.tensor(1e-3))
    assert torch.allclose(t_n - t_prev, step, atol=1e-6)
    assert (t_n <= 1).all() and (t_prev >= 0).all()
    fast_grid = schedulers.uniform_grid(4)
    assert torch.isin(t_n[is_fast], fast_grid).all() and torch.isin(t_prev[is_fast], fast_grid).all()
    slow_grid = schedulers.uniform_grid(1000)
    assert torch.isin(t_n[~is_fast], slow_grid).all() and torch.isin(t_prev[~is_fast], slow_grid).all()
    share = is_fast.float().mean().item()
    if p_fast in (0.0, 1.0):
        assert share == p_fast
    else:
        assert abs(share - p_fast) < 5 * math.sqrt(p_fast * (1 - p_fast) / draws)


def test_adjacent_pairs_uniform_over_fast_pairs():
    draws = 20000
    t_n, _, _ = schedulers.sample_adjacent_pairs(draws, n_fast=4, p_fast=1.0)
    counts = torch.stack([(t_n == v).sum() for v in (1.0, 0.75, 0.5, 0.25)]).float() / draws
    assert (counts - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / draws)
    with pytest.raises(ValueError, match="p_fast"):
        schedulers.sample_adjacent_pairs(4, p_fast=1.5)


def test_generator_reproducibility():
    first = schedulers.sample_adjacent_pairs(64, generator=torch.Generator().manual_seed(7))
    second = schedulers.sample_adjacent_pairs(64, generator=torch.Generator().manual_seed(7))
    other = schedulers.sample_adjacent_pairs(64, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])
    a = schedulers.sample_times(64, generator=torch.Generator().manual_seed(7))
    b = schedulers.sample_times(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
