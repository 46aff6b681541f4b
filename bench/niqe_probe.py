"""What NIQE rewards: bicubic up-sampling of the held-out photos with something added, scored like the models.

    python bench/niqe_probe.py

Each held-out photo is degraded by bicubic x4 (as in reproduce.py) and up-sampled again by bicubic; to that
result is added (a) a share of the detail it lacks, HR - bicubic (real detail, as a perfect model would add it),
(b) grey Gaussian noise of a few 8-bit levels, identical in R, G and B (grain that carries no information), or
(c) unsharp masking (sharper edges, no new texture), or (d) a share of HR - bicubic shifted by a few pixels
(texture of the right amount and kind in the wrong place: what a model that synthesises texture gives at best,
and what a model that must be right pixel by pixel cannot give). Every image is rounded to 8 bit, then scored by PSNR-Y
against the HR photo and by NIQE (evaluate.niqe). It shows how far NIQE can be moved without restoring
anything, which is why the reproduction's picture matters as much as its NIQE column.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from data import gaussian_blur  # noqa: E402
from evaluate import niqe, psnr_y  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from report import run_main  # noqa: E402
from reproduce import heldout_set, to_8bit  # noqa: E402


@dataclass
class NIQEProbeConfig:
    """Score bicubic up-sampling plus real detail, grain, sharpening or misplaced detail by PSNR-Y and NIQE."""
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR test photos")
    crop: int = flag(0, "centre crops of this HR size (0: whole photos)", low=0)
    eval_seed: int = flag(0, "seed of the noise (and of reproduce.py's Real-ESRGAN inputs, unused here)")
    detail: list = flag(["0.25", "0.5"], "shares of HR - bicubic to add back")
    noise: list = flag(["1", "2", "4"], "std of the grey noise, in 8-bit levels")
    unsharp: list = flag(["0.5", "1"], "amounts of unsharp masking (Gaussian sigma 1)")
    shifted: list = flag(["0.25", "0.5"], "shares of HR - bicubic to add back shifted by (7, 11) px")


def variants(cfg, bicubic, hr, generator):
    """[(label, image)]: bicubic itself, then each addition, all (1, 3, H, W) before rounding."""
    rows = [("bicubic", bicubic)]
    rows += [(f"+ {share} of the missing detail", bicubic + float(share) * (hr - bicubic)) for share in cfg.detail]
    grain = torch.randn(bicubic[:, :1].shape, generator=generator)  # (1, 1, H, W): the same in R, G and B
    rows += [(f"+ grey noise, std {std} levels", bicubic + float(std) / 255 * grain) for std in cfg.noise]
    blurred = gaussian_blur(bicubic[0], 1.0)[None]
    rows += [(f"unsharp masking, amount {amount}", bicubic + float(amount) * (bicubic - blurred))
             for amount in cfg.unsharp]
    misplaced = (hr - bicubic).roll((7, 11), dims=(2, 3))  # uncorrelated with the photo's own detail
    rows += [(f"+ {share} of the missing detail, shifted by (7, 11) px", bicubic + float(share) * misplaced)
             for share in cfg.shifted]
    return rows + [("HR photo", hr)]


def main(argv=None):
    cfg = parse(NIQEProbeConfig, argv)
    print("config:\n" + describe(cfg))
    generator = torch.Generator().manual_seed(cfg.eval_seed)
    table, names = {}, []
    for name, hr, lrs in heldout_set(cfg):
        names.append(name)
        bicubic = F.interpolate(lrs["bicubic"][None], scale_factor=4, mode="bicubic")  # (1, 3, H, W)
        for label, image in variants(cfg, bicubic, hr[None], generator):
            image = to_8bit(image)
            table.setdefault(label, []).append((psnr_y(image, hr[None]).item(), niqe(image).item()))
    print("\n| bicubic output | " + " | ".join(names) + " | mean NIQE |\n|---|" + "---|" * (len(names) + 1))
    for label, scores in table.items():
        cells = " | ".join(f"{p:.2f} / {q:.2f}" for p, q in scores)
        print(f"| {label} | {cells} | {sum(q for _, q in scores) / len(scores):.2f} |")
    print("\ncells: PSNR-Y dB / NIQE (lower NIQE = judged more natural)")


if __name__ == "__main__":
    run_main(main)
