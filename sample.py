"""One-step FlowSR super-resolution from the command line: x4 in one network evaluation (SPEC 2, 7).

    python sample.py photo.png                      # -> photo_x4.png, with the bundled tiny model
    python sample.py shots/ -o out/ --compare       # a folder; also writes side-by-side comparisons
    python sample.py in.png --base SD21_DIR --checkpoint flowsr.safetensors   # the published weights
    python sample.py in.png --checkpoint runs/x/final.safetensors            # any train.py model

The pipeline follows the published FlowSR inference code (SPEC 7): x = up(x_LR) in [-1, 1],
reflect-padded to what the networks divide by; z_L = s * E(x) (posterior mean by default);
z_H_hat = z_L - v(z_L, 1000, c) (or N Euler steps on the shifted grid); x_SR = clamp(D(z_H_hat / s));
crop; wavelet colour correction against up(x_LR). Latents larger than one tile are processed in
tiles blended with Gaussian weights, and the VAE runs tiled, so memory stays bounded.

Files: any image Pillow reads (EXIF orientation applied; 16-bit, grayscale, palette and CMYK become
8-bit RGB). Transparency is not super-resolved: the alpha channel is upscaled on its own (bicubic) and
written back (dropped for a JPEG output). A bad input gives one error line and the others go on; the
exit code is 1 if any failed. Outputs are written atomically, never over an input, and over an
existing file only with --overwrite. Folders skip earlier results (NAME_x4*.png).
"""
import glob
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plumbing.flags import describe, flag, parse
from data import IMAGE_EXTENSIONS, SAVE_FORMATS, ImageError, list_images, load_image, save_image
from flowsr import FlowSR
from schedulers import flow_match_sigmas
from plumbing.weights import WeightsError

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_MODEL = os.path.join(HERE, "models", "flowsr-tiny.safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUFFIX = "_x4"


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
    tile_size: int = flag(96, "latent tile size of the velocity network (0: no tiles)")
    tile_overlap: int = flag(32, "latent tile overlap")
    vae_tile_size: int = flag(768, "largest VAE tile in image pixels; larger images run in equal overlapping tiles "
                                   "(0: no tiles)")
    posterior: str = flag("mean", "z_L from the posterior mean, or a sample of it as the published code does",
                          choices=("mean", "sample"))
    seed: int = flag(0, "seed of --posterior sample (each image starts from it)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = flag("fp32", "compute precision", choices=tuple(DTYPES))
    max_pixels: int = flag(1024 * 1024, "refuse inputs with more pixels than this (keeps a 24 GB machine safe)")
    compare: bool = flag(False, "also write NAME_x4_compare.png: upsampled input | result")
    overwrite: bool = flag(False, "replace existing output files (never an input)")
    quiet: bool = flag(False, "no config print-out or progress bars", short="-q")


# ---- colour correction (StableSR's wavelet and AdaIN fixes) ---------------------------------------------

def wavelet_blur(x, radius):
    """3x3 binomial blur, dilated by `radius` (one level of an a-trous wavelet decomposition)."""
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, groups=x.shape[1], dilation=radius)


def wavelet_split(x, levels=5):
    """(high frequencies, low frequencies) with x = high + low."""
    low = x
    for i in range(levels):
        low = wavelet_blur(low, 2 ** i)
    return x - low, low


def color_fix(result, reference, mode):
    """Keep the result's detail, take the colour (low frequencies or channel statistics) from the reference."""
    if mode == "wavelet":
        return (wavelet_split(result)[0] + wavelet_split(reference)[1]).clamp(0, 1)
    if mode == "adain":
        mean_r, std_r = result.mean((2, 3), keepdim=True), result.std((2, 3), keepdim=True) + 1e-5
        mean_s, std_s = reference.mean((2, 3), keepdim=True), reference.std((2, 3), keepdim=True) + 1e-5
        return ((result - mean_r) / std_r * std_s + mean_s).clamp(0, 1)
    return result


# ---- tiled velocity --------------------------------------------------------------------------------------

def tile_starts(length, tile, overlap):
    """Tile offsets covering [0, length); the last tile sits flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def gaussian_weights(height, width, device):
    """Tile blending weights: a Gaussian of variance 0.01 in units of the tile size (published code).

    float32 always: the corner weights (~1e-11) would underflow to 0 in fp16 and leave 0 / 0 there."""
    def profile(n):
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - (n - 1) / 2) / n) ** 2 / (2 * 0.01))
    return torch.outer(profile(height), profile(width)).to(device, torch.float32)  # (h, w)


def tiled_velocity(model, z, timesteps, tile, overlap, progress=False):
    """v(z, t) for a latent of any size: overlapping tiles, blended with Gaussian weights (tile 0: no tiles)."""
    _, _, h, w = z.shape
    if not tile or (h <= tile and w <= tile):
        return model(z, timesteps)
    th, tw = min(tile, h), min(tile, w)
    weights = gaussian_weights(th, tw, z.device)
    out = torch.zeros(z.shape, device=z.device, dtype=torch.float32)
    total = torch.zeros(h, w, device=z.device, dtype=torch.float32)
    tiles = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    for y, x in tqdm(tiles, desc="tiles", leave=False, disable=not progress):
        out[:, :, y:y + th, x:x + tw] += model(z[:, :, y:y + th, x:x + tw], timesteps).float() * weights
        total[y:y + th, x:x + tw] += weights
    return (out / total).to(z.dtype)


# ---- the pipeline ----------------------------------------------------------------------------------------

@torch.no_grad()
def super_resolve(model, lr, cfg, generator=None, progress=False):
    """lr: (1, 3, h, w) in [0, 1] -> (1, 3, 4h, 4w) in [0, 1]."""
    device, dtype = model.context.device, model.context.dtype
    up = F.interpolate(lr * 2 - 1, scale_factor=4, mode=model.upsample if cfg.upsample == "model" else cfg.upsample,
                       align_corners=False).clamp(-1, 1)  # (1, 3, H, W)
    H, W = up.shape[-2:]
    m = model.pad_multiple
    pad_h, pad_w = -H % m, -W % m
    mode = "reflect" if pad_h < H and pad_w < W else "replicate"  # reflect cannot pad more than the size
    # channels-last input: every convolution then runs on NHWC activations (~10 % faster VAE on a CPU, the
    # layout tensor cores want on a GPU), with no copy of the weights; outputs differ only by float rounding
    x = F.pad(up, (0, pad_w, 0, pad_h), mode=mode).to(device, dtype, memory_format=torch.channels_last)
    ae_tile = cfg.vae_tile_size or None
    if cfg.posterior == "sample" and hasattr(model.ae, "posterior"):
        mean, logvar = model.ae.posterior(x, tile_size=ae_tile)
        z = model.scale * (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(mean))
    else:
        z = model.encode(x, tile_size=ae_tile)  # (1, C, H/f, W/f)
    sigmas = torch.tensor([1.0, 0.0]) if cfg.steps == 1 else flow_match_sigmas(cfg.steps, cfg.shift)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        timesteps = torch.full((z.shape[0],), 1000 * sigma, device=device)
        z = z + (sigma_next - sigma) * tiled_velocity(model, z, timesteps, cfg.tile_size, cfg.tile_overlap, progress)
    decode_tile = ae_tile // model.ae.downscale if ae_tile else None
    sr = model.decode(z, tile_size=decode_tile).clamp(-1, 1)[:, :, :H, :W].float()  # (1, 3, H, W)
    return color_fix((sr + 1) / 2, ((up + 1) / 2).to(sr.device), cfg.color_fix)


# ---- files -----------------------------------------------------------------------------------------------

def is_result(path):
    """NAME_x4.png / NAME_x4_compare.png: what an earlier run wrote into a folder."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.endswith((SUFFIX, SUFFIX + "_compare"))


def expand_inputs(patterns):
    """(paths, errors): [(path, path relative to the folder it came from)]; what matches nothing is an error."""
    paths, errors = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [p for p in list_images(pattern) if not is_result(p)]
            paths += [(p, os.path.relpath(p, pattern)) for p in found]
            if not found:
                errors.append(f"{pattern}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(pattern):
            paths.append((pattern, os.path.basename(pattern)))
        elif glob.has_magic(pattern) and glob.glob(pattern):
            paths += [(p, os.path.basename(p)) for p in sorted(glob.glob(pattern)) if os.path.isfile(p)]
        else:
            errors.append(f"{pattern}: no such file or folder")
    return paths, errors


def plan_outputs(paths, cfg):
    """([(input, output)], errors): one output per input, none of them an input or another input's output."""
    to_file = os.path.splitext(cfg.output)[1].lower() in IMAGE_EXTENSIONS
    inputs = {os.path.realpath(p) for p, _ in paths}
    jobs, errors, taken = [], [], {}
    for path, relative in paths:
        name = os.path.splitext(relative)[0] + SUFFIX + ".png"
        if not cfg.output:
            out = os.path.join(os.path.dirname(path), os.path.basename(name))
        else:
            out = cfg.output if to_file else os.path.join(cfg.output, name)
        real = os.path.realpath(out)
        if real in inputs:
            errors.append(f"{path}: its output {out} is an input; it is never overwritten")
        elif real in taken:
            errors.append(f"{path}: its output {out} is also the output of {taken[real]}")
        else:
            taken[real] = path
            jobs.append((path, out))
    return jobs, errors


def process(model, path, out, cfg, progress):
    compare_out = os.path.splitext(out)[0] + "_compare.png"
    for target in [out] + ([compare_out] if cfg.compare else []):
        if os.path.exists(target) and not cfg.overwrite:
            raise ImageError(f"{path}: {target} exists (use --overwrite to replace it)")
    lr, alpha = load_image(path, max_pixels=cfg.max_pixels)  # (3, h, w) in [0, 1], alpha (1, h, w) or None
    generator = torch.Generator().manual_seed(cfg.seed)
    sr = super_resolve(model, lr[None], cfg, generator, progress)[0].cpu()  # (3, 4h, 4w)
    if alpha is not None and os.path.splitext(out)[1].lower() not in (".jpg", ".jpeg"):
        alpha = F.interpolate(alpha[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1)  # (1, 4h, 4w)
    else:
        alpha = None
    save_image(sr, out, alpha)
    if cfg.compare:
        up = F.interpolate(lr[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1)
        save_image(torch.cat([up, sr], dim=2), compare_out)


# ---- the command line ------------------------------------------------------------------------------------

def check_flags(cfg, n_inputs):
    """The first problem with the flags that needs no model, or None."""
    extension = os.path.splitext(cfg.output)[1].lower()
    if cfg.steps < 1:
        return "--steps must be at least 1"
    if cfg.tile_size < 0 or cfg.vae_tile_size < 0 or cfg.tile_size and not 0 <= cfg.tile_overlap < cfg.tile_size:
        return "tile sizes must be >= 0 and --tile-overlap in [0, --tile-size)"
    if cfg.max_pixels < 1:
        return "--max-pixels must be positive"
    if extension in IMAGE_EXTENSIONS and extension not in SAVE_FORMATS:
        return f"-o {cfg.output}: cannot write {extension} (use one of {', '.join(SAVE_FORMATS)})"
    if extension in IMAGE_EXTENSIONS and n_inputs > 1:
        return f"-o {cfg.output} names one file, but there are {n_inputs} inputs: give a folder"
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            return f"--device {cfg.device}: not a device (auto, cpu, cuda, cuda:N or mps)"
        if device.type == "cuda" and not torch.cuda.is_available() or \
                device.type == "mps" and not torch.backends.mps.is_available():
            return f"--device {cfg.device}: not available on this machine"
    return None


def check_tiles(cfg, model):
    """Tiles go through the networks whole, so they must divide by what the networks down-sample by."""
    unet_factor = model.pad_multiple // model.ae.downscale
    if cfg.tile_size % unet_factor:
        return f"--tile-size {cfg.tile_size} must be a multiple of {unet_factor} for this model"
    if cfg.vae_tile_size % model.ae.downscale:
        return f"--vae-tile-size {cfg.vae_tile_size} must be a multiple of {model.ae.downscale} for this model"
    return None


def load_model(cfg, device):
    if cfg.checkpoint == BUNDLED_MODEL and not os.path.isfile(BUNDLED_MODEL):
        raise WeightsError(f"{BUNDLED_MODEL}: the bundled model is missing; give a model with --checkpoint")
    model = FlowSR.load(cfg.checkpoint, base=cfg.base or None, prompt=cfg.prompt or None,
                        dtype=DTYPES[cfg.dtype], cache_dir=cfg.cache_dir)
    return model.to(device).eval()


def one_line(error, path):
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if path in text else f"{path}: {text}"


def main(argv=None):
    cfg = parse(SampleConfig, argv)
    if not cfg.inputs:
        print("error: no input images (usage: python sample.py IMAGE [IMAGE ...] [-h])", file=sys.stderr)
        return 2
    paths, errors = expand_inputs(cfg.inputs)
    problem = check_flags(cfg, len(paths))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not cfg.quiet:
        print("config:\n" + describe(cfg))
    device = cfg.device if cfg.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        model = load_model(cfg, torch.device(device))
    except (WeightsError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: e.g. no such GPU (cuda:7)
        print(f"error: {one_line(e, cfg.checkpoint)}", file=sys.stderr)
        return 1
    problem = check_tiles(cfg, model)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    jobs, more_errors = plan_outputs(paths, cfg)
    errors += more_errors
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    for path, out in tqdm(jobs, desc="images", disable=cfg.quiet or len(jobs) < 2):
        try:
            process(model, path, out, cfg, progress=not cfg.quiet)
        except torch.OutOfMemoryError:
            errors.append(path)
            tqdm.write(f"error: {path}: out of memory (try a smaller --tile-size / --vae-tile-size)", file=sys.stderr)
        except (ValueError, OSError, RuntimeError) as e:  # ImageError is a ValueError
            errors.append(path)
            tqdm.write(f"error: {one_line(e, path)}", file=sys.stderr)
        else:
            if not cfg.quiet:
                tqdm.write(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
