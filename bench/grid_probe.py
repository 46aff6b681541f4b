"""How much of what a model adds repeats with the 4x4 blocks of the pixel autoencoder: a number for the grid.

    python bench/grid_probe.py models/flowsr-tiny.safetensors [more checkpoints]

A pattern that repeats every 4 pixels puts its power at the block harmonics, the frequencies (i H/4, j W/4)
of the 2-D spectrum. For each held-out photo and input kind (as in reproduce.py) this takes the luma of
what the one-step model adds to bicubic up-sampling, SR - bicubic, and divides its power at the 15 block
harmonics by the mean power of their neighbouring frequencies (24 bins each, within 2 bins). About 1: no
periodic part; a block-locked grid: several times that. The row "HR - bicubic" is what a perfect model would
add, the detail the photos really lack; bicubic x4 down and up is itself periodic with 4 px, so it is not 0.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from evaluate import rgb_to_y  # noqa: E402
from flowsr import FlowSR, super_resolve  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from report import run_main  # noqa: E402
from reproduce import KINDS, heldout_set  # noqa: E402


@dataclass
class GridProbeConfig:
    """Score the 4-px periodic part of what one-step models add to bicubic up-sampling."""
    checkpoints: list = flag([], "full FlowSR checkpoints (tiny preset) to probe", positional=True)
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR test photos")
    crop: int = flag(0, "centre crops of this HR size (0: whole photos)", low=0)
    eval_seed: int = flag(0, "seed of reproduce.py's Real-ESRGAN inputs")
    period: int = flag(4, "the period looked for, in pixels (the pixel autoencoder's block)", low=1)


def block_harmonic_ratio(residual, period=4, reach=2):
    """residual (H, W) -> power at the frequencies (i H/p, j W/p), (i, j) != (0, 0), over the mean power of the
    bins within `reach` of each one (the harmonic itself left out). H and W are cut to multiples of p."""
    h, w = residual.shape[0] // period * period, residual.shape[1] // period * period
    r = residual[:h, :w].double()
    power = torch.fft.fft2(r - r.mean()).abs() ** 2  # (h, w)
    offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if (dy, dx) != (0, 0)]
    peak = near = 0.0
    for i in range(period):
        for j in range(period):
            if i == j == 0:
                continue
            fy, fx = i * h // period, j * w // period
            peak += power[fy, fx].item()
            near += sum(power[(fy + dy) % h, (fx + dx) % w].item() for dy, dx in offsets) / len(offsets)
    return peak / near


def added_luma(image, bicubic):
    """(3, H, W) each -> the luma of image - bicubic, (H, W)."""
    return (rgb_to_y(image[None]) - rgb_to_y(bicubic[None]))[0, 0]


def main(argv=None):
    cfg = parse(GridProbeConfig, argv)
    print("config:\n" + describe(cfg))
    models = {path: FlowSR.load(path).eval() for path in cfg.checkpoints}
    rows = {"HR - bicubic": []} | {path: [] for path in models}
    columns = []
    for name, hr, lrs in heldout_set(cfg):
        for kind, lr in lrs.items():
            columns.append(f"{name} {KINDS[kind]}")
            bicubic = F.interpolate(lr[None], scale_factor=4, mode="bicubic")[0]  # (3, H, W)
            rows["HR - bicubic"].append(block_harmonic_ratio(added_luma(hr, bicubic), cfg.period))
            for path, model in models.items():
                with torch.no_grad():
                    sr = super_resolve(model, lr[None], 1, tile_size=0, vae_tile_size=0)[0]
                rows[path].append(block_harmonic_ratio(added_luma(sr, bicubic), cfg.period))
    print("\n| added to bicubic | " + " | ".join(columns) + " | mean |\n|---|" + "---|" * (len(columns) + 1))
    for label, ratios in rows.items():
        print(f"| {label} | " + " | ".join(f"{r:.1f}" for r in ratios) + f" | {sum(ratios) / len(ratios):.1f} |")
    print(f"\ncells: power at the {cfg.period}-px block harmonics / power at their neighbouring frequencies")


if __name__ == "__main__":
    run_main(main)
