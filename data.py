"""Images in and out, result files paired with their ground truth by name, and the training dataset (SPEC
sections 1 and 6).

Training pairs are made on the fly: a random HR crop of a photo (zoomed out, flipped, rotated, now
and then blurred smooth), degraded to LR with Real-ESRGAN's second-order pipeline, plain bicubic,
or a mix of those with bicubic + JPEG (degradations.py). Images are
float tensors (3, H, W) in [0, 1] as read from and written to 8-bit files, and in [-1, 1] for the models.

Reading is strict: any file that is not a whole, decodable image of sensible size gives one
`ImageError` line naming the file. Every random draw of item i comes from a generator seeded
from (seed, i), so DataLoader workers and restarts see the same pairs.
"""
import contextlib
import hashlib
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from degradations import degrade_bicubic, degrade_mixed, degrade_realesrgan
from plumbing.paths import case_insensitive, folder_problem
from plumbing.weights import first_line, write_atomic

DEGRADATIONS = {"realesrgan": degrade_realesrgan, "mixed": degrade_mixed,
                "bicubic": lambda hr, scale, generator: degrade_bicubic(hr, scale)}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MAX_PIXELS = 8192 * 8192  # below Pillow's own bomb limit, so this check is the one that speaks
MIN_SIZE = 8
SR_SUFFIX, COMPARE_SUFFIX = "_x4", "_x4_compare"  # sample.py writes NAME_x4.png (and NAME_x4_compare.png)
SAVE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                ".webp": ("WEBP", {"quality": 95})}


class ImageError(ValueError):
    """An image file that cannot be used; the message is one line naming the file."""


class Picture(NamedTuple):
    """An image file's content as the models and the writer need it."""
    rgb: torch.Tensor  # (3, H, W) in [0, 1]
    alpha: torch.Tensor | None  # (1, H, W) in [0, 1], or None: opaque
    icc_profile: bytes | None  # the RGB colour space the values are in (ICC), or None: sRGB as usual


@contextlib.contextmanager
def _open_checked(path, max_pixels, min_size):
    """Open an image lazily, check its declared size before any decoding, turn every failure into ImageError."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{path}: {width}x{height} exceeds the limit of {max_pixels} pixels")
                if min(width, height) < min_size:
                    raise ImageError(f"{path}: {width}x{height} is smaller than {min_size} pixels a side")
                if getattr(image, "is_animated", False) and image.format != "MPO":  # MPO: a camera JPEG + preview
                    raise ImageError(f"{path}: {image.n_frames} frames (an animation or a multi-page file); "
                                     "give a single image")
                yield image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: too large to decode safely ({first_line(e)})") from None
    except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"{path}: not a readable image ({first_line(e)})") from None


def _to_tensors(image, path):
    """Any Pillow mode -> RGB (3, H, W) in [0, 1], plus alpha (1, H, W) when the image has transparency."""
    if image.mode.startswith(("I", "F")):
        # Pillow holds 16-bit grayscale in "I;16*" and in 32-bit "I" (from 16-bit PNG/TIFF): full scale 65535;
        # float data ("F") is taken as [0, 1], give or take a resampling overshoot. Values far outside the scale
        # (a 0 .. 255 float image) are refused, not clipped into a black or white image.
        full_scale, slack = (1, 1) if image.mode == "F" else (65535, 0)
        gray = pil_to_tensor(image.convert("F" if image.mode == "F" else "I")).double() / full_scale  # (1, H, W)
        if not (gray.isfinite().all() and -slack <= gray.min() and gray.max() <= 1 + slack):
            raise ImageError(f"{path}: {image.mode} pixels from {gray.min().item() * full_scale:g} to "
                             f"{gray.max().item() * full_scale:g}, outside the range 0 .. {full_scale} of this mode")
        return gray.clamp(0, 1).float().expand(3, -1, -1).contiguous(), None
    alpha = None
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette / RGB with a transparent colour
        image = image.convert("RGBA")
        alpha = pil_to_tensor(image.getchannel("A")).float() / 255  # (1, H, W)
    return pil_to_tensor(image.convert("RGB")).float() / 255, alpha


def _rgb_profile(image):
    """The file's ICC profile if it describes RGB values (a phone's Display P3, a camera's Adobe RGB), else None.

    The network maps RGB values to RGB values, so the output is in the input's colour space and carries its
    profile; without it a colour-managed viewer shows a P3 photo's upscale duller than the photo. A grey or
    CMYK profile no longer applies once the pixels are converted to RGB, so it is dropped."""
    profile = image.info.get("icc_profile")
    if image.mode in ("RGB", "RGBA", "RGBX", "P", "PA") and profile and profile[16:20] == b"RGB ":
        return profile  # bytes 16..19 of an ICC header name the data colour space
    return None


def load_image(path, max_pixels=MAX_PIXELS, min_size=MIN_SIZE):
    """Read an image file as a Picture (rgb, alpha or None, RGB colour profile or None), EXIF orientation applied."""
    path = os.fspath(path)
    with _open_checked(path, max_pixels, min_size) as image:
        image.load()  # decode everything now, so a truncated file fails here and not later
        return Picture(*_to_tensors(ImageOps.exif_transpose(image), path), _rgb_profile(image))


def probe_image(path, max_pixels=MAX_PIXELS, min_size=MIN_SIZE):
    """Cheap readability check (header, size, Image.verify) without decoding the pixels."""
    path = os.fspath(path)
    with _open_checked(path, max_pixels, min_size) as image:
        image.verify()


def save_image(image, path, alpha=None, icc_profile=None):
    """Write (3, H, W) [0, 1] (+ alpha (1, H, W), + an ICC colour profile) as 8-bit PNG / JPEG / WebP, chosen by
    extension, atomically."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in SAVE_FORMATS:
        raise ValueError(f"{path}: unknown image extension (expected one of {', '.join(SAVE_FORMATS)})")
    file_format, options = SAVE_FORMATS[extension]
    if icc_profile is not None:
        options = {**options, "icc_profile": icc_profile}
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{path}: expected an image of shape (3, H, W), got {tuple(image.shape)}")
    if alpha is not None:
        if file_format == "JPEG":
            raise ValueError(f"{path}: JPEG cannot store an alpha channel")
        if tuple(alpha.shape) != (1, *image.shape[1:]):
            raise ValueError(f"{path}: alpha {tuple(alpha.shape)} does not fit image {tuple(image.shape)}")
        image = torch.cat([image, alpha])  # (4, H, W)
    if not torch.isfinite(image).all():
        raise ValueError(f"{path}: image holds NaN or infinite values")
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    write_atomic(path, lambda f: to_pil_image(pixels).save(f, format=file_format, **options))


def to_model(x01):
    """[0, 1] image -> the models' [-1, 1]."""
    return x01 * 2 - 1


def from_model(x):
    """The models' [-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def list_images(folder):
    """Image files under folder, recursively, in a fixed order; hidden files and folders are left out."""
    folder = os.fspath(folder)
    if folder_problem(folder):
        raise ValueError(f"{folder}: {folder_problem(folder)}")
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, name) for name in sorted(files)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


def is_result(path):
    """NAME_x4.png / NAME_x4_compare.png: what an earlier run wrote into a folder."""
    stem, extension = os.path.splitext(os.path.basename(path))
    stem = stem.casefold() if case_insensitive() else stem
    return extension.lower() == ".png" and stem.endswith((SR_SUFFIX, COMPARE_SUFFIX))


def images_by_stem(folder):
    """{stem: path} of the images under folder (the stem of sub/baby.png is "sub/baby"); two files with
    one stem are an error. sample.py's side-by-side comparisons (NAME_x4_compare.png) are no results."""
    images = {}
    for path in list_images(folder):
        stem = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        if stem.endswith(COMPARE_SUFFIX) and path.lower().endswith(".png"):
            continue
        if stem in images:
            raise ValueError(f"{folder}: two images share the stem '{stem}' ({images[stem]}, {path})")
        images[stem] = path
    return images


def results_by_stem(folder):
    """(images_by_stem without the inputs of sample.py's results, [those inputs]). NAME beside NAME_x4 with a
    quarter of its width and height is the low-resolution input it was made from (`python sample.py folder/`
    writes beside each input), not a result."""
    images = images_by_stem(folder)
    inputs = [path for stem, path in images.items()
              if stem + SR_SUFFIX in images and _is_a_quarter_of(path, images[stem + SR_SUFFIX])]
    return {stem: path for stem, path in images.items() if path not in inputs}, inputs


def _is_a_quarter_of(path, other):
    """Whether one image file has a quarter of another's width and height, by their headers (sample.py turns a
    result upright by EXIF: either orientation counts). A file that cannot be read is no input of anything."""
    try:
        with Image.open(path) as image, Image.open(other) as larger:
            return sorted(4 * n for n in image.size) == sorted(larger.size)
    except Exception:  # Pillow's decoders raise many types; the scoring reports the file
        return False


def match_pairs(sr_dir, gt_dir):
    """([(name, sr_path, gt_path)] sorted by name, lines naming the unmatched files, [inputs left out of the SR
    folder] as results_by_stem finds them)."""
    (sr_images, inputs), gt_images = results_by_stem(sr_dir), images_by_stem(gt_dir)
    pairs, missing, matched_sr = [], [], set()
    for name, gt_path in sorted(gt_images.items()):
        sr_stem = name if name in sr_images else name + SR_SUFFIX
        if sr_stem in sr_images:
            pairs.append((name, sr_images[sr_stem], gt_path))
            matched_sr.add(sr_stem)
        else:
            missing.append(f"no SR image for GT {gt_path}")
    missing += [f"no GT image for SR {path}" for stem, path in sr_images.items() if stem not in matched_sr]
    return pairs, missing, inputs


def _item_seed(seed, index):
    # the "0" stood for an epoch that nothing varied; kept, so that item i stays the pair it always was
    digest = hashlib.blake2b(f"{seed}/0/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit seed


def gaussian_blur(image, sigma):
    """(3, H, W) blurred by an isotropic Gaussian of std `sigma` pixels (reflect-padded; on an image smaller
    than the kernel the kernel is cut to what reflection can pad)."""
    radius = min(max(1, math.ceil(3 * sigma)), min(image.shape[1:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    padded = F.pad(image[:, None], (radius,) * 4, mode="reflect")  # (3, 1, H + 2r, W + 2r)
    return F.conv2d(F.conv2d(padded, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))[:, 0]


def random_crop_augment(image, size, generator, zoom_out=2.0, flat_prob=0.0):
    """A size x size HR crop: random place, a random zoom-out in [1, zoom_out] (the photo seen from farther
    away), one of the 8 flips / rotations, and with probability flat_prob a heavy blur (sigma 2-6 px) that
    makes it smooth, so that the model also sees smooth HR content, which it must leave smooth."""
    _, h, w = image.shape
    zoom = 1 + (zoom_out - 1) * torch.rand((), generator=generator).item()
    window = min(round(size * zoom), h, w)
    if window < size:  # a photo smaller than the crop is upscaled to fit
        factor = size / min(h, w)
        image = F.interpolate(image[None], size=(max(size, round(h * factor)), max(size, round(w * factor))),
                              mode="bicubic")[0].clamp(0, 1)
        (_, h, w), window = image.shape, size
    top = torch.randint(0, h - window + 1, (), generator=generator).item()
    left = torch.randint(0, w - window + 1, (), generator=generator).item()
    crop = image[:, top:top + window, left:left + window]  # (3, window, window)
    if window != size:
        crop = F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0].clamp(0, 1)
    crop = crop.rot90(torch.randint(0, 4, (), generator=generator).item(), dims=(1, 2))
    if torch.rand((), generator=generator).item() < 0.5:
        crop = crop.flip(-1)
    if torch.rand((), generator=generator).item() < flat_prob:
        crop = gaussian_blur(crop, 2 + 4 * torch.rand((), generator=generator).item())
    return crop.contiguous()  # (3, S, S)


class HRFolderDataset(torch.utils.data.Dataset):
    """Random HR crops of the photos in a folder, each with its LR made on the fly.

    Item i always gives the same pair; `length` lets a small folder give many crops (item i uses
    file i modulo the number of files).
    """

    def __init__(self, folder, crop_size=256, scale=4, degradation="realesrgan", seed=0, length=None,
                 zoom_out=2.0, flat_prob=0.0, cached_images=64):
        if degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {degradation!r} (expected one of {', '.join(DEGRADATIONS)})")
        self.zoom_out, self.flat_prob = zoom_out, flat_prob
        try:  # the degradation's own size rules (Real-ESRGAN's pipeline needs 16 px at x4), before any training
            DEGRADATIONS[degradation](torch.zeros(3, crop_size, crop_size), scale, torch.Generator().manual_seed(0))
        except ValueError as e:
            raise ValueError(f"crop size {crop_size} for the {degradation} degradation: {e}") from None
        self.folder = os.fspath(folder)
        self.crop_size, self.scale, self.degradation, self.seed = crop_size, scale, degradation, seed
        listed = list_images(self.folder)
        candidates = [path for path in listed if not is_result(path)]
        if listed and not candidates:
            raise ValueError(f"{self.folder}: every image in it ({len(listed)}) is named as sample.py's results "
                             f"({SR_SUFFIX}.png, {COMPARE_SUFFIX}.png), which are no training photos")
        if len(candidates) < len(listed):
            warnings.warn(f"{self.folder}: {len(listed) - len(candidates)} results of sample.py ({SR_SUFFIX}.png, "
                          f"{COMPARE_SUFFIX}.png) are no training photos; left out")
        if not candidates:
            raise ValueError(f"{self.folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = []
        for path in candidates:
            try:
                probe_image(path)
            except ImageError as e:
                warnings.warn(f"skipping {e}")
            else:
                self.paths.append(path)
        if not self.paths:
            raise ValueError(f"{self.folder}: none of its {len(candidates)} image files is readable")
        self.length = len(self.paths) if length is None else length
        self.broken = set()
        self.decoded, self.cached_images = {}, cached_images  # {path: (3, H, W) uint8}, per process

    def __len__(self):
        return self.length

    def _load_readable(self, index):
        # A file that breaks during training is replaced by the next readable one: the worker lives on.
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            if path in self.broken:
                continue
            if path in self.decoded:
                return self.decoded[path].float() / 255
            try:
                image = load_image(path)[0]
            except ImageError as e:
                warnings.warn(f"skipping {e}")
                self.broken.add(path)
                continue
            # 8-bit in any case, so that an item is the same whether its photo came from the cache or not
            pixels = (image * 255).round().to(torch.uint8)  # (3, H, W)
            if len(self.decoded) < self.cached_images:  # decoding a photo costs more than cropping it
                self.decoded[path] = pixels
            return pixels.float() / 255
        raise ImageError(f"{self.folder}: no readable image left")

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        generator = torch.Generator().manual_seed(_item_seed(self.seed, index))
        hr = random_crop_augment(self._load_readable(index), self.crop_size, generator, self.zoom_out,
                                 self.flat_prob)  # (3, S, S)
        lr = DEGRADATIONS[self.degradation](hr, self.scale, generator)  # (3, S/scale, S/scale)
        return {"hr": to_model(hr), "lr": to_model(lr)}

