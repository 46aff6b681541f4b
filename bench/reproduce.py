"""A small-scale reproduction of FlowSR's main table and ablations, on a CPU (issue 5).

    python bench/reproduce.py           # about 40 min on a free 2-core machine
    python bench/reproduce.py --smoke   # a few minutes: tiny budgets and 128-px crops; checks the plumbing only

Tiny models (pixel autoencoder + ~3 M parameter UNet) are trained by train.py in subprocesses on
photos/train with fixed seeds: stage 1 (rectified SR flow) once, then every stage-2 row from that same
teacher with the same budget: FlowSR, and its ablations without HR regularization, with the fast or the
slow timestep scheduler only, and without the GAN. They are scored on photos/heldout, which no model
trains on (train.py's validation grids are pointed at photos/train), each photo cropped to a multiple of
16 and degraded with fixed seeds both ways: Real-ESRGAN's second-order pipeline and plain bicubic.

Rows: bicubic up-sampling (NFE 0); stage 1 with N Euler steps on the shifted grid (the method's sampler,
sample.py --steps N) and, to read the curve, on the uniform grid; the one-step stage-2 models. Inference
is sample.super_resolve in this process (timed: inference only), with the whole latent in one tile:
tiles only bound memory, which these models do not need. A "detail" column (evaluate.detail_ratio) places
each row on the perception-distortion trade-off. LPIPS stays empty unless its weights are given
(--lpips-vgg, --lpips-heads): there are none here and a metric is never faked.
Writes bench/results/reproduce{,_smoke}.{json,md} and crops{,_smoke}.png.
"""
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from data import list_images, load_image, save_image  # noqa: E402
from degradations import degrade_bicubic, degrade_realesrgan  # noqa: E402
from evaluate import detail_ratio, psnr_y, ssim_y  # noqa: E402
from flowsr import FlowSR  # noqa: E402
from losses import try_load_lpips  # noqa: E402
from schedulers import uniform_grid  # noqa: E402

STAGE2_ROWS = {  # out-dir name: (row label, train.py flags); every row starts from the same stage-1 teacher
    "flowsr": ("FlowSR (stage 2)", []),
    "no-hr-reg": ("FlowSR w/o HR regularization", ["--hr-reg-weight", "0"]),
    "fast-only": ("FlowSR, fast scheduler only", ["--p-fast", "1"]),
    "slow-only": ("FlowSR, slow scheduler only", ["--p-fast", "0"]),
    "no-gan": ("FlowSR w/o GAN", ["--gan-weight", "0"]),
}
DEGRADATIONS = ("realesrgan", "bicubic")


@dataclass
class ReproduceConfig:
    """Train tiny FlowSR models (stage 1, stage 2, ablations) and score them on held-out photos."""
    stage1_steps: int = flag(2000, "stage-1 optimizer steps")
    stage2_steps: int = flag(300, "optimizer steps of EVERY stage-2 row (one budget for all)")
    seed: int = flag(0, "training seed (data order, time draws, initial weights)")
    eval_seed: int = flag(0, "seed of the Real-ESRGAN degradation of the held-out photos")
    train_data: str = flag(os.path.join(ROOT, "photos", "train"), "HR training photos")
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR test photos (never trained or tuned on)")
    euler_steps: list = flag(["1", "2", "4", "8", "25"], "stage-1 rows: Euler steps on the shifted grid")
    uniform_steps: list = flag(["2", "4", "8"], "stage-1 rows: Euler steps on the uniform grid (none: [])")
    work_dir: str = flag(os.path.join(ROOT, "runs", "reproduce"), "models and training logs (reused when rerun)")
    out_dir: str = flag(os.path.join(ROOT, "bench", "results"), "where the table, JSON and crops go")
    crop: int = flag(0, "score centre crops of this HR size instead of whole photos (0: whole)")
    lpips_vgg: str = flag("", "torchvision vgg16-397923af.pth, for the LPIPS column")
    lpips_heads: str = flag("", "LPIPS linear heads (lpips package weights/v0.1/vgg.pth)")
    smoke: bool = flag(False, "tiny budgets, 128-px crops, own work dir and result names: minutes")


# ---- training: train.py in subprocesses --------------------------------------------------------------

def train(cfg, name, stage, steps, extra):
    """Run train.py for one stage into WORK_DIR/name (resuming what is there); returns (model path, seconds)."""
    out_dir = os.path.join(cfg.work_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--stage", str(stage),
            "--out-dir", out_dir, "--max-steps", str(steps), "--seed", str(cfg.seed), "--data", cfg.train_data,
            "--val-data", cfg.train_data, "--resume", *extra]
    print(f"training {name} (stage {stage}, {steps} steps): log in {out_dir}/train.log", flush=True)
    start = time.time()
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        status = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if status:
        sys.exit(f"error: train.py failed for {name} (exit status {status}); see {out_dir}/train.log")
    return os.path.join(out_dir, f"stage{stage}.safetensors"), time.time() - start


def check_work_dir(cfg):
    """A work dir holds models of one set of budgets: reuse them only for the same budgets."""
    budgets = {k: getattr(cfg, k) for k in ("stage1_steps", "stage2_steps", "seed", "train_data")}
    path = os.path.join(cfg.work_dir, "budgets.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != budgets:
                sys.exit(f"error: {cfg.work_dir} holds models trained with other budgets ({path}); "
                         f"give another --work-dir or delete it")
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(budgets, f)


# ---- held-out photos, degraded with fixed seeds ----------------------------------------------------------

def heldout_set(cfg):
    """[(name, hr (3, H, W), {degradation: lr (3, H/4, W/4)})], H and W multiples of 16."""
    items = []
    for i, path in enumerate(list_images(cfg.heldout)):
        hr = load_image(path)[0]
        h, w = hr.shape[1:]
        size_h, size_w = (min(cfg.crop, h), min(cfg.crop, w)) if cfg.crop else (h, w)
        size_h, size_w = size_h // 16 * 16, size_w // 16 * 16
        top, left = (h - size_h) // 2, (w - size_w) // 2
        hr = hr[:, top:top + size_h, left:left + size_w]
        lrs = {"realesrgan": degrade_realesrgan(hr, 4, torch.Generator().manual_seed(cfg.eval_seed * 1000 + i)),
               "bicubic": degrade_bicubic(hr, 4)}
        items.append((os.path.splitext(os.path.basename(path))[0], hr, lrs))
    if not items:
        sys.exit(f"error: {cfg.heldout}: no images")
    return items


# ---- methods: lr (1, 3, h, w) -> sr (1, 3, 4h, 4w), all in [0, 1] ------------------------------------

@contextlib.contextmanager
def uniform_sampling_grid():
    """super_resolve takes its multi-step grid from sample.flow_match_sigmas: swap in the uniform grid."""
    shifted = sample.flow_match_sigmas
    sample.flow_match_sigmas = lambda steps, shift: uniform_grid(steps)
    try:
        yield
    finally:
        sample.flow_match_sigmas = shifted


def flow_method(model, steps, uniform=False):
    # no tiles: these models are small, and tiles would only blend in seams
    cfg = sample.SampleConfig(steps=steps, tile_size=0, device="cpu")

    def run(lr):
        with uniform_sampling_grid() if uniform else contextlib.nullcontext():
            return sample.super_resolve(model, lr, cfg)
    return run


def bicubic(lr):
    return F.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)


def methods(cfg, stage1_path, stage2_paths):
    """[(key, label, NFE, function)] in table order."""
    stage1 = FlowSR.load(stage1_path).eval()
    rows = [("bicubic", "Bicubic", 0, bicubic)]
    rows += [(f"stage1-{n}", f"Stage 1, {n} step{'s' * (int(n) > 1)} (shifted grid)", int(n),
              flow_method(stage1, int(n))) for n in cfg.euler_steps]
    rows += [(f"stage1-{n}-uniform", f"Stage 1, {n} steps (uniform grid)", int(n),
              flow_method(stage1, int(n), uniform=True)) for n in cfg.uniform_steps]
    for key, path in stage2_paths.items():
        rows.append((key, STAGE2_ROWS[key][0], 1, flow_method(FlowSR.load(path).eval(), 1)))
    return rows


@torch.no_grad()
def score(rows, images, lpips):
    """Per row: mean PSNR-Y / SSIM-Y / LPIPS over the photos, for each degradation, and seconds per image."""
    results, outputs = {}, {}
    for key, label, nfe, run in rows:
        run(torch.rand(1, 3, 16, 16))  # warm-up, so that one-time costs stay out of the timing
        per_image, seconds = [], []
        for name, hr, lrs in images:
            for degradation, lr in lrs.items():
                start = time.perf_counter()
                sr = run(lr[None])  # (1, 3, H, W)
                seconds.append(time.perf_counter() - start)
                sr = (sr.clamp(0, 1) * 255).round() / 255  # scored as the 8-bit file would be
                outputs[key, name, degradation] = sr[0]
                per_image.append({"image": name, "degradation": degradation, "psnr_y": psnr_y(sr, hr[None]).item(),
                                  "ssim_y": ssim_y(sr, hr[None]).item(), "detail": detail_ratio(sr, hr[None]).item(),
                                  "lpips": lpips(sr * 2 - 1, hr[None] * 2 - 1).item() if lpips is not None else None})
        mean = {d: {m: (sum(r[m] for r in per_image if r["degradation"] == d) / len(images)
                        if lpips is not None or m != "lpips" else None) for m in ("psnr_y", "ssim_y", "detail", "lpips")}
                for d in DEGRADATIONS}
        results[key] = {"label": label, "nfe": nfe, "mean": mean, "images": per_image,
                        "seconds_per_image": sum(seconds) / len(seconds)}
        print(f"{label:40s} " + "  ".join(f"{d} {mean[d]['psnr_y']:.2f} dB / {mean[d]['ssim_y']:.4f}"
                                                  for d in DEGRADATIONS), flush=True)
    return results, outputs


# ---- outputs ------------------------------------------------------------------------------------------------

def crops_picture(images, outputs, path, size=128):
    """Rows of centre crops (Real-ESRGAN inputs): LR (nearest) | bicubic | stage 1, 1 and 25 steps | FlowSR | HR."""
    tiles = []
    for name, hr, lrs in images:
        h, w = hr.shape[1:]
        s = min(size, h, w) // 4 * 4
        top, left = (h - s) // 8 * 4, (w - s) // 8 * 4  # multiples of 4, so LR pixels line up
        lr_nearest = F.interpolate(lrs["realesrgan"][None], scale_factor=4, mode="nearest")[0]
        columns = [lr_nearest] + [outputs.get((key, name, "realesrgan"), torch.zeros_like(hr))
                                  for key in ("bicubic", "stage1-1", "stage1-25", "flowsr")] + [hr]
        tiles += [c[:, top:top + s, left:left + s] for c in columns]
    save_image(make_grid(tiles, nrow=6, padding=2, pad_value=1.0), path)


def markdown(report):
    m = report["machine"]
    lines = [f"# Small-scale reproduction{' (SMOKE: plumbing check, numbers mean nothing)' * report['smoke']}", "",
             f"{m['date']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']}; whole run {report['wall_s'] / 60:.1f}"
             f" min (training {sum(report['train_s'].values()) / 60:.1f} min). Budgets: stage 1 {report['config']['stage1_steps']}"
             f" steps, every stage-2 row {report['config']['stage2_steps']} steps (batch 8, 64-px crops, seed "
             f"{report['config']['seed']}). Held-out: {', '.join(report['heldout'])}.", "",
             "| method | NFE | PSNR-Y Real-ESRGAN | SSIM-Y Real-ESRGAN | PSNR-Y bicubic | SSIM-Y bicubic | "
             "detail Real-ESRGAN / bicubic | LPIPS | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"].values():
        r, b = row["mean"]["realesrgan"], row["mean"]["bicubic"]
        lp = " / ".join(f"{x['lpips']:.3f}" for x in (r, b)) if r["lpips"] is not None else ""
        lines.append(f"| {row['label']} | {row['nfe']} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} | {b['psnr_y']:.2f} | {b['ssim_y']:.4f}"
                     f" | {r['detail']:.3f} / {b['detail']:.3f} | {lp} | {row['seconds_per_image']:.2f} |")
    lines += ["", "Detail: energy of Y minus its Gaussian blur, relative to the HR photo's (evaluate.detail_ratio): "
              "1 = as much fine detail as the photo, lower = smoother. LPIPS: " + report["lpips_note"],
              "Shifted grid: diffusers' FlowMatchEuler with shift 3 (2 steps "
              "= timesteps 1000, 8.9); uniform grid: t = 1, 1 - 1/N, ..., 0."]
    return "\n".join(lines) + "\n"


def machine():
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv=None):
    cfg = parse(ReproduceConfig, argv)
    if cfg.smoke:
        cfg.stage1_steps, cfg.stage2_steps, cfg.crop = min(cfg.stage1_steps, 30), min(cfg.stage2_steps, 10), 128
        cfg.work_dir += "-smoke"
    print("config:\n" + describe(cfg), flush=True)
    started = time.time()
    check_work_dir(cfg)
    train_s = {}  # wall seconds of each train.py run (a few when an earlier run had already finished it)
    stage1_path, train_s["stage1"] = train(cfg, "stage1", 1, cfg.stage1_steps, [])
    stage2_paths = {}
    for key, (_, flags) in STAGE2_ROWS.items():
        stage2_paths[key], train_s[key] = train(cfg, key, 2, cfg.stage2_steps, ["--init", stage1_path, *flags])
    notes = []
    lpips = try_load_lpips(cfg.lpips_vgg or None, cfg.lpips_heads or None, log=notes.append)
    images = heldout_set(cfg)
    results, outputs = score(methods(cfg, stage1_path, stage2_paths), images, lpips)
    suffix = "_smoke" if cfg.smoke else ""
    os.makedirs(cfg.out_dir, exist_ok=True)
    crops_picture(images, outputs, os.path.join(cfg.out_dir, f"crops{suffix}.png"))
    report = {"smoke": cfg.smoke, "config": asdict(cfg), "machine": machine(), "wall_s": time.time() - started,
              "train_s": train_s, "heldout": [f"{name} {hr.shape[2]}x{hr.shape[1]}" for name, hr, _ in images],
              "lpips_note": notes[0] if notes else "computed with the given weights", "rows": results}
    stem = os.path.join(cfg.out_dir, f"reproduce{suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md and crops{suffix}.png in {cfg.out_dir}")


if __name__ == "__main__":
    main()
