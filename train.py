"""Train FlowSR, top to bottom: stage 1 (rectified SR flow, SPEC 2), then stage 2 (consistency flow
distillation with HR regularization and fast-slow timestep pairs, plus GAN and CLIP-IQA terms, SPEC 3-5).

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
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.utils import make_grid
from tqdm import tqdm

import lora
import losses
from plumbing.flags import describe, flag, parse
from consistency import ConsistencyFlowDistillation, update_ema
from data import HRFolderDataset, ImageError, from_model, list_images, load_image, save_image, to_model
from degradations import degrade_realesrgan
from flow import RectifiedSRFlow, sample
from flowsr import FLOWSR_PROMPT, UNET_LORA_TARGETS, FlowSR, vae_encoder_targets
from schedulers import sample_adjacent_pairs, sample_times
from plumbing.trainstate import model_signature, resume, save_state, trim_log
from plumbing.weights import WeightsError

PRESETS = {  # what a 0 / "" in the config means for each preset
    "tiny": dict(batch_size=8, crop_size=64, lr=2e-4, stage2_lr=2e-5, stage1_steps=2000, stage2_steps=150,
                 grad_checkpointing=False),
    "sd21": dict(batch_size=4, crop_size=512, lr=5e-5, stage2_lr=2e-5, stage1_steps=20000, stage2_steps=20000,
                 grad_checkpointing=True),
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
    lr: float = flag(0.0, "AdamW learning rate of stage 1 (0: preset default)")
    stage2_lr: float = flag(0.0, "AdamW learning rate of stage 2, a fine-tune of stage 1 (0: preset default)")
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
    gan_weight: float = flag(0.01, "lambda_GAN (0: no discriminator)")
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
    for key in ("batch_size", "crop_size", "lr", "stage2_lr"):
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


def open_dataset(cfg, stages, world, say):
    """The training photos, checked once at start: unreadable files are skipped with one warning each."""
    length = max(steps_for(cfg, stage) for stage in stages) * cfg.batch_size * world
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return HRFolderDataset(cfg.data, cfg.crop_size, 4, cfg.degradation, seed=cfg.seed, length=length)
        except ValueError as e:
            sys.exit(f"error: {e}")
        finally:
            for warning in caught:
                say(f"warning: {warning.message}")


def build_model(cfg, stage, device):
    """Stage 1: the preset's model (LoRA-injected for sd21). Stage 2: the stage-1 model, still trainable."""
    init = cfg.init or os.path.join(cfg.out_dir, "stage1.safetensors")
    if stage == 2 and not os.path.isfile(init):
        sys.exit(f"error: {init}: no stage-1 checkpoint to start stage 2 from (train stage 1, or give --init)")
    torch.manual_seed(cfg.seed)  # fresh weights (UNet, LoRA, discriminator) are the same in any process
    if cfg.preset == "tiny":
        model = FlowSR.tiny(cfg.upsample) if stage == 1 else FlowSR.load(init)
        model.upsample = cfg.upsample
    else:
        model = FlowSR.sd21(cfg.base, cfg.prompt, upsample=cfg.upsample)
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


def build_stage(cfg, stage, device, say):
    """The model, its optimizer and loss, and in stage 2 the teacher, EMA target, discriminator and IQA."""
    s = SimpleNamespace(model=build_model(cfg, stage, device), teacher=None, target=None, discriminator=None,
                        d_params=[], d_optimizer=None, iqa=None)
    if cfg.crop_size % s.model.pad_multiple:
        sys.exit(f"error: --crop-size {cfg.crop_size} must be a multiple of {s.model.pad_multiple} for this model")
    s.params = [p for p in s.model.parameters() if p.requires_grad]
    s.optimizer = torch.optim.AdamW(s.params, lr=cfg.lr if stage == 1 else cfg.stage2_lr, weight_decay=cfg.weight_decay)
    lpips = losses.try_load_lpips(cfg.lpips_vgg or None, cfg.lpips_heads or None, log=say)
    lpips = lpips.to(device) if lpips is not None else None
    if stage == 1:
        s.method = RectifiedSRFlow(s.model.ae, lpips, cfg.lpips_weight, cfg.latent_weight)
        return s
    s.method = ConsistencyFlowDistillation(s.model.ae, lpips, cfg.hr_reg_weight, cfg.lpips_weight, cfg.distance,
                                           cfg.huber_c, cfg.gt_at_zero, cfg.perturb_std)
    s.teacher = lora.merge_lora(copy.deepcopy(s.model)).requires_grad_(False).eval()
    s.target = copy.deepcopy(s.model).requires_grad_(False)
    s.discriminator = losses.UNetDiscriminatorSN(num_feat=32 if cfg.preset == "tiny" else 64).to(device)
    if cfg.gan_weight > 0:
        s.d_params = list(s.discriminator.parameters())
        s.d_optimizer = torch.optim.AdamW(s.d_params, lr=cfg.d_lr, betas=(0.5, 0.999))
    if cfg.iqa_weight > 0:
        s.iqa = losses.try_load_clip_iqa(cfg.clip or None, log=say)
        s.iqa = s.iqa.to(device) if s.iqa is not None else None
    return s


def export(cfg, model, path, stage, step):
    extra = {"stage": stage, "step": step, "train_config": dataclasses.asdict(cfg)}
    if cfg.preset == "tiny":
        model.save(path, extra)
    else:
        model.save_lora(path, cfg.lora_rank, cfg.vae_lora_rank, extra)


# ---- data ---------------------------------------------------------------------------------------------

def ignore_signals(worker_id):
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which saves before it stops."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def batches(cfg, dataset, start_step, total_steps, rank, world):
    """Item n of the dataset is fully determined by (seed, n), and step s of rank r takes the items
    s * B * world + r * B + [0, B): resuming at any step gives the same batches."""
    order = [step * cfg.batch_size * world + rank * cfg.batch_size + j
             for step in range(start_step, total_steps) for j in range(cfg.batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=order, drop_last=True,
                                       num_workers=cfg.num_workers, worker_init_fn=ignore_signals)


def step_generator(cfg, stage, step, rank):
    """The generator of a step's time draws (and perturbation): a pure function of (seed, stage, step, rank)."""
    key = hashlib.blake2b(f"{cfg.seed}/{stage}/{step}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def validation_batch(cfg, say, n=4):
    """Fixed center crops of held-out photos, degraded with fixed seeds: the same every time."""
    paths = list_images(cfg.val_data)[:n] if os.path.isdir(cfg.val_data) else []
    hrs, lrs = [], []
    for i, path in enumerate(paths):
        try:
            image = load_image(path)[0]  # (3, H, W) in [0, 1]
        except ImageError as e:
            say(f"warning: skipping {e}")
            continue
        size = min(cfg.crop_size, *image.shape[1:]) // 16 * 16
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        hr = image[:, top:top + size, left:left + size]
        hr = F.interpolate(hr[None], size=cfg.crop_size, mode="bicubic", antialias=True)[0].clamp(0, 1)
        hrs.append(to_model(hr))
        lrs.append(to_model(degrade_realesrgan(hr, 4, torch.Generator().manual_seed(1000 + i))))
    if not hrs:
        say(f"no validation grids: no readable photos in {cfg.val_data}")
    return (torch.stack(hrs), torch.stack(lrs)) if hrs else None


@torch.no_grad()
def save_validation_grid(model, val, path):
    """Rows of up(LR) | one-step output | HR."""
    hr, lr = (x.to(model.context.device) for x in val)
    up = model.upsample_lr(lr)
    sr = model.decode(sample(model, model.encode(up), None, torch.tensor([1.0, 0.0]))).clamp(-1, 1)
    rows = torch.stack([up, sr, hr], dim=1).flatten(0, 1)  # (3B, 3, H, W)
    save_image(make_grid(from_model(rows), nrow=3, padding=2), path)


# ---- one stage ----------------------------------------------------------------------------------------

class Interrupted:
    """While active, SIGINT / SIGTERM ask the loop to save and stop after the current step (a second SIGINT
    stops at once); on exit the previous handlers come back."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def average_gradients(params, world):
    """Data parallelism: each rank has gradients of its own batch; one all_reduce averages them."""
    grads = [p.grad for p in params if p.grad is not None]
    if world > 1 and grads:
        buffer = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(buffer)
        buffer /= world
        for g, chunk in zip(grads, buffer.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))


def any_rank(flag, world, device):
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def stage_loss(cfg, stage, s, hr, lr, generator):
    """One micro-batch: (loss, per-example loss (b,), stats, t (b,), decoded prediction or None)."""
    model, device = s.model, hr.device
    z_L = model.encode(model.upsample_lr(lr))  # (b, C, h, w), through the LoRA-tuned encoder
    with torch.no_grad(), lora.lora_disabled(model.ae):
        z_H = model.encode(hr)  # the frozen encoder defines the HR target
    if stage == 1:
        t = sample_times(len(hr), cfg.slow_steps, generator).to(device)
        return (*s.method.loss(model, hr, z_H, z_L, t, None), t, None)
    t, t_prev, _ = sample_adjacent_pairs(len(hr), cfg.fast_steps, cfg.slow_steps, cfg.p_fast, generator)
    t, t_prev = t.to(device), t_prev.to(device)
    loss, per_sample, stats, x_pred = s.method.loss(model, s.teacher, s.target, hr, z_H, z_L, t, t_prev, None,
                                                    generator)
    if s.d_optimizer:
        gan = losses.g_loss(s.discriminator(x_pred), cfg.gan_loss)
        loss, stats["gan_g"] = loss + cfg.gan_weight * gan, gan.item()
    if s.iqa is not None:
        iqa = s.iqa(x_pred)
        loss, stats["iqa"] = loss + cfg.iqa_weight * iqa, iqa.item()
    stats["loss"] = loss.item()
    return loss, per_sample, stats, t, x_pred


def optimizer_step(cfg, stage, s, batch, generator, world, device, autocast):
    """One step of the model (then of the discriminator): (stats, t (B,), per-example loss (B,)), or None
    when a loss or the gradient is not finite, and then nothing is updated."""
    micro = cfg.batch_size // cfg.grad_accum
    s.optimizer.zero_grad(set_to_none=True)
    stats, finite, times, per_example = {}, True, [], []
    for k in range(cfg.grad_accum):
        hr, lr = (batch[key][k * micro:(k + 1) * micro].to(device) for key in ("hr", "lr"))
        with autocast:
            loss, per_sample, micro_stats, t, x_pred = stage_loss(cfg, stage, s, hr, lr, generator)
        finite = finite and bool(torch.isfinite(loss))
        (loss / cfg.grad_accum).backward()
        for key, value in micro_stats.items():
            stats[key] = stats.get(key, 0.0) + value / cfg.grad_accum
        times.append(t.detach().cpu())
        per_example.append(per_sample.detach().float().cpu())
    average_gradients(s.params, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.grad_clip or float("inf"))
    if any_rank(not finite, world, device) or not torch.isfinite(grad_norm):  # the norm is the same on all ranks
        return None
    s.optimizer.step()
    if stage == 2:
        update_ema(s.target, s.model, cfg.ema_decay)
    if s.d_optimizer:  # the discriminator's turn, on the last micro-batch
        s.d_optimizer.zero_grad(set_to_none=True)
        with autocast:
            d_loss = losses.d_loss(s.discriminator(hr), s.discriminator(x_pred.detach()), cfg.gan_loss)
        d_loss.backward()
        average_gradients(s.d_params, world)
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(s.d_params, float("inf"))):
            s.d_optimizer.step()
        stats["gan_d"] = d_loss.item()
    return {**stats, "grad_norm": grad_norm.item()}, torch.cat(times), torch.cat(per_example)


def new_window():
    """Sums of the stats since the last log line, and of the per-example loss by t in [0,.25) .. [.75,1]."""
    return {"sums": {}, "count": 0, "by_t": torch.zeros(2, 4)}


def train_stage(cfg, stage, dataset, val, rank, world, device, interrupted):
    """Build (or resume) one stage, train it to its last step with checkpoints, logs and grids; return its model."""
    say = tqdm.write if rank == 0 else (lambda *a, **k: None)
    total = steps_for(cfg, stage)
    state_path = os.path.join(cfg.out_dir, f"stage{stage}_state.pt")
    model_path = os.path.join(cfg.out_dir, f"stage{stage}.safetensors")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    try:
        s = build_stage(cfg, stage, device, say)
    except WeightsError as e:
        sys.exit(f"error: {e}")
    model, signature = s.model, model_signature(cfg, s.model)
    say(f"stage {stage}: {sum(p.numel() for p in s.params) / 1e6:.2f} M trainable parameters, {total} steps")
    step, window, saved_step = 0, new_window(), None
    if cfg.resume and os.path.exists(state_path):
        step, window = resume(cfg, stage, s, state_path, signature, say)
        window = window or new_window()
        saved_step = step

    def checkpoint():
        """The model file, then the training state: a failed or killed write leaves the last state intact."""
        nonlocal saved_step
        error = None
        if rank == 0:
            state = {"step": step, "signature": json.dumps(signature), "config": json.dumps(dataclasses.asdict(cfg)),
                     "model": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                     "optimizer": s.optimizer.state_dict(), "window": window}
            if stage == 2:
                state.update(target=s.target.state_dict(), discriminator=s.discriminator.state_dict())
                if s.d_optimizer:
                    state["d_optimizer"] = s.d_optimizer.state_dict()
            try:
                export(cfg, model, model_path, stage, step)
                save_state(state_path, state)
            except OSError as e:
                error = str(e).strip().splitlines()[0]
        if any_rank(error is not None, world, device):
            kept = (f"{state_path} still holds step {saved_step}" if saved_step is not None
                    else "no earlier checkpoint of this stage")
            sys.exit(f"error: could not save the stage {stage} checkpoint of step {step} ({error}); {kept}"
                     if rank == 0 else 1)
        saved_step = step

    if step >= total:
        return model
    if rank == 0:
        trim_log(log_path, stage, step)
        os.makedirs(os.path.join(cfg.out_dir, "val"), exist_ok=True)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bad_in_row, started = 0, time.time()
    model.train()
    with tqdm(total=total, initial=step, desc=f"stage {stage}", disable=rank != 0, dynamic_ncols=True) as bar:
        for batch in batches(cfg, dataset, step, total, rank, world):
            result = optimizer_step(cfg, stage, s, batch, step_generator(cfg, stage, step, rank), world, device,
                                    autocast)
            step += 1  # a skipped step uses up its batch too
            bar.update(1)
            if result is None:
                bad_in_row += 1
                say(f"warning: stage {stage} step {step}: non-finite loss or gradient, step skipped "
                    f"({bad_in_row} in a row)")
                if bad_in_row >= cfg.max_bad_steps:
                    checkpoint()
                    sys.exit(f"error: stage {stage} step {step}: {bad_in_row} non-finite losses in a row "
                             f"(--max-bad-steps); stopped. {state_path} holds the weights of the last good step")
            else:
                stats, t, per_example = result
                bad_in_row, index = 0, (t * 4).clamp(max=3.999).long()
                window["by_t"][0].index_add_(0, index, per_example)
                window["by_t"][1].index_add_(0, index, torch.ones(len(index)))
                for key, value in stats.items():
                    window["sums"][key] = window["sums"].get(key, 0.0) + value
                window["count"] += 1
                bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items() if k in ("loss", "pixel_mse", "consistency")})
            if (step % cfg.log_every == 0 or step == total) and window["count"]:
                means = {k: v / window["count"] for k, v in window["sums"].items()}
                by_t = (window["by_t"][0] / window["by_t"][1].clamp(min=1)).tolist()
                say(f"stage {stage} step {step}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                    + " | loss by t: " + " ".join(f"{b:.4f}" for b in by_t) + f" | {time.time() - started:.0f}s")
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"stage": stage, "step": step, **means, "loss_by_t": by_t}) + "\n")
                window = new_window()
            if rank == 0 and val is not None and (step % cfg.val_every == 0 or step == total):
                grid = os.path.join(cfg.out_dir, "val", f"stage{stage}_{step:06d}.png")
                save_validation_grid(model.eval(), val, grid)
                model.train()
            stop = any_rank(interrupted.requested, world, device)
            if step % cfg.ckpt_every == 0 or step == total or stop:
                checkpoint()
            if stop:
                say(f"interrupted: saved stage {stage} at step {step}/{total}; continue with --resume")
                if rank == 0:
                    print(f"saved: {model_path}", flush=True)
                sys.exit(0)
    if world > 1:
        dist.barrier()  # the other ranks' stage 2 reads this stage's model file
    return model


def main(argv=None):
    """Train; returns the model of the last stage (the same on every rank)."""
    cfg = parse(TrainConfig, argv)
    with Interrupted() as interrupted:
        rank, world, device = setup(cfg)
        say = print if rank == 0 else (lambda *a, **k: None)
        say("config:\n" + describe(cfg), flush=True)
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
        stages = (1, 2) if cfg.stage == "both" else (int(cfg.stage),)
        dataset = open_dataset(cfg, stages, world, say)
        val = validation_batch(cfg, say) if rank == 0 else None
        for stage in stages:
            model = train_stage(cfg, stage, dataset, val, rank, world, device, interrupted)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    say(f"saved: {os.path.join(cfg.out_dir, f'stage{stages[-1]}.safetensors')}", flush=True)
    return model


if __name__ == "__main__":
    main()
