import copy

import pytest
import torch
from torch import nn

import consistency
import flow
import schedulers
from conftest import TinyVelocityNet
from vae import PixelAutoencoder


def dyadic_batch(batch=4, size=16):
    """HR image and latents on a 1/256 grid: on the fast grid every identity holds bit for bit."""
    ae = PixelAutoencoder()
    x_hr = torch.randint(-256, 256, (batch, 3, size, size)) / 256
    x_lr_up = torch.randint(-256, 256, (batch, 3, size, size)) / 256
    return ae, x_hr, ae.encode(x_hr), ae.encode(x_lr_up)  # latents (B, 48, size/4, size/4)


def velocity(z_H, z_L, offset=0.0):
    """The straight flow's velocity z_L - z_H, plus a constant error when offset != 0."""
    return lambda z, timesteps, context: z_L - z_H + offset


FAST_PAIRS = (torch.tensor([1.0, 0.75, 0.5, 0.25]), torch.tensor([0.75, 0.5, 0.25, 0.0]))


def test_pseudo_huber_by_hand():
    a = torch.tensor([[0.0, 3.0], [1.0, -1.0]])
    b = torch.tensor([[0.0, -1.0], [1.0, 1.0]])
    c = 0.5
    expected = torch.tensor([((0.25 ** 0.5 - c) + ((16 + 0.25) ** 0.5 - c)) / 2, (0.0 + (4.25 ** 0.5 - c)) / 2])
    torch.testing.assert_close(consistency.pseudo_huber(a, b, c), expected)
    x = torch.tensor([[1e-5, 0.2]])
    naive = (x.double() ** 2 + 1e-6).sqrt() - 1e-3
    torch.testing.assert_close(consistency.pseudo_huber(x, torch.zeros_like(x)), naive.mean(1).float(), rtol=1e-5, atol=0)
    assert consistency.pseudo_huber(a, a).eq(0).all()


def test_update_ema():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = copy.deepcopy(target)
    consistency.update_ema(target, online, 0.9)
    for p_t, p_before, p_o in zip(target.parameters(), before.parameters(), online.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p_before + 0.1 * p_o)
    consistency.update_ema(target, online, 0.0)
    assert all(torch.equal(p_t, p_o) for p_t, p_o in zip(target.parameters(), online.parameters()))
    online_bn, target_bn = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    online_bn(torch.randn(8, 3))
    consistency.update_ema(target_bn, online_bn, 0.99)
    assert torch.equal(target_bn.running_mean, online_bn.running_mean)
    with pytest.raises(ValueError):
        consistency.update_ema(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 0.5)


@pytest.mark.parametrize("distance", ["huber", "l2"])
def test_straight_flow_has_zero_loss(distance):
    ae, x_hr, z_H, z_L = dyadic_batch()
    exact = velocity(z_H, z_L)
    objective = consistency.ConsistencyFlowDistillation(ae, distance=distance, ground_truth_at_zero=False)
    loss, per_sample, stats, x_pred = objective.loss(exact, exact, exact, x_hr, z_H, z_L, *FAST_PAIRS, None)
    assert loss.item() == 0.0 and torch.equal(per_sample, torch.zeros(4))
    assert stats["consistency"] == 0.0 and stats["hr_mse"] == 0.0
    assert torch.equal(x_pred, x_hr)
    t_n, t_prev, _ = schedulers.sample_adjacent_pairs(4, p_fast=0.0)
    t_n[0], t_prev[0] = 0.001, 0.0  # the slow grid's boundary pair
    loss, _, stats, _ = objective.loss(exact, exact, exact, x_hr, z_H, z_L, t_n, t_prev, None)
    assert loss.item() < 1e-10 and stats["consistency"] < 1e-10


def test_wrong_student_gives_positive_consistency_loss():
    ae, x_hr, z_H, z_L = dyadic_batch()
    exact, wrong = velocity(z_H, z_L), velocity(z_H, z_L, offset=0.5)
    objective = consistency.ConsistencyFlowDistillation(ae, distance="l2", hr_reg_weight=0.0)
    loss, per_sample, stats, _ = objective.loss(wrong, exact, exact, x_hr, z_H, z_L, *FAST_PAIRS, None)
    # f = z_H - 0.5 t_n while the target is z_H: l2 = (0.5 t_n)^2
    torch.testing.assert_close(per_sample, (0.5 * FAST_PAIRS[0]) ** 2)
    assert stats["consistency"] > 0 and set(stats) == {"consistency", "loss"}


def test_ground_truth_target_at_zero_with_wrong_teacher():
    ae, x_hr, z_H, z_L = dyadic_batch()
    exact, wrong = velocity(z_H, z_L), velocity(z_H, z_L, offset=0.5)
    t_n, t_prev = torch.tensor([0.25, 0.001, 0.5, 0.25]), torch.tensor([0.0, 0.0, 0.25, 0.0])
    kwargs = dict(distance="l2", hr_reg_weight=0.0)
    with_gt = consistency.ConsistencyFlowDistillation(ae, ground_truth_at_zero=True, **kwargs)
    _, per_sample, _, _ = with_gt.loss(exact, wrong, wrong, x_hr, z_H, z_L, t_n, t_prev, None)
    assert per_sample[[0, 3]].eq(0).all() and per_sample[1] < 1e-12  # target is z_H, the teacher's error is gone
    assert per_sample[2] > 0
    without_gt = consistency.ConsistencyFlowDistillation(ae, ground_truth_at_zero=False, **kwargs)
    _, per_sample, _, _ = without_gt.loss(exact, wrong, wrong, x_hr, z_H, z_L, t_n, t_prev, None)
    # teacher step and target endpoint each add their error: target = z_H - 0.5 t_n, the student is exact
    torch.testing.assert_close(per_sample, (0.5 * t_n) ** 2)


def test_teacher_runs_at_1000_t_n_and_target_at_1000_t_prev():
    """A teacher whose error grows with the time it is given: v = z_L - z_H + 0.5 tau / 1000. Its Euler step from
    z_tn at tau = 1000 t_n lands at the path's point at t_prev less 0.5 (t_n - t_prev) t_n; with an exact target
    and student, L_CD (l2) = (0.5 (t_n - t_prev) t_n)^2. A teacher called at 1000 t_prev, or at t_n on the 0..1
    scale, gives another loss; the spies pin every network's timesteps as well."""
    ae, x_hr, z_H, z_L = dyadic_batch()
    t_n, t_prev = FAST_PAIRS
    timesteps = {}

    def spy(name, error):
        def net(z, tau, context):
            timesteps[name] = tau.clone()
            return z_L - z_H + error * flow.expand_time(tau / 1000, z)
        return net
    objective = consistency.ConsistencyFlowDistillation(ae, distance="l2", hr_reg_weight=0.0,
                                                        ground_truth_at_zero=False)
    _, per_sample, _, _ = objective.loss(spy("student", 0.0), spy("teacher", 0.5), spy("target", 0.0), x_hr, z_H, z_L,
                                         t_n, t_prev, None)
    torch.testing.assert_close(per_sample, (0.5 * (t_n - t_prev) * t_n) ** 2)
    assert timesteps.keys() == {"student", "teacher", "target"}
    for name, t in (("student", t_n), ("teacher", t_n), ("target", t_prev)):
        assert torch.equal(timesteps[name], 1000 * t), name


def test_teacher_on_its_own_lr_latent():
    """z_L_teacher: the teacher and the target walk the path to z_L', the student stays on its own."""
    ae, x_hr, z_H, z_L = dyadic_batch()
    z_L_teacher = z_L + 0.25
    exact, exact_teacher = velocity(z_H, z_L), velocity(z_H, z_L_teacher)
    objective = consistency.ConsistencyFlowDistillation(ae, distance="l2", hr_reg_weight=0.0,
                                                        ground_truth_at_zero=False)
    args = (x_hr, z_H, z_L, *FAST_PAIRS, None)
    _, per_sample, _, _ = objective.loss(exact, exact_teacher, exact_teacher, *args, z_L_teacher=z_L_teacher)
    assert per_sample.eq(0).all()  # both paths end at z_H
    _, per_sample, _, _ = objective.loss(exact, exact_teacher, exact_teacher, *args)  # the teacher off its path
    assert per_sample.gt(0).all()


def test_hr_regularization_terms_and_weights():
    ae, x_hr, z_H, z_L = dyadic_batch()
    exact, wrong = velocity(z_H, z_L), velocity(z_H, z_L, offset=0.5)
    l1 = lambda x, y: (x - y).abs().flatten(1).mean(1)
    args = (wrong, exact, exact, x_hr, z_H, z_L, *FAST_PAIRS, None)
    _, cd_only, stats_cd, x_pred = consistency.ConsistencyFlowDistillation(ae, lpips=l1, hr_reg_weight=0.0).loss(*args)
    assert set(stats_cd) == {"consistency", "loss"}
    assert torch.equal(x_pred, ae.decode(z_H - 0.5 * FAST_PAIRS[0].view(-1, 1, 1, 1)))  # decoded even when off
    _, full, stats, _ = consistency.ConsistencyFlowDistillation(ae, lpips=l1, hr_reg_weight=2.0,
                                                                lpips_weight=3.0).loss(*args)
    hr = (0.5 * FAST_PAIRS[0]) ** 2 + 3.0 * 0.5 * FAST_PAIRS[0]  # pixel mse + 3 * l1 of a constant error
    torch.testing.assert_close(full, cd_only + 2.0 * hr)
    assert stats["hr_lpips"] == pytest.approx((0.5 * FAST_PAIRS[0]).mean().item())


def test_huber_distance_and_latent_scale_in_values():
    """A student off by a constant: the consistency term is the pseudo-Huber of its error with the given c, and
    x_pred decodes the endpoint divided by the latent scale (0.5 here, 1 in the pixel autoencoder)."""
    ae, x_hr, _, _ = dyadic_batch()
    ae.scaling_factor = 0.5
    z_H, z_L = 0.5 * ae.encode(x_hr), 0.5 * ae.encode(-x_hr)
    exact, wrong = velocity(z_H, z_L), velocity(z_H, z_L, offset=0.5)
    objective = consistency.ConsistencyFlowDistillation(ae, distance="huber", huber_c=0.1, hr_reg_weight=0.0)
    _, per_sample, _, x_pred = objective.loss(wrong, exact, exact, x_hr, z_H, z_L, *FAST_PAIRS, None)
    error = 0.5 * FAST_PAIRS[0]  # f = z_H - t_n * 0.5 against the target z_H (or z_hat, on the path)
    torch.testing.assert_close(per_sample, (error ** 2 + 0.01).sqrt() - 0.1)
    torch.testing.assert_close(x_pred, ae.decode((z_H - error.view(-1, 1, 1, 1)) / 0.5))


def test_gradients_reach_the_student_only():
    ae, x_hr, z_H, z_L = dyadic_batch()
    student, teacher = TinyVelocityNet(hidden=16), TinyVelocityNet(hidden=16)
    target = copy.deepcopy(student)
    t_n, t_prev, _ = schedulers.sample_adjacent_pairs(4)
    objective = consistency.ConsistencyFlowDistillation(ae, perturb_std=0.01)
    loss, per_sample, _, x_pred = objective.loss(student, teacher, target, x_hr, z_H, z_L, t_n, t_prev, None)
    (loss + x_pred.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in list(teacher.parameters()) + list(target.parameters()))
    assert not per_sample.requires_grad


def test_perturbation_follows_the_generator():
    ae, x_hr, z_H, z_L = dyadic_batch()
    exact = velocity(z_H, z_L)
    objective = consistency.ConsistencyFlowDistillation(ae, distance="l2", perturb_std=0.1, hr_reg_weight=0.0)
    run = lambda seed: objective.loss(exact, exact, exact, x_hr, z_H, z_L, *FAST_PAIRS, None,
                                      generator=torch.Generator().manual_seed(seed))[1]
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    # a straight flow stays self-consistent off the path; at t_prev = 0 the noise is pulled back to z_H
    assert run(3)[:3].lt(1e-12).all() and run(3)[3].item() == pytest.approx(0.1 ** 2, abs=3e-3)


def test_one_step_sampling_of_distilled_model_is_flow_sample():
    _, _, z_H, z_L = dyadic_batch()
    assert torch.equal(flow.sample(velocity(z_H, z_L), z_L, None, [1.0, 0.0]), z_H)
    with pytest.raises(ValueError, match="distance"):
        consistency.ConsistencyFlowDistillation(PixelAutoencoder(), distance="l1")
