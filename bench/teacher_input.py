"""What should stage 2's teacher see when the VAE encoder's LoRA can keep training (issue 10, SPEC 3)?

    python bench/teacher_input.py                      # about an hour on one CPU core

The sd21 preset tunes a LoRA on the VAE encoder as well as on the UNet, so z_L = s E(up(x_LR)) changes while
stage 2 trains, and the frozen teacher v_phi (trained in stage 1 on the stage-1 encoder's z_L) is fed inputs
it never saw. train.py --stage2-encoder offers three answers; this script trains each one from the same
stage-1 model and scores the one-step results on held-out crops:

- frozen: the encoder's LoRA stays at its stage-1 weights in stage 2 (student, teacher and target share z_L);
- train: it keeps training and the teacher and target run on the student's z_L (what train.py did first);
- train-teacher-stage1: it keeps training; the teacher and target run on the stage-1 encoder's z_L.

The model is SD-shaped but tiny: a diffusers UNet (32, 64 channels) and VAE (16, 32, 32) in a diffusers folder.
Pretrained SD weights are not at hand, so the base is made usable first: the VAE is trained as an autoencoder
on crops of photos/train, and the UNet's conv_out starts at zero (v = 0: the base model returns up(x_LR)).
Then train.py --preset sd21 runs stage 1 and, for each option and seed, stage 2 (default losses: HR
regularization, GAN; LPIPS and CLIP-IQA have no weights here), with learning rates raised for the toy.
Score: PSNR (RGB, 0..1) of D(z_L - v(z_L, 1)) against x_HR on fixed center and corner crops of
photos/heldout, degraded with the Real-ESRGAN pipeline at fixed seeds, and the mean stage-2 loss terms of the
last 50 steps; and how far the student's encoder moved z_L from the stage-1 encoder's (relative l2).
Results: bench/results/teacher_input.{json,md}. Runs in --work-dir are reused (an interrupted one goes on with
--resume) only if they were made with the same settings; other settings need another --work-dir.
"""
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from data import HRFolderDataset, list_images, load_image, to_model  # noqa: E402
from degradations import degrade_realesrgan  # noqa: E402
from flowsr import FLOWSR_PROMPT_IDS, FlowSR  # noqa: E402
from plumbing.flags import flag, parse  # noqa: E402
from report import check_work_dir, machine, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPTIONS = train.STAGE2_ENCODER


@dataclass
class Config:
    """Train stage 2 with each --stage2-encoder option from one stage-1 model; score them on held-out crops."""
    work_dir: str = flag(os.path.join(tempfile.gettempdir(), "flowsr-teacher-input"), "runs and the tiny SD folder")
    out_dir: str = flag(os.path.join(HERE, "results"), "where the JSON and markdown results go")
    vae_steps: int = flag(4000, "autoencoder steps that make the random VAE usable")
    stage1_steps: int = flag(1000, "stage-1 steps")
    stage2_steps: int = flag(500, "stage-2 steps per option and seed")
    seeds: list = flag(["0", "1"], "stage-2 seeds (data order, discriminator)")
    crop_size: int = flag(64, "HR crop size")
    lr: float = flag(1e-3, "stage-1 LoRA learning rate (the toy needs more than the preset's 5e-5)")
    stage2_lr: float = flag(2e-4, "stage-2 LoRA learning rate")


def tiny_sd_folder(folder, cfg):
    """unet/ vae/ text_encoder/ in the diffusers layout, at toy size; the VAE trained, the UNet's output zero."""
    if os.path.exists(os.path.join(folder, "READY")):
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    train_autoencoder(vae, cfg)
    vae.save_pretrained(os.path.join(folder, "vae"))
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, pad_token_id=0,
                                 bos_token_id=FLOWSR_PROMPT_IDS[0], eos_token_id=FLOWSR_PROMPT_IDS[-1])
                  ).save_pretrained(os.path.join(folder, "text_encoder"))
    with open(os.path.join(folder, "READY"), "w") as f:
        f.write("ok")
    return folder


def train_autoencoder(vae, cfg):
    """Reconstruction (l2 of the posterior mean's decoding) on photo crops: a stand-in for SD's trained VAE."""
    data = HRFolderDataset(os.path.join(ROOT, "photos", "train"), cfg.crop_size, 4, "bicubic", seed=0,
                           length=cfg.vae_steps * 8)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step, batch in enumerate(torch.utils.data.DataLoader(data, batch_size=8)):
        x = batch["hr"]
        loss = (vae.decode(vae.encode(x).latent_dist.mean).sample - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            print(f"autoencoder step {step}: l2 {loss.item():.4f}", file=sys.stderr, flush=True)


def heldout_crops(size):
    """(x_HR, x_LR): the center and four corner crops of each held-out photo, Real-ESRGAN-degraded at fixed seeds."""
    hrs = []
    for path in list_images(os.path.join(ROOT, "photos", "heldout")):
        image = load_image(path)[0]
        h, w = image.shape[1:]
        corners = [((h - size) // 2, (w - size) // 2), (0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
        hrs += [image[:, y:y + size, x:x + size] for y, x in corners]
    lrs = [degrade_realesrgan(hr, 4, torch.Generator().manual_seed(2000 + i)) for i, hr in enumerate(hrs)]
    return to_model(torch.stack(hrs)), to_model(torch.stack(lrs))


@torch.no_grad()
def psnr(model, x_hr, x_lr):
    """Mean PSNR (dB, RGB on 0..1) of one-step SR D(z_L - v(z_L, 1)), no colour correction."""
    model.eval()
    z_L = model.encode(model.upsample_lr(x_lr))
    sr = model.decode(z_L - model(z_L, torch.full((len(z_L),), 1000.0))).clamp(-1, 1)
    mse = ((sr - x_hr) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).mean().item()


def run_train(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            model = train.main(argv)
        except SystemExit as e:
            sys.exit(f"error: train.py {' '.join(argv)}: {e.code}\n{out.getvalue()[-2000:]}")
    return model


def last_losses(log_path, stage, n=50):
    with open(log_path) as f:
        records = [r for r in map(json.loads, f) if r["stage"] == stage][-n:]
    return {k: statistics.mean(r[k] for r in records) for k in ("loss", "consistency", "hr_mse")}


def main(argv=None):
    cfg = parse(Config, argv)
    check_work_dir(cfg.work_dir, {k: v for k, v in vars(cfg).items() if k not in ("work_dir", "out_dir")})
    torch.set_num_threads(1)
    folder = tiny_sd_folder(os.path.join(cfg.work_dir, "sd"), cfg)
    common = ["--preset", "sd21", "--base", folder, "--data", os.path.join(ROOT, "photos", "train"),
              "--val-data", os.path.join(ROOT, "photos", "heldout"), "--crop-size", str(cfg.crop_size),
              "--num-workers", "0", "--log-every", "1", "--val-every", "100000", "--ckpt-every", "100000"]
    stage1_dir = os.path.join(cfg.work_dir, "stage1")
    stage1 = os.path.join(stage1_dir, "stage1.safetensors")
    run_train(common + ["--stage", "1", "--out-dir", stage1_dir, "--max-steps", str(cfg.stage1_steps),
                        "--lr", str(cfg.lr), "--resume"])  # returns at once when an earlier call finished it
    x_hr, x_lr = heldout_crops(cfg.crop_size)
    start = FlowSR.load(stage1, base=folder)
    up = start.upsample_lr(x_lr)
    bicubic = (10 * torch.log10(1 / ((up - x_hr) / 2).pow(2).flatten(1).mean(1))).mean().item()
    results = {"crops": len(x_hr), "bicubic_psnr": bicubic, "stage1_psnr": psnr(start, x_hr, x_lr), "runs": {}}
    print(f"{len(x_hr)} held-out crops: bicubic {bicubic:.2f} dB, stage 1 {results['stage1_psnr']:.2f} dB",
          file=sys.stderr, flush=True)
    with torch.no_grad():
        z_L_stage1 = start.encode(up)
    for option in OPTIONS:
        for seed in cfg.seeds:
            out = os.path.join(cfg.work_dir, f"{option}-{seed}")
            run_train(common + ["--stage", "2", "--out-dir", out, "--init", stage1, "--seed", str(seed),
                                "--max-steps", str(cfg.stage2_steps), "--stage2-lr", str(cfg.stage2_lr),
                                "--stage2-encoder", option, "--resume"])
            model = FlowSR.load(os.path.join(out, "stage2.safetensors"), base=folder)
            with torch.no_grad():
                z_L = model.encode(up)
            results["runs"][f"{option}/{seed}"] = {
                "option": option, "seed": int(seed), "psnr": psnr(model, x_hr, x_lr),
                "z_L_drift": ((z_L - z_L_stage1).norm() / z_L_stage1.norm()).item(),
                **last_losses(os.path.join(out, "log.jsonl"), 2)}
            print(f"{option} seed {seed}: {results['runs'][f'{option}/{seed}']}", file=sys.stderr, flush=True)
    results.update(config=vars(cfg), machine=machine())
    table = markdown(results, cfg)
    write_results(os.path.join(cfg.out_dir, "teacher_input"), results, table)
    print(table)


def markdown(results, cfg):
    lines = [f"# Stage 2: what the teacher sees ({results['crops']} held-out crops of {cfg.crop_size} px)", "",
             f"bicubic {results['bicubic_psnr']:.2f} dB; stage 1 ({cfg.stage1_steps} steps) "
             f"{results['stage1_psnr']:.2f} dB; stage 2: {cfg.stage2_steps} steps, seeds {', '.join(cfg.seeds)}.", "",
             "| --stage2-encoder | PSNR (dB) per seed | mean | loss | L_CD | HR l2 | z_L drift from stage 1 |",
             "|---|---|---|---|---|---|---|"]
    for option in OPTIONS:
        runs = [r for r in results["runs"].values() if r["option"] == option]
        mean = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
        per_seed = ", ".join(f"{r['psnr']:.2f}" for r in runs)
        lines.append(f"| {option} | {per_seed} | {mean('psnr'):.2f} | "
                     f"{mean('loss'):.4f} | {mean('consistency'):.4f} | {mean('hr_mse'):.4f} | "
                     f"{100 * mean('z_L_drift'):.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
