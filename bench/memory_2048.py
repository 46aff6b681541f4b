"""Peak memory of one 512 x 512 -> 2048 x 2048 super-resolution on the CPU (a measurement, not a test).

    python bench/memory_2048.py                                  # the bundled model, default tiles
    python bench/memory_2048.py --checkpoint run.safetensors --untiled

Each run is `sample.main` in its own subprocess, which reports its own RSS high-water mark
(resource.getrusage(RUSAGE_SELF).ru_maxrss) when it ends: torch allocates outside Python's heap, so
tracemalloc would not see it. A 16 x 16 input through the same model gives the baseline (interpreter, torch,
the model), so the difference is what the 2048 x 2048 image costs.
"""
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.flags import describe, flag, parse  # noqa: E402
PHOTO = os.path.join(ROOT, "photos", "train", "astronaut.png")  # 512 x 512

CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import sample
code = sample.main(sys.argv[2:])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def peak_rss_mb(argv):
    """(peak RSS in MiB, seconds) of one sample.py run in a fresh process."""
    start = time.time()
    result = subprocess.run([sys.executable, "-c", CHILD, ROOT, *argv, "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: sample.py failed: {result.stderr.strip()}")
    kb = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("maxrss_kb")))
    return kb / 1024, time.time() - start  # ru_maxrss is in KiB on Linux


@dataclass
class MemoryConfig:
    """Peak memory of one 512 x 512 -> 2048 x 2048 sample.py run on the CPU."""
    checkpoint: str = flag(os.path.join(ROOT, "models", "flowsr-tiny.safetensors"),
                           "model to run (sample.py --checkpoint)")
    untiled: bool = flag(False, "also measure without tiles (slow, large)")


def main(argv=None):
    cfg = parse(MemoryConfig, argv)
    print("config:\n" + describe(cfg))
    with tempfile.TemporaryDirectory() as work:
        checkpoint = cfg.checkpoint
        if not os.path.isfile(checkpoint):
            sys.exit(f"error: --checkpoint {checkpoint}: no such file")
        big, small = os.path.join(work, "in512.png"), os.path.join(work, "in16.png")
        Image.open(PHOTO).convert("RGB").save(big)
        Image.open(PHOTO).convert("RGB").resize((16, 16)).save(small)
        model = ["--checkpoint", checkpoint, "--device", "cpu", "--overwrite"]
        runs = [("baseline, 16 x 16 -> 64 x 64", [small, *model]),
                ("512 x 512 -> 2048 x 2048, default tiles", [big, *model])]
        if cfg.untiled:
            untiled = ["--tile-size", "0", "--vae-tile-size", "0"]
            runs.append(("512 x 512 -> 2048 x 2048, untiled", [big, *model, *untiled]))
        print(f"checkpoint: {checkpoint}")
        baseline = None
        for name, argv in runs:
            mb, seconds = peak_rss_mb(argv)
            baseline = baseline or mb
            print(f"{name:<42} peak RSS {mb:8.0f} MiB  (+{mb - baseline:6.0f} over baseline)  {seconds:6.1f} s")


if __name__ == "__main__":
    main()
