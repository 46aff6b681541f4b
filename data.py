"""Images in and out, and the training / evaluation datasets (SPEC sections 1 and 6).

Training pairs are made on the fly: a random HR crop (+ horizontal flip) of a photo, degraded
to LR with Real-ESRGAN's second-order pipeline or plain bicubic (degradations.py). Images are
float tensors (3, H, W) in [0, 1] on disk and in [-1, 1] for the models.

Reading is strict: any file that is not a whole, decodable image of sensible size gives one
`ImageError` line naming the file. Every reproducible draw of item i at epoch e comes from a
generator seeded from (seed, i, e), so DataLoader workers and restarts see the same pairs.
"""
import contextlib
import hashlib
import os
import warnings

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from degradations import degrade_bicubic, degrade_realesrgan
from plumbing.weights import write_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 8192 * 8192  # below Pillow's own bomb limit, so this check is the one that speaks
MIN_SIZE = 8
SAVE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                ".webp": ("WEBP", {"quality": 95})}


class ImageError(ValueError):
    """An image file that cannot be used; the message is one line naming the file."""


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


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
                yield image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: too large to decode safely ({_first_line(e)})") from None
    except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"{path}: not a readable image ({_first_line(e)})") from None


def _to_tensors(image):
    """Any Pillow mode -> RGB (3, H, W) in [0, 1], plus alpha (1, H, W) when the image has transparency."""
    if image.mode.startswith("I"):
        # Pillow holds 16-bit grayscale in "I;16*" and in 32-bit "I" (from 16-bit PNG/TIFF): full scale 65535
        gray = pil_to_tensor(image.convert("I")).float() / 65535  # (1, H, W)
        return gray.clamp(0, 1).expand(3, -1, -1).contiguous(), None
    if image.mode == "F":
        gray = pil_to_tensor(image).float()  # (1, H, W), float data is taken as already in [0, 1]
        return gray.clamp(0, 1).expand(3, -1, -1).contiguous(), None
    alpha = None
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette / RGB with a transparent colour
        image = image.convert("RGBA")
        alpha = pil_to_tensor(image.getchannel("A")).float() / 255  # (1, H, W)
    return pil_to_tensor(image.convert("RGB")).float() / 255, alpha


def load_image(path, max_pixels=MAX_PIXELS, min_size=MIN_SIZE):
    """Read an image file as (rgb (3, H, W) in [0, 1], alpha (1, H, W) or None), EXIF orientation applied."""
    path = os.fspath(path)
    with _open_checked(path, max_pixels, min_size) as image:
        image.load()  # decode everything now, so a truncated file fails here and not later
        return _to_tensors(ImageOps.exif_transpose(image))


def probe_image(path, max_pixels=MAX_PIXELS, min_size=MIN_SIZE):
    """Cheap readability check (header, size, Image.verify) without decoding the pixels."""
    path = os.fspath(path)
    with _open_checked(path, max_pixels, min_size) as image:
        image.verify()


def save_image(image, path, alpha=None):
    """Write (3, H, W) [0, 1] (+ alpha (1, H, W)) as 8-bit PNG / JPEG / WebP, chosen by extension, atomically."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in SAVE_FORMATS:
        raise ValueError(f"{path}: unknown image extension (expected one of {', '.join(SAVE_FORMATS)})")
    file_format, options = SAVE_FORMATS[extension]
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
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, name) for name in sorted(files)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return paths


def _item_seed(seed, index, epoch):
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative 63-bit seed


def random_crop_flip(image, size, generator):
    """A size x size crop at a random place, flipped left-right half the time; small images are upscaled."""
    _, h, w = image.shape
    if min(h, w) < size:
        factor = size / min(h, w)
        new_size = (max(size, round(h * factor)), max(size, round(w * factor)))
        image = F.interpolate(image[None], size=new_size, mode="bicubic")[0].clamp(0, 1)  # (3, >=S, >=S)
        _, h, w = image.shape
    top = torch.randint(0, h - size + 1, (), generator=generator).item()
    left = torch.randint(0, w - size + 1, (), generator=generator).item()
    crop = image[:, top:top + size, left:left + size]  # (3, S, S)
    if torch.rand((), generator=generator).item() < 0.5:
        crop = crop.flip(-1)
    return crop.contiguous()


class HRFolderDataset(torch.utils.data.Dataset):
    """Random HR crops of the photos in a folder, each with its LR made on the fly.

    Item i at epoch e always gives the same pair; `length` lets a small folder give many crops
    per epoch (item i uses file i modulo the number of files). Call `set_epoch` before each
    epoch (DataLoader workers see it when they are not persistent).
    """

    def __init__(self, folder, crop_size=256, scale=4, degradation="realesrgan", seed=0, length=None):
        if degradation not in ("realesrgan", "bicubic"):
            raise ValueError(f"unknown degradation {degradation!r} (expected 'realesrgan' or 'bicubic')")
        if crop_size % scale:
            raise ValueError(f"crop_size {crop_size} is not divisible by scale {scale}")
        self.folder = os.fspath(folder)
        self.crop_size, self.scale, self.degradation, self.seed = crop_size, scale, degradation, seed
        candidates = list_images(self.folder)
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
        self.epoch = 0
        self.broken = set()

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def _load_readable(self, index):
        # A file that breaks during training is replaced by the next readable one: the worker lives on.
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            if path in self.broken:
                continue
            try:
                return load_image(path)[0]
            except ImageError as e:
                warnings.warn(f"skipping {e}")
                self.broken.add(path)
        raise ValueError(f"{self.folder}: no readable image left")

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        generator = torch.Generator().manual_seed(_item_seed(self.seed, index, self.epoch))
        hr = random_crop_flip(self._load_readable(index), self.crop_size, generator)  # (3, S, S)
        if self.degradation == "realesrgan":
            lr = degrade_realesrgan(hr, self.scale, generator)  # (3, S/4, S/4)
        else:
            lr = degrade_bicubic(hr, self.scale)
        return {"hr": to_model(hr), "lr": to_model(lr)}


def _images_by_stem(folder):
    """{relative path without extension: path}; two files with one stem are an error."""
    images = {}
    for path in list_images(folder):
        stem = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        if stem in images:
            raise ValueError(f"{folder}: two images named {stem!r} ({images[stem]}, {path})")
        images[stem] = path
    return images


class PairedFolderDataset(torch.utils.data.Dataset):
    """Fixed LR / HR pairs (benchmarks), matched by file name without extension."""

    def __init__(self, lr_dir, hr_dir):
        lr_images, hr_images = _images_by_stem(lr_dir), _images_by_stem(hr_dir)
        only_lr, only_hr = sorted(set(lr_images) - set(hr_images)), sorted(set(hr_images) - set(lr_images))
        if only_lr or only_hr:
            listed = [f"{len(names)} only in {folder}: {', '.join(names[:5])}"
                      for folder, names in ((lr_dir, only_lr), (hr_dir, only_hr)) if names]
            raise ValueError(f"LR and HR images do not match: {'; '.join(listed)}")
        if not lr_images:
            raise ValueError(f"{lr_dir} and {hr_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.names = sorted(lr_images)
        self.lr_paths, self.hr_paths = lr_images, hr_images

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        lr, _ = load_image(self.lr_paths[name])
        hr, _ = load_image(self.hr_paths[name])
        return {"lr": to_model(lr), "hr": to_model(hr), "name": name}
