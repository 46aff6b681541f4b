"""What NIQE rewards: bicubic up-sampling of the held-out photos with something added, scored like the models.

    python bench/niqe_probe.py

Each held-out photo is degraded by bicubic x4 (as in reproduce.py) and up-sampled again by bicubic; to that
result is added (a) a share of the detail it lacks, HR - bicubic (real detail, as a perfect model would add it),
(b) grey Gaussian noise of a few 8-bit levels, identical in R, G and B (grain that carries no information), or
(c) unsharp masking (sharper edges, no new texture), or (d) a share of HR - bicubic shifted by a few pixels
(texture of the right amount and kind in the wrong place: what a model that synthesises texture gives at best,
and what a model that must be right pixel by pixel cannot give); or it is (e) blurred, or (f) replaced by
nearest-neighbour or bilinear up-sampling of the same LR (worse images by any eye). Every image is rounded to 8
bit, then scored by PSNR-Y against the HR photo and by NIQE (evaluate.niqe). It shows how far NIQE can be moved
without restoring anything, in either direction, which is why the reproduction's picture matters as much as its
NIQE column.

A second table shows how much of a photo's NIQE is measurement noise: the same photo cropped a few pixels
further right and down (each crop smaller by the largest offset, rounded up to a multiple of 4) and scored the
same ways. NIQE fits a 36-dimensional Gaussian to the features of 96-px patches, and a photo of a few hundred
pixels has only a dozen or two of them.
"""
import os
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from data import gaussian_blur  # noqa: E402
from degradations import degrade_bicubic  # noqa: E402
from evaluate import NIQE_MIN_SIZE, niqe, psnr_y  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from report import run_main  # noqa: E402
from reproduce import heldout_set, to_8bit  # noqa: E402


@dataclass
class NIQEProbeConfig:
    """Score bicubic up-sampling plus real detail, grain, sharpening, misplaced detail or blur, and cruder
    up-samplers, by PSNR-Y and NIQE."""
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR test photos")
    crop: int = flag(0, "centre crops of this HR size (0: whole photos)", low=0)
    eval_seed: int = flag(0, "seed of the noise (and of reproduce.py's Real-ESRGAN inputs, unused here)")
    detail: list = flag(["0.25", "0.5"], "shares of HR - bicubic to add back")
    noise: list = flag(["1", "2", "4"], "std of the grey noise, in 8-bit levels")
    unsharp: list = flag(["0.5", "1"], "amounts of unsharp masking (Gaussian sigma 1)")
    shifted: list = flag(["0.25", "0.5"], "shares of HR - bicubic to add back shifted by (7, 11) px")
    blur: list = flag(["1", "2"], "sigmas (px) of a Gaussian blur of the bicubic output")
    offsets: list = flag(["0", "4", "8", "12", "16"], "crop offsets (px, right and down; 0-16) of the noise table")


def variants(cfg, lr, bicubic, hr, generator):
    """[(label, image)]: bicubic itself, then each change, all (1, 3, H, W) before rounding."""
    rows = [("bicubic", bicubic)]
    rows += [(f"+ {share} of the missing detail", bicubic + float(share) * (hr - bicubic)) for share in cfg.detail]
    grain = torch.randn(bicubic[:, :1].shape, generator=generator)  # (1, 1, H, W): the same in R, G and B
    rows += [(f"+ grey noise, std {std} level{'' if std == '1' else 's'}", bicubic + float(std) / 255 * grain)
             for std in cfg.noise]
    blurred = gaussian_blur(bicubic[0], 1.0)[None]
    rows += [(f"unsharp masking, amount {amount}", bicubic + float(amount) * (bicubic - blurred))
             for amount in cfg.unsharp]
    misplaced = (hr - bicubic).roll((7, 11), dims=(2, 3))  # uncorrelated with the photo's own detail
    rows += [(f"+ {share} of the missing detail, shifted by (7, 11) px", bicubic + float(share) * misplaced)
             for share in cfg.shifted]
    rows += [(f"Gaussian blur, sigma {sigma} px", gaussian_blur(bicubic[0], float(sigma))[None])
             for sigma in cfg.blur]
    rows += [(f"{name} up-sampling instead", F.interpolate(lr, scale_factor=4, mode=mode))
             for name, mode in (("nearest-neighbour", "nearest"), ("bilinear", "bilinear"))]
    return rows + [("HR photo", hr)]


def offset_cut(offsets):
    """How much smaller than the photo each crop is: the largest offset, up to a multiple of 4 (the crops are
    degraded x4)."""
    return -(-max(offsets) // 4) * 4


def offset_spread(cfg, hr):
    """{label: [NIQE per crop offset]} of bicubic, nearest-neighbour and the HR photo itself; hr (3, H, W)."""
    offsets = [int(n) for n in cfg.offsets]
    h, w = hr.shape[1] - offset_cut(offsets), hr.shape[2] - offset_cut(offsets)
    spread = {}
    for offset in offsets:
        crop = hr[:, offset:offset + h, offset:offset + w][None]  # (1, 3, h, w)
        lr = degrade_bicubic(crop[0], 4)[None]  # (1, 3, h / 4, w / 4)
        for label, image in (("bicubic", F.interpolate(lr, scale_factor=4, mode="bicubic")),
                             ("nearest-neighbour", F.interpolate(lr, scale_factor=4, mode="nearest")),
                             ("HR photo", crop)):
            spread.setdefault(label, []).append(niqe(to_8bit(image)).item())
    return spread


def main(argv=None):
    cfg = parse(NIQEProbeConfig, argv)
    if not cfg.offsets or not all(n.isdigit() and int(n) <= 16 for n in cfg.offsets):
        sys.exit(f"error: --offsets take whole numbers from 0 to 16, got {' '.join(cfg.offsets)}")
    cut = offset_cut([int(n) for n in cfg.offsets])
    if cfg.crop and cfg.crop // 16 * 16 - cut < NIQE_MIN_SIZE:  # heldout_set cuts crops to multiples of 16
        sys.exit(f"error: --crop {cfg.crop} less the largest offset ({cut}) is under {NIQE_MIN_SIZE} px, too small "
                 "for NIQE")
    print("config:\n" + describe(cfg))
    generator = torch.Generator().manual_seed(cfg.eval_seed)
    table, names, spreads = {}, [], []
    for name, hr, lrs in heldout_set(cfg):
        names.append(name)
        spreads.append(offset_spread(cfg, hr))
        lr = lrs["bicubic"][None]  # (1, 3, H/4, W/4)
        bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic")  # (1, 3, H, W)
        for label, image in variants(cfg, lr, bicubic, hr[None], generator):
            image = to_8bit(image)
            table.setdefault(label, []).append((psnr_y(image, hr[None]).item(), niqe(image).item()))
    print("\n| bicubic output | " + " | ".join(names) + " | mean NIQE |\n|---|" + "---|" * (len(names) + 1))
    for label, scores in table.items():
        cells = " | ".join(f"{p:.2f} / {q:.2f}" for p, q in scores)
        print(f"| {label} | {cells} | {sum(q for _, q in scores) / len(scores):.2f} |")
    print("\ncells: PSNR-Y dB / NIQE (lower NIQE = judged more natural)")
    labels = list(spreads[0])
    print(f"\nNIQE of crops offset by {', '.join(cfg.offsets)} px:\n\n| photo | " + " | ".join(labels)
          + " |\n|---|" + "---|" * len(labels))
    for name, spread in zip(names, spreads):
        print(f"| {name} | " + " | ".join(f"{statistics.mean(v):.2f} +- {statistics.pstdev(v):.2f} "
                                       f"({min(v):.1f}-{max(v):.1f})" for v in spread.values()) + " |")
    print("\ncells: mean +- standard deviation (lowest-highest) over the offsets")


if __name__ == "__main__":
    run_main(main)
