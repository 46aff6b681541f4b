"""What bf16 costs in quality: the same model run in fp32 and in bf16 on the held-out photos.

    python bench/dtype_quality.py                                            # the bundled model
    python bench/dtype_quality.py --checkpoint CKPT --base SD21_DIR           # any model sample.py loads

For each held-out photo and input kind (bicubic x4; bicubic x4 + JPEG 75; Real-ESRGAN's pipeline): the PSNR
between the bf16 and the fp32 result (how far bf16 moves the output), and PSNR-Y / NIQE of both against the
HR photo (whether that move matters). Results are rounded to 8 bit first, as the written files are.
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
from reproduce import heldout_set  # noqa: E402


@dataclass
class DtypeQualityConfig:
    """Run one model in fp32 and in bf16 on the held-out photos and compare."""
    checkpoint: str = flag(os.path.join(ROOT, "models", "flowsr-tiny.safetensors"), "model to test")
    base: str = flag("", "SD 2.1-base for a LoRA checkpoint")
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "HR photos")
    crop: int = flag(0, "centre crops of this HR size (0: whole photos)", low=0)
    eval_seed: int = flag(0, "seed of the Real-ESRGAN degradation (as reproduce.py's)")


def main(argv=None):
    cfg = parse(DtypeQualityConfig, argv)
    print("config:\n" + describe(cfg))
    models = {name: FlowSR.load(cfg.checkpoint, base=cfg.base or None, dtype=dtype).eval()
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print("| photo | input | PSNR bf16 vs fp32 | PSNR-Y fp32 / bf16 | NIQE fp32 / bf16 | s fp32 / bf16 |")
    print("|---|---|---|---|---|---|")
    between = []
    for name, hr, kinds in heldout_set(cfg):
        for kind, lr in kinds.items():
            out, seconds = {}, {}
            for dtype, model in models.items():
                start = time.perf_counter()
                out[dtype] = (super_resolve(model, lr[None]) * 255).round() / 255  # (1, 3, H, W)
                seconds[dtype] = time.perf_counter() - start
            mse = (out["bf16"] - out["fp32"]).pow(2).mean().item()
            between.append(10 * torch.log10(torch.tensor(1 / max(mse, 1e-12))).item())
            psnr = {d: psnr_y(o, hr[None]).item() for d, o in out.items()}
            quality = {d: niqe(o).item() if min(o.shape[-2:]) >= 193 else float("nan") for d, o in out.items()}
            print(f"| {name} | {kind} | {between[-1]:.1f} dB | {psnr['fp32']:.2f} / {psnr['bf16']:.2f} | "
                  f"{quality['fp32']:.2f} / {quality['bf16']:.2f} | {seconds['fp32']:.2f} / {seconds['bf16']:.2f} |",
                  flush=True)
    print(f"\nPSNR between the bf16 and fp32 results: min {min(between):.1f} dB, mean {sum(between) / len(between):.1f} dB")


if __name__ == "__main__":
    run_main(main)
