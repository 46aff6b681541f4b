"""One-step FlowSR super-resolution from the command line: x4 in one network evaluation (SPEC 2, 7).

    python sample.py photo.png                      # -> photo_x4.png, with the bundled tiny model
    python sample.py shots/ -o out/ --compare       # a folder; also writes side-by-side comparisons
    python sample.py in.png --base SD21_DIR --checkpoint flowsr.safetensors   # the published weights
    python sample.py in.png --checkpoint runs/tiny/stage2.safetensors        # any train.py model
    torchrun --nproc_per_node=4 sample.py shots/ -o out/                     # a folder split over 4 processes
    python sample.py frames/ -o out/ --batch-size 8                          # same-size frames 8 at a time

The pipeline is flowsr.super_resolve: up(x_LR) -> z_L = s * E(x) -> flow.sample (one Euler step, or N on
the shifted grid) -> D(z_H / s) -> colour fix, following the published FlowSR inference code (SPEC 7).
This file is the command line around it: files in and out, flags, errors, and torchrun.

Files: any image Pillow reads (EXIF orientation applied; grayscale, palette and CMYK become RGB; 16-bit
grayscale and float images are read at full precision, 16-bit RGB as Pillow gives it, in 8 bits). An RGB colour
profile (ICC: Display P3, Adobe RGB) is written with the output, whose values are in that colour space. Transparency
is not super-resolved: the alpha channel is upscaled on its own (bicubic) and written back (dropped for a JPEG
output). A bad input gives one error line and the others go on; the exit code is 1 if any failed. Outputs
are written atomically, never over an input, and over an existing file only with --overwrite. Folders and glob
patterns skip earlier results (NAME_x4.png and NAME_x4_compare.png); a file named on its own is always processed.
"""
import glob
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import flowsr
from data import (COMPARE_SUFFIX, IMAGE_EXTENSIONS, SAVE_FORMATS, SR_SUFFIX, ImageError, is_result, list_images,
                  load_image, save_image)
from flowsr import FlowSR
from plumbing.flags import describe, device_problem, flag, parse
from plumbing.paths import path_key
from plumbing.weights import WeightsError, first_line
from texture import DEFAULT_TEMPERATURE

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_MODEL = os.path.join(HERE, "models", "flowsr-tiny.safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class SampleConfig:
    """Super-resolve images x4 with FlowSR."""
    inputs: list = flag([], "input images, folders or glob patterns", positional=True)
    output: str = flag("", "output file (one input; .png/.jpg/.webp) or folder (default: NAME_x4.png beside "
                       "each input)", short="-o")
    checkpoint: str = flag(BUNDLED_MODEL, "a train.py checkpoint, or a FlowSR LoRA checkpoint (with --base)")
    base: str = flag("", "SD 2.1-base diffusers folder or single file, for LoRA checkpoints "
                     "(default: the one a train.py run recorded)")
    steps: int = flag(1, "Euler steps (1: one-step SR; more use the shifted flow-matching grid)")
    shift: float = flag(3.0, "time shift of the multi-step grid")
    prompt: str = flag("", "prompt whose CLIP embedding conditions an SD-based model "
                       "(default: its training prompt, or the FlowSR prompt)")
    cache_dir: str = flag(os.path.join(os.path.expanduser("~"), ".cache", "flowsr"),
                          "where prompt embeddings are cached")
    color_fix: str = flag("wavelet", "colour correction against the upsampled input",
                          choices=("wavelet", "adain", "none"))
    upsample: str = flag("model", "up(x_LR) mode (model: the one it was trained with; published weights: bilinear)",
                         choices=("model", "bilinear", "bicubic"))
    tile_size: int = flag(-1, "latent tile size of the velocity network (0: no tiles; -1: the model's own, 96 for "
                          "SD as the published code, 64 for the tiny model)")
    tile_overlap: int = flag(-1, "latent tile overlap (-1: the model's own, 32 for SD, 16 for the tiny model)")
    vae_tile_size: int = flag(768, "largest VAE tile in image pixels; larger images run in equal overlapping tiles "
                                   "(0: no tiles)")
    posterior: str = flag("mean", "z_L from the posterior mean, or a sample of it as the published code does",
                          choices=("mean", "sample"))
    texture: float = flag(DEFAULT_TEMPERATURE, "temperature of the texture the tiny model draws where the input "
                          "cannot say what the detail is (texture.py; 0: none, 1: the whole predicted amount)", low=0)
    seed: int = flag(0, "seed of --posterior sample and of the texture (each image starts from it)")
    batch_size: int = flag(1, "consecutive inputs of the same size go through the networks together, up to this "
                           "many (memory grows with it; a GPU gains most)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "compute precision (auto: bf16 where the hardware computes it natively, else fp32)",
                      choices=("auto", *DTYPES))
    max_pixels: int = flag(1024 * 1024, "refuse inputs with more pixels than this (keeps a 24 GB machine safe)")
    compare: bool = flag(False, "also write NAME_x4_compare.png: upsampled input | result")
    overwrite: bool = flag(False, "replace existing output files (never an input)")
    verbose: bool = flag(False, "print the configuration first, and progress bars of the tiles", short="-v")
    quiet: bool = flag(False, "print errors only", short="-q")


def model_tiles(cfg, model):
    """(latent tile size, overlap) of the velocity network: the flags, or the model's own where they are -1."""
    return (model.default_tile_size if cfg.tile_size < 0 else cfg.tile_size,
            model.default_tile_overlap if cfg.tile_overlap < 0 else cfg.tile_overlap)


def super_resolve(model, lr, cfg, generator=None, progress=False):
    """lr: (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1], with the options of the command line."""
    return flowsr.super_resolve(model, lr, cfg.steps, cfg.shift, cfg.color_fix,
                                None if cfg.upsample == "model" else cfg.upsample,
                                *model_tiles(cfg, model), cfg.vae_tile_size, cfg.posterior, generator, progress,
                                texture=cfg.texture)


# ---- files -----------------------------------------------------------------------------------------------

def expand_inputs(patterns):
    """(paths, errors): [(path, path relative to the folder it came from)]; what matches nothing is an error.
    A file named on its own is always taken; folders (and folders a glob matches) give their images, globs the
    image files they match, both without earlier results."""
    paths, errors = [], []
    for pattern in patterns:
        if os.path.exists(pattern) and not os.path.isdir(pattern):
            paths.append((pattern, os.path.basename(pattern)))
            continue
        if os.path.isdir(pattern):
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else []
        if not matches:
            errors.append(f"{pattern}: no such file or folder")
            continue
        images = []  # (path, relative path)
        for match in matches:
            if os.path.isdir(match):
                images += [(p, os.path.relpath(p, match)) for p in list_images(match)]
            elif os.path.isfile(match) and is_image_name(match):
                images.append((match, os.path.basename(match)))
        found = [(p, relative) for p, relative in images if not is_result(p)]
        paths += found
        if images and not found:
            errors.append(f"{pattern}: only earlier results ({SR_SUFFIX}.png, {COMPARE_SUFFIX}.png); "
                          "name one to process it again")
        elif not found:
            errors.append(f"{pattern}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, errors


def is_image_name(path):
    """An extension Pillow reads (a glob takes those; a folder only the common IMAGE_EXTENSIONS)."""
    extension = os.path.splitext(path)[1].lower()
    return extension in IMAGE_EXTENSIONS or Image.registered_extensions().get(extension) in Image.OPEN


def names_a_file(output):
    """-o photo.png (or any image extension Pillow knows, writable or not) names a file, unless it is an existing
    folder; anything else names a folder."""
    extension = os.path.splitext(output)[1].lower()
    return (extension in IMAGE_EXTENSIONS or extension in Image.registered_extensions()) and not os.path.isdir(output)


def plan_outputs(paths, cfg):
    """([(input, output)], errors): one output per input (an input given twice is done once), no output file
    (nor its --compare image) an input or another input's output."""
    inputs = {path_key(p) for p, _ in paths}
    jobs, errors, taken, done = [], [], {}, set()
    for path, relative in paths:
        key = path_key(path)
        if key in done:
            continue
        done.add(key)
        name = os.path.splitext(relative)[0] + SR_SUFFIX + ".png"
        if not cfg.output:
            out = os.path.join(os.path.dirname(path), os.path.basename(name))
        else:
            out = cfg.output if names_a_file(cfg.output) else os.path.join(cfg.output, name)
        written = {path_key(p): os.path.realpath(p) for p in [out] + ([compare_path(out)] if cfg.compare else [])}
        over_input = [p for key, p in written.items() if key in inputs]
        over_output = [(p, taken[key]) for key, p in written.items() if key in taken]
        if over_input:
            errors.append(f"{path}: its output {over_input[0]} is an input; it is never overwritten")
        elif over_output:
            clash, other_input = over_output[0]
            errors.append(f"{path}: its output {clash} is also an output of {other_input}")
        else:
            taken.update((key, path) for key in written)
            jobs.append((path, out))
    return jobs, errors


@dataclass
class Input:
    path: str
    out: str
    lr: torch.Tensor  # (3, h, w) in [0, 1]
    alpha: torch.Tensor = None  # (1, h, w) or None
    icc_profile: bytes = None  # the input's RGB colour profile, written with the output


def load_input(path, out, cfg):
    """The image of one job, once its outputs are known to be writable."""
    for target in [out] + ([compare_path(out)] if cfg.compare else []):
        if os.path.exists(target) and not cfg.overwrite:
            raise ImageError(f"{path}: {target} exists (use --overwrite to replace it)")
        folder = os.path.dirname(os.path.abspath(target))
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise ImageError(f"{path}: cannot write into {folder} (permission denied)")
    return Input(path, out, *load_image(path, max_pixels=cfg.max_pixels))


def compare_path(out):
    return os.path.splitext(out)[0] + "_compare.png"


def run_batch(model, batch, cfg, errors):
    """Super-resolve same-size inputs together and write each; returns how many were written."""
    started = time.perf_counter()
    try:
        generator = torch.Generator().manual_seed(cfg.seed)
        srs = super_resolve(model, torch.stack([item.lr for item in batch]), cfg, generator, cfg.verbose).cpu()
    except torch.OutOfMemoryError:
        for item in batch:
            report_error(errors, f"{item.path}: out of memory (try a smaller --batch-size / --tile-size "
                                            "/ --vae-tile-size)")
        return 0
    except (ValueError, RuntimeError) as e:
        for item in batch:
            report_error(errors, one_line(e, item.path))
        return 0
    written = 0
    for item, sr in zip(batch, srs):  # sr: (3, 4h, 4w)
        try:
            save_outputs(item, sr, cfg)
        except (ValueError, OSError) as e:
            report_error(errors, one_line(e, item.path))
        else:
            written += 1
            if not cfg.quiet:
                tqdm.write(f"wrote {item.out} ({(time.perf_counter() - started) / len(batch):.1f} s)")
    return written


def report_error(errors, message):
    """One error line, kept in `errors` (the exit status counts them)."""
    errors.append(message)
    tqdm.write(f"error: {message}", file=sys.stderr)


def save_outputs(item, sr, cfg):
    alpha = None
    if item.alpha is not None and os.path.splitext(item.out)[1].lower() not in (".jpg", ".jpeg"):
        alpha = F.interpolate(item.alpha[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1)  # (1, 4h, 4w)
    save_image(sr, item.out, alpha, item.icc_profile)
    if cfg.compare:
        up = F.interpolate(item.lr[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1)
        save_image(torch.cat([up, sr], dim=2), compare_path(item.out), icc_profile=item.icc_profile)


# ---- the command line ------------------------------------------------------------------------------------

def check_flags(cfg, n_inputs):
    """The first problem with the flags that needs no model, or None."""
    extension = os.path.splitext(cfg.output)[1].lower()
    if cfg.steps < 1:
        return "--steps must be at least 1"
    if not 0 < cfg.shift < float("inf"):
        return "--shift must be a positive number"
    if cfg.tile_size < -1 or cfg.vae_tile_size < 0:
        return "tile sizes must be >= 0 (--tile-size -1: the model's own)"
    if cfg.tile_overlap < -1:
        return "--tile-overlap must be >= 0 (-1: the model's own)"
    if cfg.max_pixels < 1:
        return "--max-pixels must be positive"
    if cfg.batch_size < 1:
        return "--batch-size must be at least 1"
    if cfg.batch_size > 1 and cfg.posterior == "sample":
        return "--batch-size > 1 needs --posterior mean (with sample, each image draws its own noise from --seed)"
    if names_a_file(cfg.output) and extension not in SAVE_FORMATS:
        return f"-o {cfg.output}: cannot write {extension} (use one of {', '.join(SAVE_FORMATS)})"
    if names_a_file(cfg.output) and n_inputs > 1:
        return f"-o {cfg.output} names one file, but there are {n_inputs} inputs: give a folder"
    if cfg.output and not names_a_file(cfg.output) and os.path.isfile(cfg.output):
        return f"-o {cfg.output} is an existing file that is not an image; give a folder or an image name"
    return device_problem(cfg.device) if cfg.device != "auto" else None


def check_tiles(cfg, model):
    """Tiles go through the networks whole, so they must divide by what the networks down-sample by, and
    consecutive tiles must advance (an overlap under the tile size, the model's own with --tile-size -1)."""
    if cfg.tile_size > 0 and cfg.tile_size % model.tile_multiple:
        return f"--tile-size {cfg.tile_size} must be a multiple of {model.tile_multiple} for this model"
    tile, overlap = model_tiles(cfg, model)
    if tile and overlap >= tile and cfg.tile_overlap < 0:
        return f"--tile-size {tile} must be over the model's own tile overlap {overlap} (or give --tile-overlap)"
    if tile and overlap >= tile:
        return f"--tile-overlap {overlap} must be under the latent tile size {tile}"
    if cfg.vae_tile_size % model.ae.downscale:
        return f"--vae-tile-size {cfg.vae_tile_size} must be a multiple of {model.ae.downscale} for this model"
    return None


def native_bf16(device):
    """(bool, why): does `device` compute bf16 in hardware? Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor}"  # Ampere and newer have bf16 tensor cores
    if device.type == "cpu":  # torch's probes are private: a torch without them is taken to have neither
        if getattr(torch.cpu, "_is_amx_tile_supported", bool)():
            return True, "CPU with AMX"
        if getattr(torch.cpu, "_is_avx512_bf16_supported", bool)():
            return True, "CPU with AVX512-BF16"
        return False, "CPU without AMX or AVX512-BF16"
    return False, f"{device.type} device"


def pick_dtype(choice, device):
    """(dtype name, the line saying why): --dtype auto takes bf16 only where it is native."""
    if choice != "auto":
        return choice, f"dtype {choice} (--dtype)"
    native, why = native_bf16(device)
    return ("bf16", f"dtype bf16 ({why}; --dtype fp32 for full precision)") if native else \
        ("fp32", f"dtype fp32 ({why})")


def load_model(cfg, device, dtype):
    if cfg.checkpoint == BUNDLED_MODEL and not os.path.isfile(BUNDLED_MODEL):
        raise WeightsError(f"{BUNDLED_MODEL}: the bundled model is missing; give a model with --checkpoint")
    model = FlowSR.load(cfg.checkpoint, base=cfg.base or None, prompt=cfg.prompt or None,
                        dtype=DTYPES[dtype], cache_dir=cfg.cache_dir, channels_last=True)
    return model.to(device).eval()


def one_line(error, path):
    """The error's first line, naming the file."""
    text = first_line(error, limit=None)  # our own messages: whole, they name the file
    return text if path in text else f"{path}: {text}"


def main(argv=None):
    cfg = parse(SampleConfig, argv)
    if not cfg.inputs:
        print("error: no input images (usage: python sample.py IMAGE [IMAGE ...] [-h])", file=sys.stderr)
        return 2
    paths, errors = expand_inputs(cfg.inputs)
    problem = check_flags(cfg, len({path_key(p) for p, _ in paths}))  # an input given twice is done once
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if cfg.verbose:
        print("config:\n" + describe(cfg))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    device = cfg.device if cfg.device != "auto" else (
        f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else
        "mps" if torch.backends.mps.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("gloo")  # only to add up the counts at the end
    try:
        dtype, why = pick_dtype(cfg.dtype, torch.device(device))
        model = load_model(cfg, torch.device(device), dtype)
    except (WeightsError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: e.g. no such GPU (cuda:7)
        print(f"error: {one_line(e, cfg.checkpoint)}", file=sys.stderr)
        return 1
    if not cfg.quiet and rank == 0:
        print(why + (f"; {world} processes" if world > 1 else ""))
    problem = check_tiles(cfg, model)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    jobs, more_errors = plan_outputs(paths, cfg)
    errors = errors + more_errors if rank == 0 else []  # every process plans alike; one reports
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    jobs = jobs[rank::world]  # under torchrun each process takes every world-th image
    written, batch = 0, []  # batch: loaded inputs of one size, waiting to go through the model together
    bar = (cfg.verbose or sys.stderr.isatty()) and not cfg.quiet and len(jobs) > 1 and world == 1  # not in logs
    for path, out in tqdm(jobs, desc="images", disable=not bar):
        try:
            item = load_input(path, out, cfg)
        except (ValueError, OSError) as e:  # ImageError is a ValueError
            report_error(errors, one_line(e, path))
            continue
        if batch and (len(batch) == cfg.batch_size or item.lr.shape != batch[0].lr.shape):
            written += run_batch(model, batch, cfg, errors)
            batch = []
        batch.append(item)
    if batch:
        written += run_batch(model, batch, cfg, errors)
    if world > 1:
        return summarize(written, len(errors), rank, world, cfg.quiet)
    return 1 if errors else 0


def summarize(written, failed, rank, world, quiet):
    """Under torchrun: add up every process's counts; each process exits 1 if any image failed anywhere."""
    counts = torch.tensor([written, failed])
    dist.all_reduce(counts)
    written, failed = counts.tolist()
    if rank == 0 and not quiet:
        print(f"{world} processes wrote {written} images" + (f", {failed} failed" if failed else ""))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
