"""Train FlowSR, top to bottom: stage 1 (rectified SR flow, SPEC 2), then stage 2 (consistency flow
distillation with HR regularization and fast-slow timestep pairs, plus GAN and CLIP-IQA terms, SPEC 3-5).

    python train.py                                    # tiny preset, CPU, both stages, shipped photos
    python train.py --preset sd21 --base SD21_DIR      # LoRA fine-tune of Stable Diffusion 2.1-base
    torchrun --nproc_per_node=2 train.py ...           # data parallel (gloo on CPU, nccl on GPU)

Files in --out-dir: stage1.safetensors (the stage-1 model, stage 2's teacher), stage2.safetensors (the
one-step model), stage{1,2}_state.pt (everything --resume needs), val/ (validation grids), log.jsonl.
"""
import contextlib
import copy
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import make_grid
from tqdm import tqdm

import lora
import losses
from configs import describe, flag, parse
from consistency import ConsistencyFlowDistillation, update_ema
from data import HRFolderDataset, from_model, list_images, load_image, save_image, to_model
from degradations import degrade_realesrgan
from flow import RectifiedSRFlow, sample
from flowsr import FLOWSR_PROMPT, UNET_LORA_TARGETS, FlowSR, vae_encoder_targets
from schedulers import sample_adjacent_pairs, sample_times
from weights import fsync_and_rename

PRESETS = {  # what a 0 / "" in the config means for each preset
    "tiny": dict(batch_size=8, crop_size=64, lr=2e-4, stage1_steps=1500, stage2_steps=1500, grad_checkpointing=False),
    "sd21": dict(batch_size=4, crop_size=512, lr=5e-5, stage1_steps=20000, stage2_steps=20000, grad_checkpointing=True),
}


@dataclass
class TrainConfig:
    """Train FlowSR (both stages by default)."""
    stage: str = flag("both", "which stage(s) to train", choices=("1", "2", "both"))
    preset: str = flag("tiny", "tiny: pixel autoencoder + small UNet (CPU); sd21: LoRA on SD 2.1-base", choices=tuple(PRESETS))
    base: str = flag("", "SD 2.1-base: diffusers folder or original single file (--preset sd21)")
    data: str = flag("photos/train", "folder of HR training photos")
    val_data: str = flag("photos/heldout", "folder of photos for the validation grids")
    out_dir: str = flag("runs/tiny", "where checkpoints, grids and logs go")
    init: str = flag("", "stage-1 checkpoint to start stage 2 from (default: OUT_DIR/stage1.safetensors)")
    resume: bool = flag(False, "continue from OUT_DIR/stage*_state.pt")
    max_steps: int = flag(0, "optimizer steps per stage (0: the preset's default)")
    batch_size: int = flag(0, "images per optimizer step and rank (0: preset default)")
    grad_accum: int = flag(1, "micro-batches per optimizer step (batch_size is split between them)")
    crop_size: int = flag(0, "HR crop size in pixels (0: preset default)")
    lr: float = flag(0.0, "AdamW learning rate (0: preset default)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)")
    seed: int = flag(0, "seed of the data, the time draws and the initial weights")
    degradation: str = flag("realesrgan", "how LR inputs are made from HR crops", choices=("realesrgan", "bicubic"))
    upsample: str = flag("bicubic", "up(x_LR) before the encoder", choices=("bicubic", "bilinear"))
    # stage 1 (SPEC 2)
    latent_weight: float = flag(0.0, "stage 1: weight of the latent velocity MSE next to the image loss")
    lpips_weight: float = flag(1.0, "weight of LPIPS in the image losses (when LPIPS weights are given)")
    # stage 2 (SPEC 3-5)
    hr_reg_weight: float = flag(1.0, "lambda_HR: weight of the HR regularization (0: plain consistency distillation)")
    p_fast: float = flag(0.5, "share of pairs from the fast grid (0: slow only, 1: fast only)")
    fast_steps: int = flag(4, "N_f: steps of the fast grid")
    slow_steps: int = flag(1000, "N_s: steps of the slow grid")
    ema_decay: float = flag(0.95, "decay of the target network's EMA (0: stop-gradient of the student)")
    distance: str = flag("huber", "latent distance of the consistency loss", choices=("huber", "l2"))
    huber_c: float = flag(1e-3, "pseudo-Huber c")
    gt_at_zero: bool = flag(True, "use the ground-truth z_H as the consistency target when t_{n-1} = 0")
    perturb_std: float = flag(0.0, "std of the mild Gaussian perturbation of z_tn")
    gan_weight: float = flag(0.05, "lambda_GAN (0: no discriminator)")
    gan_loss: str = flag("hinge", "GAN loss", choices=losses.GAN_KINDS)
    d_lr: float = flag(1e-4, "discriminator learning rate")
    iqa_weight: float = flag(0.1, "lambda_IQA (needs --clip)")
    # pretrained loss networks: never faked; missing files switch the term off with one log line
    lpips_vgg: str = flag("", "torchvision vgg16-397923af.pth for LPIPS")
    lpips_heads: str = flag("", "LPIPS linear heads (lpips package weights/v0.1/vgg.pth)")
    clip: str = flag("", "CLIP folder (Hugging Face CLIPModel layout) for the CLIP-IQA loss")
    # sd21 preset
    prompt: str = flag(FLOWSR_PROMPT, "fixed prompt whose text embedding is the UNet context (sd21)")
    lora_rank: int = flag(4, "LoRA rank on the UNet (sd21)")
    vae_lora_rank: int = flag(4, "LoRA rank on the VAE encoder (sd21; 0: frozen encoder)")
    grad_checkpointing: str = flag("auto", "gradient checkpointing in the UNet (auto: on for sd21)", choices=("auto", "on", "off"))
    # machinery
    device: str = flag("auto", "auto, cpu, cuda or mps")
    num_workers: int = flag(1, "DataLoader worker processes")
    log_every: int = flag(50, "steps between log lines")
    val_every: int = flag(500, "steps between validation grids")
    ckpt_every: int = flag(250, "steps between checkpoints")
    max_bad_steps: int = flag(5, "stop after this many non-finite losses in a row")


# ---- setup --------------------------------------------------------------------------------------------

def setup(cfg):
    """Fill preset defaults; start the process group under torchrun; pick the device."""
    defaults = PRESETS[cfg.preset]
    for key in ("batch_size", "crop_size", "lr"):
        if not getattr(cfg, key):
            setattr(cfg, key, defaults[key])
    if cfg.grad_checkpointing == "auto":
        cfg.grad_checkpointing = "on" if defaults["grad_checkpointing"] else "off"
    if cfg.preset == "sd21" and not cfg.base:
        sys.exit("error: --preset sd21 needs --base (an SD 2.1-base diffusers folder or single file)")
    if cfg.batch_size % cfg.grad_accum:
        sys.exit(f"error: --batch-size {cfg.batch_size} does not split into --grad-accum {cfg.grad_accum}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def steps_for(cfg, stage):
    return cfg.max_steps or PRESETS[cfg.preset][f"stage{stage}_steps"]


def build_model(cfg, stage, device):
    """Stage 1: the preset's model (LoRA-injected for sd21). Stage 2: the stage-1 model, still trainable."""
    init = cfg.init or os.path.join(cfg.out_dir, "stage1.safetensors")
    if cfg.preset == "tiny":
        torch.manual_seed(cfg.seed)
        model = FlowSR.tiny(cfg.upsample) if stage == 1 else FlowSR.load(init)
        model.upsample = cfg.upsample
    else:
        model = FlowSR.sd21(cfg.base, cfg.prompt, upsample=cfg.upsample)
        torch.manual_seed(cfg.seed)
        lora.inject_lora(model.unet, UNET_LORA_TARGETS, cfg.lora_rank)
        if cfg.vae_lora_rank:
            lora.inject_lora(model.ae, vae_encoder_targets(model.ae), cfg.vae_lora_rank)
        lora.mark_only_lora_trainable(model)
        if stage == 2:
            _, unet_sd, vae_sd = lora.read_flowsr_checkpoint(init)
            lora.load_lora_state_dict(model.unet, unet_sd, init)
            lora.load_lora_state_dict(model.ae, vae_sd, init)
    model.unet.gradient_checkpointing = cfg.grad_checkpointing == "on"
    return model.to(device)


def export(cfg, model, path, stage, step):
    extra = {"stage": stage, "step": step, "train_config": dataclasses.asdict(cfg)}
    if cfg.preset == "tiny":
        model.save(path, extra)
    else:
        model.save_lora(path, cfg.lora_rank, cfg.vae_lora_rank, extra)


def model_signature(cfg, model):
    """What must agree between a checkpoint and the run resuming it."""
    return {"preset": cfg.preset, "base": cfg.base, "lora_rank": cfg.lora_rank, "vae_lora_rank": cfg.vae_lora_rank,
            **{f"model.{k}": v for k, v in model.config_dict().items()}}


# ---- training state: one file, written atomically ------------------------------------------------------

def save_state(path, state):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        fsync_and_rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_resumable(path, saved, current):
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        sys.exit(f"error: {path} does not fit this run: " + "; ".join(diffs[:3]))


# ---- data ---------------------------------------------------------------------------------------------

def batches(cfg, start_step, total_steps, rank, world):
    """Item n of the run is fully determined by (seed, n): resuming at any step gives the same batches."""
    n_items = total_steps * cfg.batch_size * world
    dataset = HRFolderDataset(cfg.data, cfg.crop_size, 4, cfg.degradation, seed=cfg.seed, length=n_items)
    order = [step * cfg.batch_size * world + rank * cfg.batch_size + j
             for step in range(start_step, total_steps) for j in range(cfg.batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=order,
                                       num_workers=cfg.num_workers, drop_last=True)


def validation_batch(cfg, n=4):
    """Fixed center crops of held-out photos, degraded with fixed seeds: the same every time."""
    paths = list_images(cfg.val_data)[:n] if os.path.isdir(cfg.val_data) else []
    hrs, lrs = [], []
    for i, path in enumerate(paths):
        image = load_image(path)[0]  # (3, H, W) in [0, 1]
        size = min(cfg.crop_size, *image.shape[1:]) // 16 * 16
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        hr = image[:, top:top + size, left:left + size]
        hr = F.interpolate(hr[None], size=cfg.crop_size, mode="bicubic", antialias=True)[0].clamp(0, 1)
        hrs.append(to_model(hr))
        lrs.append(to_model(degrade_realesrgan(hr, 4, torch.Generator().manual_seed(1000 + i))))
    return (torch.stack(hrs), torch.stack(lrs)) if hrs else None


@torch.no_grad()
def save_validation_grid(model, val, path, device):
    """Rows of up(LR) | one-step output | HR."""
    hr, lr = (x.to(device) for x in val)
    up = model.upsample_lr(lr)
    sr = model.decode(sample(model, model.encode(up), None, torch.tensor([1.0, 0.0]))).clamp(-1, 1)
    rows = torch.stack([up, sr, hr], dim=1).flatten(0, 1)  # (3B, 3, H, W)
    save_image(make_grid(from_model(rows), nrow=3, padding=2), path)


# ---- one stage ----------------------------------------------------------------------------------------

class Interrupted:
    """SIGINT / SIGTERM ask the loop to save and stop at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request)

    def request(self, signum, frame):
        self.requested = True


def average_gradients(params, world):
    """Data parallelism: each rank has gradients of its own batch; one all_reduce averages them."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


def any_rank(flag, world, device):
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def train_stage(cfg, stage, rank, world, device, interrupted):
    say = tqdm.write if rank == 0 else (lambda *a, **k: None)
    total = steps_for(cfg, stage)
    state_path = os.path.join(cfg.out_dir, f"stage{stage}_state.pt")
    model_path = os.path.join(cfg.out_dir, f"stage{stage}.safetensors")
    model = build_model(cfg, stage, device)
    params = [p for p in model.parameters() if p.requires_grad]
    say(f"stage {stage}: {sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters, {total} steps")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lpips = losses.try_load_lpips(cfg.lpips_vgg or None, cfg.lpips_heads or None, log=say)
    lpips = lpips.to(device) if lpips is not None else None
    if stage == 1:
        method = RectifiedSRFlow(model.ae, lpips, cfg.lpips_weight, cfg.latent_weight)
    else:
        method = ConsistencyFlowDistillation(model.ae, lpips, cfg.hr_reg_weight, cfg.lpips_weight, cfg.distance,
                                             cfg.huber_c, cfg.gt_at_zero, cfg.perturb_std)
        teacher = lora.merge_lora(copy.deepcopy(model)).requires_grad_(False).eval()
        target = copy.deepcopy(model).requires_grad_(False)
        discriminator = losses.UNetDiscriminatorSN(num_feat=32 if cfg.preset == "tiny" else 64).to(device)
        d_params = list(discriminator.parameters()) if cfg.gan_weight > 0 else []
        d_optimizer = torch.optim.AdamW(d_params, lr=cfg.d_lr, betas=(0.5, 0.999)) if d_params else None
        iqa = losses.try_load_clip_iqa(cfg.clip or None, log=say) if cfg.iqa_weight > 0 else None
        iqa = iqa.to(device) if iqa is not None else None

    step, signature = 0, model_signature(cfg, model)
    if cfg.resume and os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        check_resumable(state_path, json.loads(state["signature"]), json.loads(json.dumps(signature)))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state["model"]) != trainable:
            sys.exit(f"error: {state_path}: its trainable weights do not match this run's model")
        model.load_state_dict(state["model"], strict=False)  # the frozen rest is rebuilt identically
        optimizer.load_state_dict(state["optimizer"])
        if stage == 2:
            target.load_state_dict(state["target"])
            discriminator.load_state_dict(state["discriminator"])
            if d_optimizer:
                d_optimizer.load_state_dict(state["d_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        step = state["step"]
        say(f"resumed stage {stage} at step {step} from {state_path}")

    def checkpoint():
        if rank != 0:
            return
        state = {"step": step, "signature": json.dumps(signature), "config": json.dumps(dataclasses.asdict(cfg)),
                 "model": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "python_rng": random.getstate()}
        if stage == 2:
            state.update(target=target.state_dict(), discriminator=discriminator.state_dict())
            if d_optimizer:
                state["d_optimizer"] = d_optimizer.state_dict()
        save_state(state_path, state)
        export(cfg, model, model_path, stage, step)

    if step >= total:
        return model_path
    os.makedirs(os.path.join(cfg.out_dir, "val"), exist_ok=True)
    val = validation_batch(cfg) if rank == 0 else None
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    buckets = torch.zeros(2, 4)  # (sum, count) of the per-sample loss for t in [0,.25), [.25,.5), [.5,.75), [.75,1]
    running, bad_in_row, started = {}, 0, time.time()
    bar = tqdm(total=total, initial=step, desc=f"stage {stage}", disable=rank != 0, dynamic_ncols=True)
    micro = cfg.batch_size // cfg.grad_accum
    model.train()
    for batch in batches(cfg, step, total, rank, world):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 10_007 + step * 131 + rank)
        optimizer.zero_grad(set_to_none=True)
        stats_sum, finite = {}, True
        for k in range(cfg.grad_accum):
            hr = batch["hr"][k * micro:(k + 1) * micro].to(device)
            lr = batch["lr"][k * micro:(k + 1) * micro].to(device)
            with autocast:
                z_L = model.encode(model.upsample_lr(lr))  # (b, C, h, w), through the LoRA-tuned encoder
                with torch.no_grad(), lora.lora_disabled(model.ae):
                    z_H = model.encode(hr)  # the frozen encoder defines the HR target
                if stage == 1:
                    t = sample_times(micro, cfg.slow_steps, generator).to(device)
                    loss, per_sample, stats = method.loss(model, hr, z_H, z_L, t, None)
                else:
                    t, t_prev, _ = sample_adjacent_pairs(micro, cfg.fast_steps, cfg.slow_steps, cfg.p_fast, generator)
                    t, t_prev = t.to(device), t_prev.to(device)
                    loss, per_sample, stats, x_pred = method.loss(model, teacher, target, hr, z_H, z_L, t, t_prev,
                                                                  None, generator)
                    if d_optimizer:
                        stats["gan_g"] = losses.g_loss(discriminator(x_pred), cfg.gan_loss)
                        loss = loss + cfg.gan_weight * stats["gan_g"]
                    if iqa is not None:
                        stats["iqa"] = iqa(x_pred)
                        loss = loss + cfg.iqa_weight * stats["iqa"]
            finite = finite and bool(torch.isfinite(loss))
            (loss / cfg.grad_accum).backward()
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value) / cfg.grad_accum
            index = (t.detach().cpu() * 4).clamp(max=3.999).long()
            buckets[0].index_add_(0, index, per_sample.detach().float().cpu())
            buckets[1].index_add_(0, index, torch.ones(len(index)))
        if any_rank(not finite, world, device):
            bad_in_row += 1
            say(f"warning: step {step}: non-finite loss, step skipped ({bad_in_row} in a row)")
            if bad_in_row >= cfg.max_bad_steps:
                checkpoint()
                sys.exit(f"error: {bad_in_row} non-finite losses in a row; stopped. Last good state: {state_path}")
            continue
        bad_in_row = 0
        average_gradients(params, world)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if stage == 2:
            update_ema(target, model, cfg.ema_decay)
            if d_optimizer:
                d_optimizer.zero_grad(set_to_none=True)
                with autocast:
                    fake = x_pred.detach()
                    d_loss = losses.d_loss(discriminator(hr), discriminator(fake), cfg.gan_loss)
                d_loss.backward()
                average_gradients(d_params, world)
                d_optimizer.step()
                stats_sum["gan_d"] = float(d_loss)
        step += 1
        for key, value in stats_sum.items():
            running[key] = running.get(key, 0.0) + value
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in stats_sum.items() if k in ("loss", "pixel_mse", "consistency")})
        if step % cfg.log_every == 0 or step == total:
            means = {k: v / ((step - 1) % cfg.log_every + 1) for k, v in running.items()}
            by_time = (buckets[0] / buckets[1].clamp(min=1)).tolist()
            say(f"stage {stage} step {step}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                + " | loss by t: " + " ".join(f"{b:.4f}" for b in by_time) + f" | {time.time() - started:.0f}s")
            if rank == 0:
                with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"stage": stage, "step": step, **means, "loss_by_t": by_time}) + "\n")
            running, buckets = {}, torch.zeros(2, 4)
        if rank == 0 and val is not None and (step % cfg.val_every == 0 or step == total):
            save_validation_grid(model.eval(), val, os.path.join(cfg.out_dir, "val", f"stage{stage}_{step:06d}.png"),
                                 device)
            model.train()
        stop = any_rank(interrupted.requested, world, device)
        if step % cfg.ckpt_every == 0 or step == total or stop:
            checkpoint()
        if stop:
            bar.close()
            say(f"interrupted at stage {stage} step {step}; resume with --resume")
            print(f"saved: {model_path}")
            sys.exit(0)
    bar.close()
    return model_path


def main(argv=None):
    cfg = parse(TrainConfig, argv)
    rank, world, device = setup(cfg)
    if rank == 0:
        print("config:\n" + describe(cfg), flush=True)
        os.makedirs(cfg.out_dir, exist_ok=True)
    interrupted = Interrupted()
    path = None
    for stage in ((1, 2) if cfg.stage == "both" else (int(cfg.stage),)):
        path = train_stage(cfg, stage, rank, world, device, interrupted)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        print(f"saved: {path}")


if __name__ == "__main__":
    main()
