"""How the texture temperature trades fidelity for naturalness, and where the detail that NIQE rewards lies.

    python bench/texture_probe.py --threads 1      # the bundled model; --checkpoint for another

The tiny model adds texture of the amount its predictor expects where the input cannot say what the detail is
(texture.py): x_SR + T sum_k sqrt(v_k) n_k. This probe scores the model on the held-out photos (the three input
kinds of bench/targets.py) at several temperatures T and noise seeds, next to bicubic and Real-ESRGAN x4plus,
checks the fidelity and perception targets for each, and scores flat content (each photo blurred, and rocket's sky)
with clean and JPEG inputs.

The oracle rows add texture whose local amount is measured on the HR photo itself (each band's RMS over 9 px of
grey(HR - bicubic)): the best any predictor of the amount could do, at T = 0.25 on clean inputs. `--gate-floors`
multiply it by a detail gate on the bicubic input (local contrast over 7 px less the floor in 8-bit levels,
d / (d + 2.55 levels); the tiny model's FlowSR.detail_gate has a floor of 3 levels): they show how much of what
NIQE rewards lies where the bicubic input is smooth to within a few grey levels.

Writes OUT.json and OUT.md (default bench/results/texture_probe.*) and prints the markdown.
"""
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from evaluate import psnr_y  # noqa: E402
from flowsr import FlowSR, super_resolve  # noqa: E402
from plumbing.flags import describe, flag, parse  # noqa: E402
from realesrgan import load_realesrgan_x4plus, upscale  # noqa: E402
from report import machine, publish, run_main  # noqa: E402
from reproduce import KINDS, cached, flat_set, heldout_set, jpeg, timed, to_8bit  # noqa: E402
from targets import FIDELITY_SLACK, FLAT_SLACK, NIQE_GAIN, niqe_score  # noqa: E402
from texture import bands, bicubic_x4, grey, unit_bands  # noqa: E402

ORACLE_WINDOW = 9  # px over which the oracle measures the HR photo's local energy


@dataclass
class TextureProbeConfig:
    """Score the tiny model's texture at several temperatures and seeds, and the oracle's, on the targets."""
    heldout: str = flag(os.path.join(ROOT, "photos", "heldout"), "folder of HR photos the model never trained on")
    checkpoint: str = flag(os.path.join(ROOT, "models", "flowsr-tiny.safetensors"), "a model with a texture predictor")
    temperatures: list = flag(["0.125", "0.25", "0.5"], "temperatures T of the texture rows")
    seeds: list = flag(["0", "1", "2"], "noise seeds of each texture row (their spread is part of the result)")
    gate_floors: list = flag(["0.5", "1", "3"], "grey levels: floors of the oracle's gated rows")
    niqe_offsets: list = flag(["0", "4", "8", "12", "16"], "NIQE as the mean over crops at these offsets "
                              "(bench/targets.py --niqe-offsets; none: the whole image)")
    work_dir: str = flag(os.path.join(ROOT, "runs", "targets"), "cache of Real-ESRGAN's outputs")
    out: str = flag(os.path.join(ROOT, "bench", "results", "texture_probe"), "OUT.json and OUT.md are written")
    threads: int = flag(0, "torch threads (0: torch's default)")


def oracle_texture(x, hr, seed=0):
    """texture.py's draw with each band's local amount measured on the HR photo itself (RMS over ORACLE_WINDOW
    px of grey(hr - x)); x, hr (1, 3, H, W) -> (1, 1, H, W)."""
    detail = bands(grey(hr - x))  # (1, K, H, W)
    amount = F.avg_pool2d(detail ** 2, ORACLE_WINDOW, 1, ORACLE_WINDOW // 2, count_include_pad=False).sqrt()
    return (unit_bands(*x.shape[-2:], seed, x.device) * amount).sum(1, keepdim=True)


def detail_gate(x, floor):
    """(B, 1, H, W) in [0, 1): local contrast of x over 7 px less `floor` (8-bit levels), d / (d + 2.55 levels)."""
    contrast = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean(1, keepdim=True)
    d = (F.max_pool2d(contrast, 7, 1, 3) - floor / 255).clamp(min=0)
    return d / (d + 0.01)


def scored_rows(cfg, model, images, notes):
    """{row: {(photo, kind): (PSNR-Y, NIQE)}} for bicubic, Real-ESRGAN, the model without and with texture (one row
    per temperature and seed) and the oracle's; and {T: {flat case: PSNR-Y - bicubic's}} (texture seed 0)."""
    offsets = [int(n) for n in cfg.niqe_offsets]
    one_step = lambda lr, t=0.0, seed=0: super_resolve(model, lr, 1, tile_size=0, vae_tile_size=0, texture=t,
                                                       generator=torch.Generator().manual_seed(seed))
    bases = {"bicubic": bicubic_x4, "model": one_step}
    try:
        peer = load_realesrgan_x4plus()
        run_peer = cached(timed(lambda lr: upscale(peer, lr)), cfg.work_dir)
        bases["realesrgan"] = lambda lr: run_peer(lr)[0]
    except ValueError as error:
        notes.append(f"Real-ESRGAN x4plus left out ({error}): the fidelity floor is bicubic's")
    rows, flat = {}, {}

    def add(row, key, sr, hr):
        sr = to_8bit(sr)
        rows.setdefault(row, {})[key] = (psnr_y(sr, hr).item(), niqe_score(sr, offsets))

    for name, hr, lrs in images:
        hr = hr[None]
        for kind, lr in lrs.items():
            for key, run in bases.items():
                add(key, (name, kind), run(lr[None]), hr)
            for t in cfg.temperatures:
                for seed in cfg.seeds:
                    add(f"model, T {t}, seed {seed}", (name, kind), one_step(lr[None], float(t), int(seed)), hr)
            if kind == "bicubic":
                x = bicubic_x4(lr[None])
                for floor in ["none", *cfg.gate_floors]:
                    gate = 1 if floor == "none" else detail_gate(x, float(floor))
                    add(f"bicubic + oracle texture, T 0.25, gate floor {floor}", (name, kind),
                        x + 0.25 * gate * oracle_texture(x, hr), hr)
    for label, hr, lr in flat_set(cfg, images):
        for kind, lr_kind in (("clean", lr), ("JPEG 75", jpeg(lr, 75))):
            reference = psnr_y(to_8bit(bicubic_x4(lr_kind[None])), hr[None]).item()
            for t in ["0", *cfg.temperatures]:
                sr = to_8bit(one_step(lr_kind[None], float(t)))
                flat.setdefault(f"T {t}", {})[f"{label}, {kind}"] = psnr_y(sr, hr[None]).item() - reference
    return rows, flat


def verdicts(rows, images):
    """{texture row: (lowest fidelity margin dB, {kind: NIQE - bicubic's}, all targets but flat met)}."""
    out = {}
    peer = rows.get("realesrgan", rows["bicubic"])
    floor_of = lambda key: min(rows["bicubic"][key][0], peer[key][0]) - FIDELITY_SLACK
    for row, scores in rows.items():
        if not row.startswith("model, T"):
            continue
        margin = min(scores[key][0] - floor_of(key) for key in scores)
        gains = {kind: statistics.mean(scores[name, kind][1] - rows["bicubic"][name, kind][1] for name, _, _ in images)
                 for kind in KINDS}
        out[row] = (margin, gains, margin >= 0 and all(g <= -NIQE_GAIN for g in gains.values()))
    return out


def markdown(report):
    m, rows = report["machine"], report["rows"]
    photos = sorted({key.split("|")[0] for key in rows["bicubic"]})
    lines = [f"# Texture probe on {', '.join(photos)}", "", f"{m['date']}; {m['cpu']}, {m['cores']} cores, torch "
             f"{m['torch']} on {m['torch_threads']} threads; {report['seconds'] / 60:.1f} min. Model: "
             f"{report['checkpoint']}. Command: `{report['command']}`", "",
             "Mean PSNR-Y dB / NIQE over the photos (NIQE: " + (f"mean over the crops at offsets "
             f"{', '.join(report['config']['niqe_offsets'])} px" if report["config"]["niqe_offsets"] else "whole image")
             + "):", "", "| row | " + " | ".join(KINDS.values()) + " |", "|---|---|---|---|"]
    for row, scores in rows.items():
        cells = []
        for kind in KINDS:
            values = [v for key, v in scores.items() if key.endswith("|" + kind)]
            cells.append(f"{statistics.mean(v[0] for v in values):.2f} / {statistics.mean(v[1] for v in values):.2f}"
                         if values else "-")
        lines.append(f"| {row} | {' | '.join(cells)} |")
    lines += ["", f"Targets of the texture rows (fidelity: lowest margin over min(bicubic, Real-ESRGAN) - "
              f"{FIDELITY_SLACK} dB; perception: mean NIQE - bicubic's, target <= -{NIQE_GAIN}):", "",
              "| row | fidelity margin | NIQE gain " + " | ".join(KINDS.values()) + " | both met |",
              "|---|---|---|---|---|---|"]
    for row, (margin, gains, met) in report["verdicts"].items():
        lines.append(f"| {row} | {margin:+.2f} dB | " + " | ".join(f"{gains[k]:+.2f}" for k in KINDS)
                     + f" | {'yes' if met else 'no'} |")
    cases = list(next(iter(report["flat"].values())))
    lines += ["", f"Flat content (target: at most {FLAT_SLACK} dB below bicubic), PSNR-Y - bicubic's, texture seed 0:",
              "", "| T | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(f"{d:+.2f}" for d in deltas.values()) + " |"
              for row, deltas in report["flat"].items()]
    return "\n".join(lines + [""] + [f"- {note}" for note in report["notes"]]) + "\n"


def main(argv=None):
    command = " ".join(["python bench/texture_probe.py", *(sys.argv[1:] if argv is None else argv)])
    cfg = parse(TextureProbeConfig, argv)
    numbers = cfg.temperatures + cfg.seeds + cfg.gate_floors + cfg.niqe_offsets
    if not all(n.replace(".", "", 1).isdigit() for n in numbers):
        sys.exit(f"error: --temperatures, --seeds, --gate-floors and --niqe-offsets take numbers >= 0, got {numbers}")
    if not all(n.isdigit() for n in cfg.seeds + cfg.niqe_offsets):
        sys.exit("error: --seeds and --niqe-offsets take whole numbers")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print("config:\n" + describe(cfg), flush=True)
    started, notes = time.time(), []
    model = FlowSR.load(cfg.checkpoint).eval()
    if model.texture is None:
        sys.exit(f"error: {cfg.checkpoint} has no texture predictor (texture.py)")
    cfg.crop, cfg.eval_seed = 0, 0  # heldout_set's settings: whole photos, the reproduction's degradation seed
    images = heldout_set(cfg)
    with torch.no_grad():
        rows, flat = scored_rows(cfg, model, images, notes)
    report = {"command": command, "config": asdict(cfg), "machine": machine(), "seconds": time.time() - started,
              "checkpoint": os.path.relpath(cfg.checkpoint, ROOT), "notes": notes, "flat": flat,
              "verdicts": verdicts(rows, images),
              "rows": {row: {f"{name}|{kind}": v for (name, kind), v in scores.items()}
                       for row, scores in rows.items()}}
    publish(cfg.out, report, markdown(report))


if __name__ == "__main__":
    run_main(main)
