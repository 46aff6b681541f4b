"""Train FlowSR (Xu et al. 2025, "Fast Image Super-Resolution via Consistency Rectified Flow", ICCV), top to
bottom: stage 1 (rectified SR flow, SPEC 2), then stage 2 (consistency flow distillation with HR
regularization and fast-slow timestep pairs, plus GAN and CLIP-IQA terms, SPEC 3-5).

    python train.py                                    # tiny preset, CPU, both stages, shipped photos
    python train.py --preset sd21 --base SD21_DIR      # LoRA fine-tune of Stable Diffusion 2.1-base
    torchrun --nproc_per_node=2 train.py ...           # data parallel (gloo on CPU, nccl on GPU)

Files in --out-dir: stage1.safetensors (the stage-1 model, stage 2's teacher), stage2.safetensors (the
one-step model), stage{1,2}_state.pt (everything --resume needs), val/ (validation grids), log.jsonl.

Reliability: step n's data and time draws are a pure function of (seed, stage, n, rank) and the state file
holds the rest, so a resumed run repeats the uninterrupted one bit for bit (same device, same threads). Files
are written atomically, the state file last (it commits a checkpoint): a run killed at any moment resumes
from its last checkpoint. SIGINT / SIGTERM save and exit; a non-finite loss skips its step. Under torchrun
only rank 0 writes files, into an --out-dir that every rank sees.
"""
import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import lora
import losses
from consistency import ConsistencyFlowDistillation, update_ema
from data import DEGRADATIONS, ImageError
from flow import RectifiedSRFlow
from flowsr import (FLOWSR_PROMPT, TINY_FLAT_GATE, TINY_PIXEL_HEAD, TINY_TEXTURE, UNET_LORA_TARGETS, FlowSR,
                    vae_encoder_targets)
from plumbing.flags import describe, flag, parse
from plumbing.training import (Interrupted, StepReport, TrainingError, batches, micro_batches, open_dataset, setup,
                                step_generator, synced_step, trainable)
from plumbing.trainstate import Checkpoints, check_paths, check_stage1_flags, claimed_out_dir, stage1_path, trim_history
from plumbing.validation import save_validation_grid, validation_batch
from plumbing.weights import WeightsError
from schedulers import sample_adjacent_pairs, sample_times

PHOTOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos")  # the shipped ones, from any folder
STAGE2_ENCODER = ("train-teacher-stage1", "train", "frozen")
PRESETS = {  # what an unset value in the config (0, "preset", -1: see setup) means for each preset
    "tiny": dict(batch_size=8, crop_size=64, lr=2e-4, stage2_lr=2e-5, stage1_steps=6000, stage2_steps=150,
                 grad_checkpointing=False, degradation="mixed", flat_prob=0.3),
    "sd21": dict(batch_size=4, crop_size=512, lr=5e-5, stage2_lr=2e-5, stage1_steps=20000, stage2_steps=20000,
                 grad_checkpointing=True, degradation="realesrgan", flat_prob=0.0),
}


@dataclass
class TrainConfig:
    """Train FlowSR (both stages by default)."""
    stage: str = flag("both", "which stage(s) to train", choices=("1", "2", "both"))
    preset: str = flag("tiny", "tiny: pixel autoencoder + small UNet (CPU); sd21: LoRA on SD 2.1-base", choices=tuple(PRESETS))
    base: str = flag("", "SD 2.1-base: diffusers folder or original single file (--preset sd21)", path=True)
    data: str = flag(os.path.join(PHOTOS, "train"), "folder of HR training photos")
    val_data: str = flag(os.path.join(PHOTOS, "heldout"), "folder of photos for the validation grids ('': none)")
    out_dir: str = flag("runs/tiny", "where checkpoints, grids and logs go")
    init: str = flag("", "stage-1 checkpoint to start stage 2 from (default: OUT_DIR/stage1.safetensors)")
    resume: bool = flag(False, "continue from OUT_DIR/stage*_state.pt")
    max_steps: int = flag(0, "optimizer steps per stage (0: the preset's default)", low=0)
    batch_size: int = flag(0, "images per optimizer step and rank (0: preset default)", low=0)
    grad_accum: int = flag(1, "micro-batches per optimizer step (batch_size is split between them)", low=1)
    crop_size: int = flag(0, "HR crop size in pixels (0: preset default)", low=0)
    lr: float = flag(0.0, "AdamW learning rate of stage 1 (0: preset default)", low=0)
    stage2_lr: float = flag(0.0, "AdamW learning rate of stage 2, a fine-tune of stage 1 (0: preset default)", low=0)
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = flag(0, "seed of the data, the time draws and the initial weights", low=0, high=2**63 - 1)
    degradation: str = flag("preset", "how LR inputs are made from HR crops (preset: the preset's own)",
                            choices=("preset", *DEGRADATIONS))
    zoom_out: float = flag(2.0, "HR crops are taken from the photo zoomed out by a random factor in [1, this] "
                           "(our choice; Real-ESRGAN trains on down-scaled copies of its photos)", low=1)
    flat_prob: float = flag(-1.0, "share of HR crops blurred smooth, so the model learns to leave them (-1: the "
                            "preset's, tiny 0.3, sd21 0: SPEC 6 has none)", low=-1, high=1)
    flat_gate: float = flag(TINY_FLAT_GATE, "tiny: k of FlowSR.detail_gate (0: no gate; see TINY_FLAT_GATE)", low=0)
    pixel_head: int = flag(TINY_PIXEL_HEAD, "tiny: hidden channels of the full-resolution head that makes the velocity "
                           "from the UNet's features (0: none, the UNet's output is the velocity)", low=0)
    texture: int = flag(TINY_TEXTURE, "tiny: hidden channels of texture.py's predictor, fitted in stage 1 beside the "
                        "flow (0: none)", low=0)
    texture_lr: float = flag(1e-3, "stage 1: AdamW learning rate of the texture predictor", low=0)
    upsample: str = flag("bicubic", "up(x_LR) before the encoder", choices=("bicubic", "bilinear"))
    # stage 1 (SPEC 2)
    latent_weight: float = flag(0.0, "stage 1: weight of the latent velocity MSE next to the image loss", low=0)
    lpips_weight: float = flag(1.0, "weight of LPIPS in the image losses (when LPIPS weights are given)", low=0)
    # stage 2 (SPEC 3-5)
    hr_reg_weight: float = flag(1.0, "lambda_HR, the HR regularization's weight (0: plain distillation)", low=0)
    p_fast: float = flag(0.5, "share of pairs from the fast grid (0: slow only, 1: fast only)", low=0, high=1)
    fast_steps: int = flag(4, "N_f: steps of the fast grid", low=1)
    slow_steps: int = flag(1000, "N_s: steps of the slow grid (stage 2), and of stage 1's times", low=1)
    ema_decay: float = flag(0.95, "EMA decay of the target network (0: stop-gradient of the student; 0.95: our "
                            "choice, SPEC gives no value)", low=0, high=1)
    distance: str = flag("huber", "latent distance of the consistency loss", choices=("huber", "l2"))
    huber_c: float = flag(1e-3, "pseudo-Huber c", low=0)
    gt_at_zero: bool = flag(True, "use the ground-truth z_H as the consistency target when t_{n-1} = 0")
    perturb_std: float = flag(0.0, "std of the mild Gaussian perturbation of z_tn", low=0)
    gan_weight: float = flag(0.01, "lambda_GAN (0: no discriminator; 0.01: our choice, SPEC gives no value)", low=0)
    gan_loss: str = flag("hinge", "GAN loss", choices=losses.GAN_KINDS)
    d_lr: float = flag(1e-4, "discriminator learning rate", low=0)
    iqa_weight: float = flag(0.1, "lambda_IQA (needs --clip; 0.1: our choice, SPEC gives no value)", low=0)
    # pretrained loss networks: never faked; without files the term is off (one log line)
    lpips_vgg: str = flag("", "torchvision vgg16-397923af.pth for LPIPS", path=True)
    lpips_heads: str = flag("", "LPIPS linear heads (lpips package weights/v0.1/vgg.pth)", path=True)
    clip: str = flag("", "CLIP folder (Hugging Face CLIPModel layout) for the CLIP-IQA loss", path=True)
    # sd21 preset
    prompt: str = flag(FLOWSR_PROMPT, "fixed prompt whose text embedding is the UNet context (sd21)")
    lora_rank: int = flag(4, "LoRA rank on the UNet (sd21)", low=1)
    vae_lora_rank: int = flag(4, "LoRA rank on the VAE encoder (sd21; 0: frozen encoder)", low=0)
    stage2_encoder: str = flag("train-teacher-stage1", "sd21 stage 2: the VAE encoder's LoRA trains on and the "
                               "teacher sees the stage-1 encoder's z_L (train-teacher-stage1), or the teacher sees "
                               "the student's z_L (train), or the LoRA stays at its stage-1 weights (frozen); SPEC 3",
                               choices=STAGE2_ENCODER)
    grad_checkpointing: str = flag("auto", "gradient checkpointing in the UNet (auto: on for sd21)", choices=("auto", "on", "off"))
    # machinery
    device: str = flag("auto", "auto, cpu, cuda or mps")
    num_workers: int = flag(1, "DataLoader worker processes", low=0)
    log_every: int = flag(50, "steps between log lines", low=1)
    val_every: int = flag(500, "steps between validation grids", low=1)
    ckpt_every: int = flag(250, "steps between checkpoints", low=1)
    max_bad_steps: int = flag(5, "stop after this many non-finite losses in a row", low=1)
    overwrite: bool = flag(False, "start the stages over where --out-dir holds their checkpoints (else refused)")


# ---- setup --------------------------------------------------------------------------------------------

def steps_for(cfg, stage):
    return cfg.max_steps or PRESETS[cfg.preset][f"stage{stage}_steps"]


def build_model(cfg, device, init=None):
    """The preset's model (LoRA-injected for sd21): fresh, or the stage-1 model of the checkpoint `init`."""
    torch.manual_seed(cfg.seed)  # fresh weights (UNet, LoRA, discriminator) are the same in any process
    if cfg.preset == "tiny":
        model = FlowSR.load(init) if init else FlowSR.tiny(cfg.upsample, cfg.flat_gate, cfg.pixel_head, cfg.texture)
    else:
        model = FlowSR.sd21(cfg.base, cfg.prompt, upsample=cfg.upsample)
        lora.inject_lora(model.unet, UNET_LORA_TARGETS, cfg.lora_rank)
        if cfg.vae_lora_rank:
            lora.inject_lora(model.ae, vae_encoder_targets(model.ae), cfg.vae_lora_rank)
        lora.mark_only_lora_trainable(model)
        if init:
            lora.load_flowsr_lora(init, model.unet, model.ae)
    if init:
        check_stage1_flags(init, cfg, model)
    model.unet.gradient_checkpointing = cfg.grad_checkpointing == "on"
    if cfg.crop_size % model.pad_multiple:
        raise TrainingError(f"--crop-size {cfg.crop_size} must be a multiple of {model.pad_multiple} for this model")
    return model.to(device)


# ---- the stages: what each one trains, and one optimizer step of it -----------------------------------

@dataclass
class Stage:
    """The trained model, its objective and optimizer; stage 2 adds the frozen teacher, the EMA target and what
    it is an EMA of (`online`), the discriminator (with an optimizer while --gan-weight > 0) and CLIP-IQA (None
    when off). For sd21 the teacher, the target and `online` are LoRA adapters of the one model (lora.AdapterView)."""
    number: int
    model: FlowSR
    objective: RectifiedSRFlow | ConsistencyFlowDistillation
    optimizer: torch.optim.Optimizer  # of the model's trainable weights
    teacher: FlowSR | lora.AdapterView | None = None
    target: FlowSR | lora.AdapterView | None = None
    online: FlowSR | lora.AdapterView | None = None
    discriminator: losses.UNetDiscriminatorSN | None = None
    d_optimizer: torch.optim.Optimizer | None = None
    iqa: losses.CLIPIQALoss | None = None


def load_lpips(cfg, device, say):
    lpips = losses.try_load_lpips(cfg.lpips_vgg or None, cfg.lpips_heads or None, log=say)
    return lpips.to(device) if lpips is not None else None


def latents(model, x_hr, x_lr):
    """z_H = s E(x_HR) (frozen encoder), z_L = s E(up(x_LR)) (tuned encoder); (b, C, h, w) each (SPEC 1)."""
    z_L = model.encode(model.upsample_lr(x_lr))  # through the LoRA-tuned encoder
    with torch.no_grad(), lora.lora_disabled(model.ae):
        z_H = model.encode(x_hr)  # the frozen encoder defines the HR target
    return z_H, z_L


# Stage 1: rectified SR flow (SPEC 2).

def build_stage1(cfg, device, say):
    model = build_model(cfg, device)
    flow_params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("texture.")]
    groups = [{"params": flow_params}]
    if model.texture is not None:  # a group of its own, so that synced_step clips it on its own
        groups.append({"params": list(model.texture.parameters()), "lr": cfg.texture_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    flow = RectifiedSRFlow(model.ae, load_lpips(cfg, device, say), cfg.lpips_weight, cfg.latent_weight)
    return Stage(1, model, flow, optimizer)


def stage1_step(cfg, stage, batch, generator, ranks):
    """One optimizer step of v_theta: its StepReport, or None when it was skipped (not finite)."""
    stage.optimizer.zero_grad(set_to_none=True)
    report = StepReport(cfg.grad_accum)
    for x_hr, x_lr in micro_batches(batch, cfg.grad_accum, ranks.device):
        with ranks.autocast():
            z_H, z_L = latents(stage.model, x_hr, x_lr)
            t = sample_times(len(x_hr), cfg.slow_steps, generator).to(ranks.device)  # (b,)
            # L1 = ||D(f/s) - x_HR||^2 + lambda_lpips LPIPS(D(f/s), x_HR) (+ latent_weight ||v - (z_L - z_H)||^2),
            # where f = z_t - t v_theta(z_t, t) is the HR latent implied at z_t = (1 - t) z_H + t z_L
            loss, per_example, stats = stage.objective.loss(stage.model, x_hr, z_H, z_L, t, None)
        if stage.model.texture is not None:  # texture.py's predictor, on the same crops (and smooth copies)
            texture_nll = stage.model.texture.fit_loss((x_hr.float() + 1) / 2)
            loss, stats["texture_nll"] = loss + texture_nll, texture_nll.item()  # own group, own clip: flow unchanged
        report.add(loss, per_example, stats, t)
        (loss / cfg.grad_accum).backward()
    grad_norm = synced_step(stage.optimizer, ranks, cfg.grad_clip, report.finite)
    if grad_norm is None:
        return None
    report.stats["grad_norm"] = grad_norm
    return report


# Stage 2: consistency flow distillation with HR regularization, GAN and CLIP-IQA (SPEC 3-5).

def build_stage2(cfg, device, say):
    """The student f_theta (the stage-1 model, still trainable), the teacher v_phi (the stage-1 model, frozen),
    the target theta- (an EMA of the student), the discriminator and CLIP-IQA.

    tiny: every weight trains, so the teacher and the target are whole copies of the model. sd21: only the LoRA
    trains, so they are two more LoRA adapters over the student's one copy of SD 2.1 (lora.AdapterView), and
    the EMA runs over the student's adapter. With --stage2-encoder frozen the VAE encoder's LoRA stops training;
    with train-teacher-stage1 (the default) stage2_step gives the teacher the stage-1 encoder's z_L.
    """
    init = stage1_path(cfg)
    if not os.path.isfile(init):
        raise TrainingError(f"{init}: no stage-1 checkpoint to start stage 2 from (train stage 1, or give --init)")
    model = build_model(cfg, device, init)
    if model.texture is not None:
        model.texture.requires_grad_(False)  # fitted in stage 1
    if cfg.preset == "tiny":
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
        target, online = copy.deepcopy(model).requires_grad_(False), model
    else:
        if cfg.stage2_encoder == "frozen":
            for p in lora.lora_parameters(model.ae):
                p.requires_grad_(False)
        for name in ("teacher", "target"):
            lora.add_adapter(model, name)  # copies of the stage-1 LoRA just loaded
        teacher, target, online = (lora.AdapterView(model, name) for name in ("teacher", "target", "default"))
    optimizer = torch.optim.AdamW(trainable(model), lr=cfg.stage2_lr, weight_decay=cfg.weight_decay)
    distillation = ConsistencyFlowDistillation(model.ae, load_lpips(cfg, device, say), cfg.hr_reg_weight,
                                               cfg.lpips_weight, cfg.distance, cfg.huber_c, cfg.gt_at_zero,
                                               cfg.perturb_std)
    # Real-ESRGAN's discriminator (64 features; 32 for the tiny preset) with DCGAN's Adam betas: our choices
    discriminator = losses.UNetDiscriminatorSN(num_feat=32 if cfg.preset == "tiny" else 64).to(device)
    d_optimizer = (torch.optim.AdamW(discriminator.parameters(), lr=cfg.d_lr, betas=(0.5, 0.999))
                   if cfg.gan_weight > 0 else None)
    iqa = losses.try_load_clip_iqa(cfg.clip or None, log=say) if cfg.iqa_weight > 0 else None
    return Stage(2, model, distillation, optimizer, teacher, target, online, discriminator, d_optimizer,
                 iqa.to(device) if iqa is not None else None)


def stage2_step(cfg, stage, batch, generator, ranks):
    """One step of stage 2 (SPEC 3-5): 1. latents z_H, z_L and adjacent times t_n > t_{n-1} (fast or slow grid);
    2. the distillation (consistency.py): the teacher's Euler step to z_hat, the EMA target's endpoint there,
    L_CD + lambda_HR L_HR and the student's x_pred, + lambda_GAN L_GAN + lambda_IQA L_IQA on it; 3. the student's
    optimizer step, the discriminator's (x_HR real, x_pred fake), the EMA update. Returns the student's
    StepReport, or None when its step was skipped (not finite) and nothing was updated."""
    stage.optimizer.zero_grad(set_to_none=True)
    report = StepReport(cfg.grad_accum)
    for x_hr, x_lr in micro_batches(batch, cfg.grad_accum, ranks.device):
        with ranks.autocast():
            z_H, z_L = latents(stage.model, x_hr, x_lr)
            z_L_teacher = None
            if cfg.preset == "sd21" and cfg.stage2_encoder == "train-teacher-stage1":
                with torch.no_grad(), lora.adapter_active(stage.model.ae, "teacher"):
                    z_L_teacher = stage.model.encode(stage.model.upsample_lr(x_lr))  # the stage-1 encoder's z_L
            t_n, t_prev, _ = sample_adjacent_pairs(len(x_hr), cfg.fast_steps, cfg.slow_steps, cfg.p_fast, generator)
            t_n, t_prev = t_n.to(ranks.device), t_prev.to(ranks.device)  # (b,) each, t_n > t_prev adjacent
            # L = L_CD + lambda_HR L_HR + lambda_GAN L_GAN + lambda_IQA L_IQA (SPEC 5). The distillation gives
            # L_CD + lambda_HR L_HR and x_pred = D(f_theta(z_tn, t_n) / s), which carries the student's gradient
            # into the discriminator's verdict (L_GAN) and CLIP-IQA's (L_IQA).
            loss, per_example, stats, x_pred = stage.objective.loss(stage.model, stage.teacher, stage.target, x_hr,
                                                                    z_H, z_L, t_n, t_prev, None, generator, z_L_teacher)
            if cfg.gan_weight > 0:
                l_gan = losses.g_loss(stage.discriminator(x_pred), cfg.gan_loss)
                loss, stats["gan_g"] = loss + cfg.gan_weight * l_gan, l_gan.item()
            if stage.iqa is not None:  # None when off (no --clip, or --iqa-weight 0)
                l_iqa = stage.iqa(x_pred)
                loss, stats["iqa"] = loss + cfg.iqa_weight * l_iqa, l_iqa.item()
            stats["loss"] = loss.item()
        report.add(loss, per_example, stats, t_n)
        (loss / cfg.grad_accum).backward()
    grad_norm = synced_step(stage.optimizer, ranks, cfg.grad_clip, report.finite)
    if grad_norm is None:
        return None
    if cfg.gan_weight > 0:  # the discriminator's turn, on the last micro-batch: x_HR is real, x_pred fake
        stage.d_optimizer.zero_grad(set_to_none=True)
        with ranks.autocast():
            d_loss = losses.d_loss(stage.discriminator(x_hr), stage.discriminator(x_pred.detach()), cfg.gan_loss)
        d_loss.backward()
        synced_step(stage.d_optimizer, ranks)
        report.stats["gan_d"] = d_loss.item()
    update_ema(stage.target, stage.online, cfg.ema_decay)  # after the step: mu = 0 targets the updated student
    report.stats["grad_norm"] = grad_norm
    return report


# ---- the loop -----------------------------------------------------------------------------------------

def train_stage(cfg, number, dataset, val, ranks, interrupted):
    """Build (or resume) stage `number`, train it to its last step with checkpoints, logs, grids; return its model."""
    say = tqdm.write if ranks.rank == 0 else (lambda *a, **k: None)
    total = steps_for(cfg, number)
    build, train_step = (build_stage1, stage1_step) if number == 1 else (build_stage2, stage2_step)
    stage = build(cfg, ranks.device, say)
    size = sum(p.numel() for p in trainable(stage.model)) / 1e6
    say(f"stage {number}: {size:.2f} M trainable parameters, {total} steps")
    checkpoints = Checkpoints(cfg, stage, ranks, total)
    step, window = checkpoints.resume(say)
    if step >= total:
        return stage.model
    log_path = os.path.join(cfg.out_dir, "log.jsonl") if ranks.rank == 0 else None
    if ranks.rank == 0:
        trim_history(cfg.out_dir, number, step)
    bad_in_row, started = 0, time.time()
    stage.model.train()
    with tqdm(total=total, initial=step, desc=f"stage {number}", disable=ranks.rank != 0, dynamic_ncols=True) as bar:
        for batch in batches(dataset, cfg.batch_size, step, total, ranks.rank, ranks.world, cfg.num_workers):
            report = train_step(cfg, stage, batch, step_generator(cfg.seed, number, step, ranks.rank), ranks)
            step += 1  # a skipped step uses up its batch too
            bar.update(1)
            if report is None:
                bad_in_row += 1
                say(f"warning: stage {number} step {step}: non-finite loss or gradient, step skipped "
                    f"({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    checkpoints.save(step, window)
                    raise TrainingError(f"stage {number} step {step}: {bad_in_row} non-finite losses in a row "
                                        f"(--max-bad-steps); stopped. {checkpoints.state_path} holds the weights "
                                        "of the last good step")
            else:
                bad_in_row = 0
                window.add(report)
                bar.set_postfix({k: f"{v:.4f}" for k, v in report.stats.items()
                                 if k in ("loss", "pixel_mse", "consistency")})
            if (step % cfg.log_every == 0 or step == total) and window.count:
                window.log(number, step, total, time.time() - started, say, log_path)
            if ranks.rank == 0 and val is not None and (step % cfg.val_every == 0 or step == total):
                save_validation_grid(stage.model, val, cfg.out_dir, number, step, say)
            stop = ranks.any(interrupted.requested)
            if step % cfg.ckpt_every == 0 or step == total or stop:
                checkpoints.save(step, window)
            if stop:
                bar.close()  # the bar's last state ends its line, so that "saved:" is a line of its own in a log
                say(f"interrupted: saved stage {number} at step {step}/{total}; continue with --resume")
                say(f"saved: {checkpoints.model_path}")
                sys.exit(0)
    if ranks.world > 1:
        dist.barrier()  # the other ranks' stage 2 reads this stage's model file
    return stage.model


def main(argv=None):
    """Train; returns the model of the last stage (the same on every rank)."""
    cfg = parse(TrainConfig, argv)
    try:
        with Interrupted() as interrupted, contextlib.ExitStack() as held:
            ranks = setup(cfg, PRESETS)
            say = print if ranks.rank == 0 else (lambda *a, **k: None)
            say("config:\n" + describe(cfg), flush=True)
            stages = (1, 2) if cfg.stage == "both" else (int(cfg.stage),)
            check_paths(cfg, stages, steps_for(cfg, 1))  # on every rank, before the photos are read
            length = max(steps_for(cfg, stage) for stage in stages) * cfg.batch_size * ranks.world  # crops to draw
            dataset = open_dataset(cfg, length, say)
            val = validation_batch(cfg.val_data, cfg.crop_size, cfg.degradation, say) if ranks.rank == 0 else None
            if ranks.rank == 0:
                held.enter_context(claimed_out_dir(cfg, stages, steps_for(cfg, 1)))
            for stage in stages:
                model = train_stage(cfg, stage, dataset, val, ranks, interrupted)
    except (TrainingError, WeightsError, ImageError) as e:  # ImageError: the photos became unreadable
        sys.exit(f"error: {e}")
    if ranks.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    say(f"saved: {os.path.join(cfg.out_dir, f'stage{stages[-1]}.safetensors')}", flush=True)
    return model


if __name__ == "__main__":
    main()
