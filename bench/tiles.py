"""Tiles of the velocity network: what their size does to time and quality, against one pass over the image.

    python bench/tiles.py                                        # the bundled model on the held-out photos
    python bench/tiles.py --heldout MY_PHOTOS/ --crop 1024       # larger photos: more tiles

The tiny model's self-attention learned on 16 x 16 latents (64-px training crops); one pass over a large image
attends over thousands of latent pixels, at a cost quadratic in the area. For each --tiles entry (latent tile
size / overlap; 0/0 is one pass): the seconds for all images, and mean PSNR-Y / NIQE per input kind (bicubic x4;
bicubic x4 + JPEG 75; Real-ESRGAN's pipeline) of the results rounded to 8 bit, as the written files are.
"""
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from evaluate import niqe, psnr_y  # noqa: E402
from flowsr import FlowSR, super_resolve  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from report import run_main  # noqa: E402
from reproduce import KINDS, niqe_heldout_set, to_8bit  # noqa: E402


@dataclass
class TilesConfig:
    """Run one model with several latent tile sizes and compare time and quality."""
    checkpoint: str = flag(os.path.join(ROOT, "models", "flowsr-tiny.safetensors"), "model to test")
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR photos")
    crop: int = flag(0, "centre crops of this HR size (0: whole photos)", low=0)
    eval_seed: int = flag(0, "seed of the Real-ESRGAN degradation (as reproduce.py's)")
    tiles: list = flag(["0/0", "128/32", "96/32", "64/16", "32/8"], "latent tile size / overlap pairs (0/0: one pass)")
    threads: int = flag(2, "torch threads", low=1)


def parse_tiles(entries, multiple):
    """[(size, overlap)] of the SIZE/OVERLAP entries: sizes that the UNet can take (multiples of `multiple`)."""
    try:
        tiles = [tuple(int(n) for n in entry.split("/")) for entry in entries]
    except ValueError:
        tiles = []
    if not tiles or any(len(t) != 2 or t[1] < 0 or t[0] % multiple or (t[0] and t[1] >= t[0]) for t in tiles):
        raise ValueError(f"--tiles {' '.join(entries)}: give SIZE/OVERLAP pairs with 0 <= OVERLAP < SIZE and SIZE a "
                         f"multiple of {multiple}, or 0/0")
    return tiles


def main(argv=None):
    cfg = parse(TilesConfig, argv)
    print("config:\n" + describe(cfg))
    torch.set_num_threads(cfg.threads)
    model = FlowSR.load(cfg.checkpoint).eval()
    tiles = parse_tiles(cfg.tiles, model.tile_multiple)
    images = niqe_heldout_set(cfg)
    print(f"{len(images)} photos: " + ", ".join(f"{name} {hr.shape[2]}x{hr.shape[1]}" for name, hr, _ in images))
    print("| latent tiles | s | " + " | ".join(f"{KINDS[kind]} PSNR-Y / NIQE" for kind in KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    with torch.no_grad():
        for size, overlap in tiles:
            scores, start = {kind: [] for kind in KINDS}, time.perf_counter()
            for name, hr, lrs in images:
                for kind, lr in lrs.items():
                    sr = to_8bit(super_resolve(model, lr[None], 1, tile_size=size, tile_overlap=overlap,
                                               vae_tile_size=0))  # (1, 3, H, W)
                    scores[kind].append((psnr_y(sr, hr[None]).item(), niqe(sr).item()))
            seconds = time.perf_counter() - start  # NIQE's share is the same in every row
            label = f"{size} / {overlap}" if size else "one pass"
            cells = [f"{sum(p for p, _ in s) / len(s):.3f} / {sum(q for _, q in s) / len(s):.2f}"
                     for s in scores.values()]
            print(f"| {label} | {seconds:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    run_main(main)
