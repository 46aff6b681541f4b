"""Consistency SR flow distillation with HR regularization: stage 2 of FlowSR (SPEC sections 3, 5).

Consistency models: Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (ICML). The pseudo-Huber
distance: Song & Dhariwal 2024, "Improved Techniques for Training Consistency Models" (ICLR). FlowSR:
Xu et al. 2025, "Fast Image Super-Resolution via Consistency Rectified Flow" (ICCV).

The student f_theta(z_t, t) = z_t - t v_theta(z_t, t) starts from the stage-1 weights; the
teacher v_phi is the frozen stage-1 model; the target theta- is an EMA of the student. For an
adjacent pair t_n > t_{n-1} (schedulers.sample_adjacent_pairs):

    z_tn  = (1 - t_n) z_H + t_n z_L                         (on the true path)
    z_hat = z_tn - (t_n - t_{n-1}) v_phi(z_tn, t_n)          (one teacher Euler step)
    L_CD  = d( f_theta(z_tn, t_n), sg[f_theta-(z_hat, t_{n-1})] )
    L_HR  = ||D(f_theta(z_tn, t_n)/s) - x_HR||^2 + lambda_lpips LPIPS(., x_HR)
    L     = L_CD + lambda_HR L_HR        (train.py adds the GAN and CLIP-IQA terms on x_pred)

where t_{n-1} = 0, the boundary condition f(z, 0) = z makes the target z_hat itself; with
ground_truth_at_zero the target there is the ground-truth z_H instead (our reading of the paper).
d is pseudo-Huber or l2. The distilled model samples in one step with flow.sample and
sigmas [1, 0]: z_H_hat = z_L - v_theta(z_L, 1).

The teacher and the target may run on their own LR latent z_L' (z_L_teacher): then z_hat starts from
(1 - t_n) z_H + t_n z_L', a point of the path the teacher was trained on, while the student keeps its own
z_tn (train.py --stage2-encoder train-teacher-stage1).
"""
import torch

from flow import endpoint, expand_time, interpolate, mse_per_sample


@torch.no_grad()
def update_ema(target, online, decay):
    """target <- decay * target + (1 - decay) * online, parameter by parameter; buffers are copied.

    target and online: two modules of one architecture, or two lora.AdapterViews of one model (a LoRA student's
    EMA is an EMA of its adapter: the base weights are the same for both). decay = 0 copies the online
    weights: the target is then a stop-gradient of the current student.
    """
    for p_target, p_online in zip(target.parameters(), online.parameters(), strict=True):
        p_target.mul_(decay).add_(p_online, alpha=1 - decay)
    for b_target, b_online in zip(target.buffers(), online.buffers(), strict=True):
        b_target.copy_(b_online)


def pseudo_huber(a, b, c=0.001):
    """Pseudo-Huber distance sqrt((a - b)^2 + c^2) - c per element, averaged over the elements of each
    example: (B,). SPEC 3's element-wise form; Song & Dhariwal 2024 apply it to the whole example's l2 norm
    ||a - b|| with c = 0.00054 sqrt(d), d the number of elements.

    Computed as the equal x^2 / (sqrt(x^2 + c^2) + c), which has no cancellation when |x| << c
    (the regime near convergence) and is exactly 0 at a = b.
    """
    squared = (a - b).pow(2)
    return (squared / ((squared + c * c).sqrt() + c)).flatten(1).mean(1)


class ConsistencyFlowDistillation:
    """The stage-2 objective L_CD + hr_reg_weight * L_HR.

    ae: autoencoder with decode(z) and scaling_factor.  lpips: None (term off) or lpips(x, y) -> (B,).
    distance: "huber" (pseudo-Huber with constant huber_c) or "l2", the latent distance d of L_CD.
    perturb_std: std of the Gaussian noise added to z_tn ("mild perturbation", default off).
    """

    def __init__(self, ae, lpips=None, hr_reg_weight=1.0, lpips_weight=1.0, distance="huber",
                 huber_c=1e-3, ground_truth_at_zero=True, perturb_std=0.0):
        if distance not in ("huber", "l2"):
            raise ValueError(f"ConsistencyFlowDistillation: distance must be 'huber' or 'l2', got {distance!r}")
        self.ae = ae
        self.lpips = lpips
        self.hr_reg_weight = hr_reg_weight
        self.lpips_weight = lpips_weight
        self.distance = distance
        self.huber_c = huber_c
        self.ground_truth_at_zero = ground_truth_at_zero
        self.perturb_std = perturb_std

    def latent_distance(self, a, b):
        """d(a, b) per example, (B,)."""
        if self.distance == "huber":
            return pseudo_huber(a, b, self.huber_c)
        return mse_per_sample(a, b)

    def loss(self, student, teacher, target, x_hr, z_H, z_L, t_n, t_prev, context, generator=None, z_L_teacher=None):
        """Returns (loss scalar, per-example loss (B,) detached, stats dict of floats, x_pred).

        student, teacher, target: velocity networks net(z, 1000 t, context). z_L_teacher: the LR latent of the
        teacher's path (default z_L). x_pred = D(f_theta(z_tn, t_n) / s), (B, 3, H, W), carries the student's
        gradient so that train.py can add its GAN and image-quality losses. Only the student receives gradients.
        """
        noise = 0.0
        if self.perturb_std > 0:  # drawn on the CPU: the same noise on any device
            noise = self.perturb_std * torch.randn(z_H.shape, generator=generator).to(z_H)
        z_tn = interpolate(z_H, z_L, t_n) + noise
        with torch.no_grad():
            z_tn_teacher = z_tn if z_L_teacher is None else interpolate(z_H, z_L_teacher, t_n) + noise
            z_hat = z_tn_teacher - expand_time(t_n - t_prev, z_tn) * teacher(z_tn_teacher, 1000 * t_n, context)
            target_f = endpoint(target, z_hat, t_prev, context)  # equals z_hat where t_prev = 0
            if self.ground_truth_at_zero:
                target_f = torch.where(expand_time(t_prev == 0, z_H), z_H, target_f)
        f = endpoint(student, z_tn, t_n, context)  # (B, C, h, w)
        consistency = self.latent_distance(f, target_f)
        x_pred = self.ae.decode(f / self.ae.scaling_factor)  # (B, 3, H, W)
        per_sample = consistency
        stats = {"consistency": consistency.mean().item()}
        if self.hr_reg_weight > 0:
            hr_mse = mse_per_sample(x_pred, x_hr)
            hr = hr_mse
            stats["hr_mse"] = hr_mse.mean().item()
            if self.lpips is not None and self.lpips_weight > 0:
                hr_lpips = self.lpips(x_pred, x_hr)
                hr = hr + self.lpips_weight * hr_lpips
                stats["hr_lpips"] = hr_lpips.mean().item()
            per_sample = per_sample + self.hr_reg_weight * hr
        loss = per_sample.mean()
        stats["loss"] = loss.item()
        return loss, per_sample.detach(), stats, x_pred
