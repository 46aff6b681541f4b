"""Does a model help on your photos? The bundled model's three targets, checked on any folder of HR photos.

    python bench/targets.py --heldout MY_PHOTOS/ --crop 512    # the bundled model; --checkpoint for another

Each photo (a centre crop with --crop) is degraded x4 three ways, as in reproduce.py: clean bicubic, bicubic
then JPEG 75, Real-ESRGAN's pipeline. Bicubic up-sampling, Real-ESRGAN x4plus (bench/realesrgan.py; left out
with a note when its weights are missing) and the model super-resolve each input, and the targets are checked:

    fidelity    on every photo and input kind, PSNR-Y >= min(bicubic, Real-ESRGAN x4plus) - 0.5 dB
    perception  per input kind, mean NIQE at least 2 below bicubic's (photos of 208 px or more a side)
    flat        each photo blurred smooth (Gaussian sigma 4; and rocket.jpg's sky when the folder has that
                photo), clean input: PSNR-Y at most 1 dB below bicubic's

On photos of a few hundred pixels one NIQE score is noisy: moving the crop by a few pixels can move it by
several points (bench/README.md, "What NIQE rewards"). `--niqe-offsets 0 4 8 12 16` scores each output as the
mean NIQE of its crops moved right and down by those offsets, each smaller by the largest offset.

Writes OUT.json and OUT.md (default bench/results/targets.*) and prints the markdown.
"""
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from evaluate import NIQE_MIN_SIZE, niqe, psnr_y  # noqa: E402
from flowsr import FlowSR, super_resolve  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from plumbing.weights import WeightsError  # noqa: E402
from realesrgan import load_realesrgan_x4plus, upscale  # noqa: E402
from report import machine, publish, run_main  # noqa: E402
from reproduce import GET_REALESRGAN, KINDS, cached, flat_set, heldout_set, timed, to_8bit  # noqa: E402

FIDELITY_SLACK, NIQE_GAIN, FLAT_SLACK = 0.5, 2.0, 1.0  # dB, NIQE points, dB: the targets above


@dataclass
class TargetsConfig:
    """Check a model's fidelity, perception and flat-content targets on a folder of HR photos."""
    heldout: str = flag("", "folder of HR photos (ones the model never trained on; required)")
    checkpoint: str = flag(os.path.join(ROOT, "models", "flowsr-tiny.safetensors"), "the model to check")
    crop: int = flag(0, "centre crops of this HR size (0: whole photos; Real-ESRGAN is slow on large ones)", low=0)
    eval_seed: int = flag(0, "seed of the Real-ESRGAN degradation")
    work_dir: str = flag(os.path.join(ROOT, "runs", "targets"), "cache of Real-ESRGAN's outputs")
    out: str = flag(os.path.join(ROOT, "bench", "results", "targets"), "OUT.json and OUT.md are written")
    threads: int = flag(0, "torch threads (0: torch's default)")
    niqe_offsets: list = flag([], "NIQE as the mean over crops of each output moved right and down by these px "
                              "(each crop smaller by the largest; none: the whole output)")


def niqe_score(sr, offsets):
    """NIQE of sr (1, 3, H, W): of the whole image, or the mean over its crops at `offsets` (ints); None where
    the image (or crop) is under NIQE_MIN_SIZE a side."""
    cut = max(offsets, default=0)
    height, width = sr.shape[2] - cut, sr.shape[3] - cut
    if min(height, width) < NIQE_MIN_SIZE:
        return None
    crops = [sr[..., o:o + height, o:o + width] for o in offsets] or [sr]  # each (1, 3, H - cut, W - cut)
    return sum(niqe(crop).item() for crop in crops) / len(crops)


def scores(run, images, offsets=()):
    """{(photo, kind): (PSNR-Y, NIQE or None)} of one method; run(lr) -> (sr, seconds) as in reproduce.py."""
    out = {}
    for name, hr, lrs in images:
        for kind, lr in lrs.items():
            sr, _ = run(lr[None])
            sr = to_8bit(sr)  # (1, 3, H, W)
            out[name, kind] = (psnr_y(sr, hr[None]).item(), niqe_score(sr, offsets))
    return out


def check(results, images, flat_delta):
    """[(target, kind or photo, passed, what was measured)] from the scores of bicubic, the peer and the model."""
    bicubic, model, peer = results["bicubic"], results["model"], results.get("realesrgan")
    verdicts = []
    for name, _, lrs in images:
        for kind in lrs:
            floor = min(bicubic[name, kind][0], peer[name, kind][0] if peer else float("inf")) - FIDELITY_SLACK
            margin = model[name, kind][0] - floor
            verdicts.append(("fidelity", f"{name}, {KINDS[kind]}", margin >= 0, f"{margin:+.2f} dB over the floor"))
    for kind in KINDS:
        pairs = [(bicubic[name, kind][1], model[name, kind][1]) for name, _, _ in images
                 if model[name, kind][1] is not None]
        if pairs:
            mean_bicubic, mean_model = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
            verdicts.append(("perception", KINDS[kind], mean_model <= mean_bicubic - NIQE_GAIN,
                             f"NIQE {mean_model:.2f} against bicubic {mean_bicubic:.2f} ({len(pairs)} photos)"))
        else:
            verdicts.append(("perception", KINDS[kind], False, f"not measured: no photo of {NIQE_MIN_SIZE} px a side"))
    verdicts += [("flat", label, delta >= -FLAT_SLACK, f"{delta:+.2f} dB against bicubic")
                 for label, delta in flat_delta.items()]
    return verdicts


def markdown(report):
    results, labels = report["results"], report["labels"]
    m = report["machine"]
    lines = [f"# Targets of {report['checkpoint']}", "", f"{m['date']}; {m['cpu']}, {m['cores']} cores, torch "
             f"{m['torch']} on {m['torch_threads']} threads; {report['seconds'] / 60:.1f} min. Command: "
             f"`{report['command']}`", "", "Photos: " + ", ".join(report["photos"]) + ".", "",
             "| photo | input | " + " | ".join(labels.values()) + " |", "|---|---" + "|---" * len(labels) + "|"]
    for key in results["bicubic"]:
        name, kind = key.rsplit("|", 1)
        cells = []
        for method in labels:
            psnr, score = results[method][key]
            cells.append(f"{psnr:.2f} / {'-' if score is None else f'{score:.2f}'}")
        lines.append(f"| {name} | {KINDS[kind]} | {' | '.join(cells)} |")
    offsets = report["config"]["niqe_offsets"]
    how = f"mean of the crops at offsets {', '.join(offsets)} px" if offsets else "of the whole output"
    lines += ["", f"Cells: PSNR-Y dB / NIQE ({how}; -: photo too small for NIQE).", "",
              "| target | case | met | measured |", "|---|---|---|---|"]
    lines += [f"| {target} | {case} | {'yes' if ok else '**no**'} | {measured} |"
              for target, case, ok, measured in report["verdicts"]]
    return "\n".join(lines + [""] + [f"- {note}" for note in report["notes"]]) + "\n"


def main(argv=None):
    command = " ".join(["python bench/targets.py", *(sys.argv[1:] if argv is None else argv)])
    cfg = parse(TargetsConfig, argv)
    if not cfg.heldout or not os.path.isdir(cfg.heldout):
        sys.exit(f"error: --heldout {cfg.heldout!r}: not a folder of photos")
    if 0 < cfg.crop < 208:  # crops are cut to multiples of 16, and NIQE needs 193 px a side
        sys.exit(f"error: --crop {cfg.crop}: NIQE needs at least 208")
    if not all(n.isdigit() for n in cfg.niqe_offsets):
        sys.exit(f"error: --niqe-offsets take whole numbers of pixels, got {' '.join(cfg.niqe_offsets)}")
    offsets = [int(n) for n in cfg.niqe_offsets]
    if cfg.crop and cfg.crop // 16 * 16 - max(offsets, default=0) < NIQE_MIN_SIZE:
        sys.exit(f"error: --crop {cfg.crop} less the largest --niqe-offsets ({max(offsets)}) is under "
                 f"{NIQE_MIN_SIZE} px, too small for NIQE")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print("config:\n" + describe(cfg), flush=True)
    started, notes = time.time(), []
    try:
        model = FlowSR.load(cfg.checkpoint).eval()
    except WeightsError as error:
        sys.exit(f"error: {error}")
    images = heldout_set(cfg)
    methods = {"bicubic": ("Bicubic", lambda lr: (F.interpolate(lr, scale_factor=4, mode="bicubic"), 0.0))}
    try:
        peer = load_realesrgan_x4plus()
        methods["realesrgan"] = ("Real-ESRGAN x4plus", cached(timed(lambda lr: upscale(peer, lr)), cfg.work_dir))
    except ValueError as error:
        notes.append(f"Real-ESRGAN x4plus left out ({error}), so the fidelity floor is bicubic's; {GET_REALESRGAN}.")
    methods["model"] = (os.path.basename(cfg.checkpoint), timed(lambda lr: super_resolve(
        model, lr, 1, tile_size=0, vae_tile_size=0)))
    with torch.no_grad():
        results = {key: scores(run, images, offsets) for key, (_, run) in methods.items()}
        flat_delta = {}
        for label, hr, lr in flat_set(cfg, images):
            psnr = {}
            for key in ("bicubic", "model"):
                sr, _ = methods[key][1](lr[None])
                psnr[key] = psnr_y(to_8bit(sr), hr[None]).item()
            flat_delta[label] = psnr["model"] - psnr["bicubic"]
    verdicts = check(results, images, flat_delta)
    report = {"command": command, "config": asdict(cfg), "machine": machine(), "seconds": time.time() - started,
              "checkpoint": os.path.relpath(cfg.checkpoint, ROOT), "notes": notes, "verdicts": verdicts,
              "photos": [f"{name} {hr.shape[2]}x{hr.shape[1]}" for name, hr, _ in images],
              "labels": {key: label for key, (label, _) in methods.items()},
              "results": {key: {f"{name}|{kind}": v for (name, kind), v in r.items()} for key, r in results.items()}}
    publish(cfg.out, report, markdown(report))


if __name__ == "__main__":
    run_main(main)
