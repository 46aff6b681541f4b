"""Quality of super-resolved images against their ground truth: PSNR-Y, SSIM-Y, LPIPS, DISTS.

Fidelity is measured as the SR literature reports it (BasicSR, and the OSEDiff / SinSR tables after it):
on the luma Y of ITU-R BT.601 YCbCr, Y = 16 + 65.481 R + 128.553 G + 24.966 B with RGB in [0, 1], so Y
lies on the 0..255 scale; no border is cropped.

- PSNR = 10 log10(255^2 / MSE). Identical images score +inf, and so does any mean that includes one
  (the JSON file then holds `Infinity`, which Python's json reads back).
- SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, averaged
  over the 'valid' positions only (where the window fits inside the image), as BasicSR's calculate_ssim.
  This equals skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255), which also drops the 5-pixel border before averaging.
- LPIPS (losses.py) and DISTS (dists.py) need pretrained weights; without them their column stays
  empty and a note says which flag is missing.

    python evaluate.py --sr out/sr --gt data/hr --json out/metrics.json \
        --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth --dists weights.pt --vgg vgg16-397923af.pth

Images are read with data.load_image (any mode becomes RGB; an alpha channel is not scored). An SR file
matches the GT file with the same stem, else the GT file whose stem is the SR stem without a trailing
"_x4" ("baby_x4.png" scores against "baby.png"); stems keep their subfolder ("set5/baby"). Unmatched
files are listed. A pair that cannot be scored (different sizes, unreadable file) is listed as an error
and the exit status is 1.
"""
import dataclasses
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import data
from plumbing.flags import describe, flag, parse
from plumbing.dists import try_load_dists

SR_SUFFIX = "_x4"
METRICS = ("psnr_y", "ssim_y", "lpips", "dists")


# ----------------------------------------------------------------------------------------------------
# PSNR and SSIM on the Y channel, for (B, 3, H, W) tensors in [0, 1]

def rgb_to_y(x):
    """BT.601 luma on the 0..255 scale, in float64 so that PSNR of near-identical images stays exact."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(x.shape)}")
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return 16.0 + (x.to(torch.float64) * weights).sum(1, keepdim=True)  # (B, 1, H, W)


def psnr_y(sr, gt):
    """(B,) PSNR in dB between the Y channels; +inf where the images are identical."""
    y_sr, y_gt = _y_pair(sr, gt)
    mse = (y_sr - y_gt).pow(2).mean((1, 2, 3))  # (B,)
    return 10 * torch.log10(255.0 ** 2 / mse)


def gaussian_window(size=11, sigma=1.5, dtype=torch.float64, device=None):
    """The normalised 1-D Gaussian; its outer product with itself is SSIM's 11x11 window."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def ssim_y(sr, gt):
    """(B,) mean SSIM over the valid window positions of the Y channels; exactly 1 for identical images."""
    y_sr, y_gt = _y_pair(sr, gt)
    if min(y_sr.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(y_sr.shape[-2:])}")
    window = gaussian_window(device=y_sr.device)

    def blur(img):  # separable 'valid' filtering: (B, 1, H, W) -> (B, 1, H-10, W-10)
        return F.conv2d(F.conv2d(img, window.view(1, 1, -1, 1)), window.view(1, 1, 1, -1))

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(y_sr), blur(y_gt)
    var_x = blur(y_sr * y_sr) - mu_x * mu_x
    var_y = blur(y_gt * y_gt) - mu_y * mu_y
    cov_xy = blur(y_sr * y_gt) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.mean((1, 2, 3))


def detail_ratio(sr, gt):
    """(B,) energy of the fine detail of SR over that of GT: 1 = as much, < 1 = smoother, > 1 = more (noise too).

    Not a quality score but a position on the perception-distortion trade-off (Blau and Michaeli 2018):
    the PSNR-optimal estimate is the posterior mean, which is blurry, so a method that scores higher PSNR
    by averaging shows a lower ratio. Detail = Y minus its Gaussian blur (SSIM's 11x11, sigma 1.5 window).
    """
    y_sr, y_gt = _y_pair(sr, gt)
    window = gaussian_window(device=y_sr.device)

    def high_pass(img):  # (B, 1, H, W) -> (B, 1, H, W)
        padded = F.pad(img, (5, 5, 5, 5), mode="replicate")
        return img - F.conv2d(F.conv2d(padded, window.view(1, 1, -1, 1)), window.view(1, 1, 1, -1))
    return high_pass(y_sr).pow(2).mean((1, 2, 3)) / high_pass(y_gt).pow(2).mean((1, 2, 3))


def _y_pair(sr, gt):
    if sr.shape != gt.shape:
        raise ValueError(f"SR {tuple(sr.shape)} and GT {tuple(gt.shape)} differ in shape")
    return rgb_to_y(sr), rgb_to_y(gt)


# ----------------------------------------------------------------------------------------------------
# Folders: pairing by file stem, scoring every pair

def images_by_stem(folder):
    """{stem: path} of the images under folder (the stem of sub/baby.png is "sub/baby"); two files with
    one stem are an error."""
    images = {}
    for path in data.list_images(folder):
        stem = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        if stem in images:
            raise ValueError(f"{folder}: two images share the stem '{stem}' ({images[stem]}, {path})")
        images[stem] = path
    return images


def match_pairs(sr_dir, gt_dir):
    """[(name, sr_path, gt_path)] sorted by name, and a list of lines naming the unmatched files."""
    sr_images, gt_images = images_by_stem(sr_dir), images_by_stem(gt_dir)
    pairs, missing, matched_sr = [], [], set()
    for name, gt_path in sorted(gt_images.items()):
        sr_stem = name if name in sr_images else name + SR_SUFFIX
        if sr_stem in sr_images:
            pairs.append((name, sr_images[sr_stem], gt_path))
            matched_sr.add(sr_stem)
        else:
            missing.append(f"no SR image for GT {gt_path}")
    missing += [f"no GT image for SR {path}" for stem, path in sr_images.items() if stem not in matched_sr]
    return pairs, missing


@torch.no_grad()
def evaluate_folders(sr_dir, gt_dir, lpips=None, dists=None):
    """Score every matched pair; LPIPS / DISTS only when their model is given (runs on the model's device).

    Returns {"images": [{"name", "sr", "gt", "psnr_y", "ssim_y", "lpips", "dists"}], "mean": {metric: value},
    "notes": [], "missing": [lines], "errors": [lines]}; a metric that was not computed is None.
    """
    pairs, missing = match_pairs(sr_dir, gt_dir)
    model = lpips if lpips is not None else dists
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    images, errors = [], []
    for name, sr_path, gt_path in pairs:
        try:
            (sr, _), (gt, _) = data.load_image(sr_path), data.load_image(gt_path)  # alpha is not scored
        except data.ImageError as e:
            errors.append(f"{name}: {e}")
            continue
        if sr.shape != gt.shape:
            errors.append(f"{name}: SR {sr.shape[2]}x{sr.shape[1]} ({sr_path}) and GT "
                          f"{gt.shape[2]}x{gt.shape[1]} ({gt_path}) differ in size")
            continue
        sr, gt = sr[None].to(device), gt[None].to(device)  # (1, 3, H, W)
        try:
            row = {"name": name, "sr": sr_path, "gt": gt_path,
                   "psnr_y": psnr_y(sr, gt).item(), "ssim_y": ssim_y(sr, gt).item(),
                   "lpips": lpips(sr * 2 - 1, gt * 2 - 1).item() if lpips is not None else None,
                   "dists": dists(sr, gt).item() if dists is not None else None}
        except ValueError as e:
            errors.append(f"{name}: {e}")
            continue
        images.append(row)
    mean = {}
    for metric in METRICS:
        values = [row[metric] for row in images if row[metric] is not None]
        mean[metric] = math.fsum(values) / len(values) if values else None  # an inf PSNR makes the mean inf
    return {"images": images, "mean": mean, "notes": [], "missing": missing, "errors": errors}


def format_table(result):
    """Aligned text table: one row per image and a mean row; empty cells for metrics not computed."""
    decimals = {"psnr_y": 3, "ssim_y": 4, "lpips": 4, "dists": 4}

    def cell(value, metric):
        return "" if value is None else f"{value:.{decimals[metric]}f}"

    rows = [[row["name"]] + [cell(row[m], m) for m in METRICS] for row in result["images"]]
    rows.append(["mean"] + [cell(result["mean"][m], m) for m in METRICS])
    header = ["name", *METRICS]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = [(r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:]))).rstrip()
             for r in [header] + rows]
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line

@dataclasses.dataclass
class EvalConfig:
    """Score super-resolved images against ground truth: PSNR-Y, SSIM-Y, LPIPS, DISTS."""
    sr: str = flag(None, "folder of super-resolved images (required)")
    gt: str = flag(None, "folder of ground-truth HR images, matched by file stem (required)")
    json: str = flag(None, "also write {images, mean, notes, missing, errors} to this JSON file")
    lpips_vgg: str = flag(None, "torchvision VGG16 weights for LPIPS (vgg16-397923af.pth)")
    lpips_heads: str = flag(None, "LPIPS linear heads (the lpips package's weights/v0.1/vgg.pth)")
    dists: str = flag(None, "DISTS alpha/beta weights (DISTS_pytorch's weights.pt)")
    vgg: str = flag(None, "torchvision VGG16 weights for the DISTS backbone (vgg16-397923af.pth)")
    device: str = flag("cpu", "device that runs LPIPS and DISTS (cpu, cuda, ...)")


def load_lpips(config, log):
    if not config.lpips_vgg or not config.lpips_heads:
        log("LPIPS off: weights not found (--lpips-vgg and --lpips-heads are both needed)")
        return None
    from losses import try_load_lpips  # imported here: PSNR/SSIM alone never touch the losses module
    return try_load_lpips(config.lpips_vgg, config.lpips_heads, log=log)


def main(argv=None):
    config = parse(EvalConfig, argv)
    print(describe(config))
    if not config.sr or not config.gt:
        print("evaluate.py: error: --sr and --gt are required", file=sys.stderr)
        return 2
    notes = []
    try:
        lpips, dists = load_lpips(config, notes.append), try_load_dists(config.vgg, config.dists, log=notes.append)
        lpips, dists = (m.to(config.device) if m is not None else None for m in (lpips, dists))
        result = evaluate_folders(config.sr, config.gt, lpips=lpips, dists=dists)
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    result["notes"] = notes + result["notes"]
    print(format_table(result))
    for label, key in (("note", "notes"), ("missing", "missing"), ("error", "errors")):
        for line in result[key]:
            print(f"{label}: {line}")
    if config.json:
        os.makedirs(os.path.dirname(os.path.abspath(config.json)), exist_ok=True)
        with open(config.json, "w") as f:
            json.dump(result, f, indent=2)
    if not result["images"]:
        print("evaluate.py: error: no image pair could be scored", file=sys.stderr)
        return 1
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
