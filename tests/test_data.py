import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from conftest import PHOTOS
from data import HRFolderDataset, ImageError, from_model, load_image, save_image, to_model

TRAIN = os.path.join(PHOTOS, "train")



def png_bytes(width, height, bit_depth, color_type, rows):
    """A PNG file written by hand (for what Pillow cannot write, such as 16-bit RGB or a huge header)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def noise_image(size=(32, 24), mode="RGB"):
    return Image.effect_noise(size, 60).convert(mode)


def assert_one_line_error(path, match, **kwargs):
    with pytest.raises(ImageError, match=match) as error:
        load_image(path, **kwargs)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- load_image: modes

def test_rgb_photo_loads_in_unit_range():
    image, alpha, _ = load_image(os.path.join(TRAIN, "astronaut.png"))
    assert image.shape == (3, 512, 512) and image.dtype == torch.float32 and alpha is None
    assert image.min() >= 0 and image.max() <= 1 and image.max() > 0.9


def test_grayscale_photo_becomes_three_equal_channels():
    assert Image.open(os.path.join(TRAIN, "camera.png")).mode == "L"
    image, _, _ = load_image(os.path.join(TRAIN, "camera.png"))
    assert image.shape == (3, 512, 512)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_16_bit_grayscale_keeps_its_scale(tmp_path):
    path = tmp_path / "gray16.png"
    gray = Image.new("I;16", (16, 8))
    gray.putpixel((0, 0), 65535)
    gray.putpixel((1, 0), 1000)
    gray.putpixel((2, 0), 32768)
    gray.save(path)
    image, alpha, _ = load_image(path)
    assert image.shape == (3, 8, 16) and alpha is None
    for x, value in ((0, 65535), (1, 1000), (2, 32768), (3, 0)):
        assert abs(image[0, 0, x].item() - value / 65535) < 1e-6
    assert torch.equal(image[0], image[2])


def test_16_bit_rgb_png_keeps_its_scale(tmp_path):
    path = tmp_path / "rgb16.png"
    values = (1000, 30000, 65535)
    row = struct.pack(">HHH", *values) * 8
    path.write_bytes(png_bytes(8, 8, 16, 2, [row] * 8))
    image, _, _ = load_image(path)
    for channel, value in enumerate(values):
        assert abs(image[channel, 3, 3].item() - value / 65535) <= 1 / 255


def test_float_image_is_taken_as_unit_range(tmp_path):
    path = tmp_path / "float.tiff"
    Image.new("F", (10, 12), 0.25).save(path)
    image, _, _ = load_image(path)
    assert image.shape == (3, 12, 10) and torch.allclose(image, torch.full_like(image, 0.25))


@pytest.mark.parametrize("mode, value, message", [
    ("F", 200.0, "F pixels from 200 to 200, outside the range 0 .. 1 of this mode"),  # a 0..255 float TIFF
    ("F", float("nan"), "F pixels from nan"),
    ("I", 70000, "I pixels from 70000 to 70000, outside the range 0 .. 65535 of this mode"),
    ("I", -5, "I pixels from -5"),
])
def test_pixels_outside_the_modes_scale_are_refused_not_clipped(tmp_path, mode, value, message):
    path = tmp_path / "out_of_range.tiff"
    Image.new(mode, (10, 12), value).save(path)
    with pytest.raises(ImageError) as error:
        load_image(path)
    assert str(error.value).startswith(f"{path}: {message}")


def test_a_float_image_may_overshoot_a_little_and_is_clipped(tmp_path):
    pixels = np.full((12, 10), 0.5, np.float32)
    pixels[0, 0], pixels[0, 1] = -0.02, 1.03  # what resampling leaves around edges
    Image.fromarray(pixels, "F").save(tmp_path / "float.tiff")
    image, _, _ = load_image(tmp_path / "float.tiff")
    assert image[0, 0, 0] == 0 and image[0, 0, 1] == 1 and image[0, 5, 5] == 0.5


def test_a_camera_jpeg_with_a_preview_frame_loads_its_main_image(tmp_path):
    main, preview = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (20, 15), (0, 0, 255))
    main.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview])
    with Image.open(tmp_path / "camera.jpg") as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
    image, _, _ = load_image(tmp_path / "camera.jpg")
    assert image.shape == (3, 30, 40) and image[0].mean() > 0.7 and image[2].mean() < 0.2


def test_a_still_gif_loads_and_an_animation_is_refused(tmp_path):
    frames = [Image.fromarray(np.full((12, 10, 3), value, np.uint8)) for value in (40, 200)]
    frames[0].save(tmp_path / "still.gif")
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    image, _, _ = load_image(tmp_path / "still.gif")
    assert image.shape == (3, 12, 10) and torch.allclose(image, torch.full_like(image, 40 / 255))
    with pytest.raises(ImageError, match="moving.gif: 2 frames"):
        load_image(tmp_path / "moving.gif")
    with pytest.raises(ImageError, match="moving.gif: 2 frames"):  # training's start-up check sees it too
        data.probe_image(tmp_path / "moving.gif")


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (10, 10))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((3, 2), 1)
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "clear.png", transparency=0)
    opaque, no_alpha, _ = load_image(tmp_path / "opaque.png")
    assert no_alpha is None
    assert opaque[:, 0, 0].tolist() == [1, 0, 0] and opaque[:, 2, 3].tolist() == [0, 1, 0]
    clear, alpha, _ = load_image(tmp_path / "clear.png")
    assert alpha.shape == (1, 10, 10) and alpha[0, 0, 0] == 0 and alpha[0, 2, 3] == 1
    assert clear[:, 2, 3].tolist() == [0, 1, 0]


def test_rgba_and_la_alpha_come_back_separately(tmp_path):
    Image.new("RGBA", (12, 10), (255, 128, 0, 64)).save(tmp_path / "rgba.png")
    image, alpha, _ = load_image(tmp_path / "rgba.png")
    assert image.shape == (3, 10, 12) and alpha.shape == (1, 10, 12)
    assert torch.allclose(image[:, 0, 0], torch.tensor([1, 128 / 255, 0])) and abs(alpha.max() - 64 / 255) < 1e-7
    Image.new("LA", (12, 10), (100, 200)).save(tmp_path / "la.png")
    image, alpha, _ = load_image(tmp_path / "la.png")
    assert torch.allclose(image, torch.full_like(image, 100 / 255))
    assert torch.allclose(alpha, torch.full_like(alpha, 200 / 255))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    image, _, _ = load_image(tmp_path / "cmyk.jpg")
    assert image.shape == (3, 16, 16)
    assert (image.mean((1, 2)) - torch.tensor([1.0, 0.0, 0.0])).abs().max() < 0.05


def test_exif_orientation_6_is_applied(tmp_path):
    stored = Image.new("RGB", (32, 16), (0, 0, 0))
    stored.paste((255, 255, 255), (16, 0, 32, 16))  # right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    image, _, _ = load_image(tmp_path / "rotated.jpg")
    assert image.shape == (3, 32, 16)
    expected = torch.zeros(3, 32, 16)
    expected[:, 16:] = 1  # the stored right half ends up at the bottom
    assert (image - expected).abs().mean() < 0.03


# ----------------------------------------------------------------------------- load_image: bad files

def test_missing_empty_and_non_image_files_are_one_line_errors(tmp_path):
    assert_one_line_error(tmp_path / "missing.png", "no such file")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.png", "empty file")
    (tmp_path / "random.png").write_bytes(os.urandom(2000))
    assert_one_line_error(tmp_path / "random.png", "not a readable image")


def test_truncated_files_fail_at_load(tmp_path):
    for name in ("cut.png", "cut.jpg"):
        whole = tmp_path / ("whole" + os.path.splitext(name)[1])
        noise_image((64, 64)).save(whole)
        contents = whole.read_bytes()
        (tmp_path / name).write_bytes(contents[:len(contents) // 2])
        assert_one_line_error(tmp_path / name, "not a readable image")


def test_too_small_image(tmp_path):
    noise_image((20, 4)).save(tmp_path / "thin.png")
    assert_one_line_error(tmp_path / "thin.png", "smaller than 8 pixels")
    assert load_image(tmp_path / "thin.png", min_size=4)[0].shape == (3, 4, 20)


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    noise_image((64, 64)).save(tmp_path / "ok.png")
    assert_one_line_error(tmp_path / "ok.png", "exceeds the limit of 1000 pixels", max_pixels=1000)
    empty_rows = [b""]  # the header alone must stop it: there are no pixels to decode
    (tmp_path / "huge.png").write_bytes(png_bytes(100_000, 100_000, 8, 2, empty_rows))
    assert_one_line_error(tmp_path / "huge.png", "too large to decode safely")
    (tmp_path / "big.png").write_bytes(png_bytes(10_000, 10_000, 8, 2, empty_rows))  # Pillow only warns here
    assert_one_line_error(tmp_path / "big.png", "too large to decode safely", max_pixels=10 ** 9)
    (tmp_path / "large.png").write_bytes(png_bytes(9_000, 9_000, 8, 2, empty_rows))  # below Pillow's limits
    assert_one_line_error(tmp_path / "large.png", f"exceeds the limit of {data.MAX_PIXELS} pixels")


# ----------------------------------------------------------------------------- save_image, helpers

def test_png_round_trip_is_exact_with_alpha(tmp_path):
    image = torch.randint(0, 256, (3, 9, 13)).float() / 255
    alpha = torch.randint(0, 256, (1, 9, 13)).float() / 255
    save_image(image, tmp_path / "out.png")
    assert torch.equal(load_image(tmp_path / "out.png")[0], image)
    save_image(image, tmp_path / "out.png", alpha=alpha)
    loaded, loaded_alpha, _ = load_image(tmp_path / "out.png")
    assert torch.equal(loaded, image) and torch.equal(loaded_alpha, alpha)
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_jpeg_and_webp_are_chosen_by_extension(tmp_path):
    image, _, _ = load_image(os.path.join(TRAIN, "astronaut.png"))
    image = image[:, 200:264, 200:264]
    for name, file_format in (("out.jpg", "JPEG"), ("out.JPEG", "JPEG"), ("out.webp", "WEBP")):
        save_image(image, tmp_path / name)
        assert Image.open(tmp_path / name).format == file_format
        assert (load_image(tmp_path / name)[0] - image).abs().mean() < 0.03


def test_save_errors(tmp_path):
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="unknown image extension"):
        save_image(image, tmp_path / "out.gif")
    with pytest.raises(ValueError, match="JPEG cannot store an alpha"):
        save_image(image, tmp_path / "out.jpg", alpha=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        save_image(torch.rand(1, 8, 8), tmp_path / "out.png")
    with pytest.raises(ValueError, match="NaN"):
        save_image(torch.full((3, 8, 8), float("nan")), tmp_path / "out.png")
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    save_image(torch.zeros(3, 8, 8), path)
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.ones(3, 8, 8), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.png"]


def test_a_write_that_cannot_start_names_the_file_asked_for(tmp_path):
    path = tmp_path / ("x" * 248 + ".png")  # a legal name whose temporary twin (".tmp-PID-" + name) is too long
    with pytest.raises(OSError) as error:
        save_image(torch.zeros(3, 8, 8), path)
    assert str(error.value).endswith(f"cannot write {path}: File name too long") and ".tmp-" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_model_range_helpers():
    x = torch.rand(3, 5, 5)
    assert torch.equal(to_model(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(from_model(to_model(x)), x, atol=1e-7)
    assert torch.equal(from_model(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))


# ----------------------------------------------------------------------------- HRFolderDataset

def test_dataset_on_real_photos_shapes_ranges_and_determinism():
    dataset = HRFolderDataset(TRAIN, crop_size=64, seed=3, length=20)
    assert len(dataset) == 20 and len(dataset.paths) == 10
    item = dataset[0]
    assert item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 16, 16)
    for value in item.values():
        assert value.dtype == torch.float32 and value.min() >= -1 and value.max() <= 1
    again = HRFolderDataset(TRAIN, crop_size=64, seed=3, length=20)[0]
    assert torch.equal(again["hr"], item["hr"]) and torch.equal(again["lr"], item["lr"])
    assert not torch.equal(dataset[10]["hr"], item["hr"])  # same file (10 mod 10), another crop
    # every draw of item i, the crop's and the degradation's, comes from one generator seeded by (seed, i)
    generator = torch.Generator().manual_seed(data._item_seed(3, 10))
    hr = data.random_crop_augment(load_image(dataset.paths[0])[0], 64, generator)
    lr = data.DEGRADATIONS["realesrgan"](hr, 4, generator)
    assert torch.equal(dataset[10]["hr"], to_model(hr)) and torch.equal(dataset[10]["lr"], to_model(lr))
    assert torch.equal(dataset[0]["lr"], item["lr"])  # read again, its photo now from the cache
    assert not torch.equal(HRFolderDataset(TRAIN, crop_size=64, seed=4)[0]["hr"], item["hr"])
    with pytest.raises(IndexError):
        dataset[20]


def test_grayscale_photo_gives_gray_rgb_pairs():
    dataset = HRFolderDataset(TRAIN, crop_size=64, degradation="bicubic")
    assert os.path.basename(dataset.paths[1]) == "brick.png"
    item = dataset[1]
    for image in (item["hr"], item["lr"]):
        assert image.shape[0] == 3 and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    expected = data.degrade_bicubic(from_model(item["hr"]))
    assert torch.allclose(from_model(item["lr"]), expected, atol=1e-6)


def test_length_cycles_files_and_small_images_are_upscaled(tmp_path):
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "b.png")
    dataset = HRFolderDataset(tmp_path, crop_size=32, degradation="bicubic", length=5)
    for index in range(5):
        hr = from_model(dataset[index]["hr"])
        assert hr.shape == (3, 32, 32)
        expected = torch.tensor([1.0, 0, 0] if index % 2 == 0 else [0, 0, 1.0])
        assert (hr.mean((1, 2)) - expected).abs().max() < 1e-5


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    noise_image((48, 48)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "junk.jpg").write_bytes(os.urandom(500))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as caught:
        dataset = HRFolderDataset(tmp_path, crop_size=32)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "empty.png" in messages[0] and "junk.jpg" in messages[1]
    assert dataset.paths == [str(tmp_path / "good.png")]


def test_a_file_that_breaks_during_training_is_replaced(tmp_path):
    noise_image((48, 48)).save(tmp_path / "a_good.png")
    noise_image((48, 48)).save(tmp_path / "whole.jpg")
    contents = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "b_cut.jpg").write_bytes(contents[:len(contents) // 2])  # passes the cheap check, fails to decode
    (tmp_path / "whole.jpg").unlink()
    dataset = HRFolderDataset(tmp_path, crop_size=32, degradation="bicubic")
    assert len(dataset) == 2
    with pytest.warns(UserWarning, match="b_cut.jpg"):
        item = dataset[1]
    assert item["hr"].shape == (3, 32, 32)
    fresh = HRFolderDataset(tmp_path, crop_size=32, degradation="bicubic")
    batch = next(iter(torch.utils.data.DataLoader(fresh, batch_size=2, num_workers=1)))  # the worker survives
    assert batch["hr"].shape == (2, 3, 32, 32) and torch.equal(batch["hr"][1], item["hr"])


def test_empty_or_unreadable_folders_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        HRFolderDataset(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of its 1 image files is readable"):
        HRFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        HRFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown degradation"):
        HRFolderDataset(TRAIN, degradation="jpeg")
    with pytest.raises(ValueError, match="crop size 66 for the realesrgan degradation: .*must be divisible by 4"):
        HRFolderDataset(TRAIN, crop_size=66)


def test_crop_augmentation_rotates_zooms_and_makes_some_crops_smooth():
    from data import random_crop_augment
    photo = load_image(os.path.join(TRAIN, "astronaut.png"))[0]
    crops = [random_crop_augment(photo, 32, torch.Generator().manual_seed(s), zoom_out=2.0) for s in range(40)]
    assert all(c.shape == (3, 32, 32) and 0 <= c.min() and c.max() <= 1 for c in crops)
    plain = torch.stack([random_crop_augment(photo, 32, torch.Generator().manual_seed(s), zoom_out=1.0)
                         for s in range(40)])
    zoomed = torch.stack(crops)

    def detail(x):  # mean |x - its 3x3 mean|: zooming out packs more detail into a crop, blurring removes it
        return (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean().item()
    assert detail(zoomed) > 1.1 * detail(plain)
    ramp = torch.linspace(0, 1, 256).expand(3, 256, 256)  # one level per pixel: a crop's span gives its window
    zooms = [(c.max() - c.min()).item() * 255 / 31 for c in
             (random_crop_augment(ramp, 32, torch.Generator().manual_seed(s), zoom_out=2.0) for s in range(40))]
    assert min(zooms) < 1.2 and max(zooms) > 1.8 and all(0.99 < z < 2.01 for z in zooms)  # measured 1.00 .. 1.997
    smooth = torch.stack([random_crop_augment(photo, 32, torch.Generator().manual_seed(s), flat_prob=1.0)
                          for s in range(40)])
    assert detail(smooth) < 0.3 * detail(zoomed)
    # a crop that holds its orientation marker tells the 8 flips / rotations apart
    marker = torch.zeros(3, 32, 32)
    marker[:, 0, :3] = 1
    marker[:, 1, 0] = 1
    seen = {tuple(random_crop_augment(marker, 32, torch.Generator().manual_seed(s), zoom_out=1.0)
                  .nonzero()[:, 1:].flatten().tolist()) for s in range(80)}
    assert len(seen) == 8


def test_smooth_crops_smaller_than_the_blur_kernel():
    """--crop-size 16 with flat crops: the blur (sigma up to 6 px, a 37-px kernel) still smooths, with a cut kernel."""
    from data import gaussian_blur, random_crop_augment
    photo = load_image(os.path.join(TRAIN, "astronaut.png"))[0]
    crops = [random_crop_augment(photo, 16, torch.Generator().manual_seed(s), flat_prob=1.0) for s in range(8)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    sharp_crops = [random_crop_augment(photo, 16, torch.Generator().manual_seed(s)) for s in range(8)]
    detail = lambda x: (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean().item()
    assert detail(torch.stack(crops)) < 0.3 * detail(torch.stack(sharp_crops))  # the blur did run on them
    sharp = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(sharp, 6.0)
    assert blurred.std() < 0.2 * sharp.std() and abs(blurred.mean() - sharp.mean()) < 0.05
