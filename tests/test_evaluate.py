"""evaluate.py and dists.py: PSNR-Y / SSIM-Y against scikit-image on real photos, the folder CLI, DISTS
against a transcription of DISTS_pytorch (random backbone and mixing weights saved in the real formats)."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchvision.models.vgg import cfgs, make_layers

from plumbing.dists import load_dists, try_load_dists
from evaluate import evaluate_folders, main, psnr_y, rgb_to_y, ssim_y
from plumbing.weights import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(ROOT, "photos")


def photo(name, box):
    """A crop of a real photo as (H, W, 3) uint8; grey photos come back as RGB."""
    folder = "heldout" if name in ("chelsea.png", "coffee.png", "rocket.jpg") else "train"
    with Image.open(os.path.join(PHOTOS, folder, name)) as img:
        return np.asarray(img.convert("RGB").crop(box))


def degrade(array, seed):
    """Bicubic x4 down and up, then Gaussian noise of 5 grey levels, rounded to 8 bit."""
    img = Image.fromarray(array)
    small = img.resize((img.width // 4, img.height // 4), Image.BICUBIC).resize(img.size, Image.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 5, array.shape)
    return np.clip(np.asarray(small) + noise, 0, 255).round().astype(np.uint8)


def as_batch(*arrays):
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in arrays])  # (B, 3, H, W)


def skimage_y(array):
    return rgb2ycbcr(array)[..., 0]  # float64, 16..235


# ----------------------------------------------------------------------------------------------------
# PSNR-Y and SSIM-Y

def test_rgb_to_y_is_bt601_luma():
    x = torch.rand(2, 3, 5, 7)
    reference = skimage_y(x.permute(0, 2, 3, 1).double().numpy())
    assert np.abs(rgb_to_y(x)[:, 0].numpy() - reference).max() < 1e-10
    corners = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 0, 0]]).view(3, 3, 1, 1)
    assert rgb_to_y(corners).flatten().tolist() == pytest.approx([16.0, 235.0, 81.481], abs=1e-12)


def test_psnr_and_ssim_match_skimage_on_real_photos():
    gts = [photo("chelsea.png", (100, 50, 260, 170)), photo("camera.png", (150, 60, 310, 180))]
    srs = [degrade(gt, seed) for seed, gt in enumerate(gts)]
    psnr, ssim = psnr_y(as_batch(*srs), as_batch(*gts)), ssim_y(as_batch(*srs), as_batch(*gts))
    for i, (sr, gt) in enumerate(zip(srs, gts)):
        y_sr, y_gt = skimage_y(sr), skimage_y(gt)
        ref_psnr = peak_signal_noise_ratio(y_gt, y_sr, data_range=255)
        ref_ssim = structural_similarity(y_gt, y_sr, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
        assert abs(psnr[i].item() - ref_psnr) < 1e-6
        assert abs(ssim[i].item() - ref_ssim) < 1e-7
        assert 15 < ref_psnr < 40 and 0.2 < ref_ssim < 0.95  # the degradation is real, the match not trivial


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = as_batch(photo("coffee.png", (0, 0, 64, 48)), photo("brick.png", (0, 0, 64, 48)))
    assert torch.isinf(psnr_y(x, x.clone())).all()
    assert (ssim_y(x, x.clone()) - 1).abs().max() < 1e-12


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr_y(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(torch.rand(1, 3, 10, 16), torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        rgb_to_y(torch.rand(3, 16, 16))


# ----------------------------------------------------------------------------------------------------
# Folders and the command line

def save(array, path):
    Image.fromarray(array).save(path)


@pytest.fixture
def folders(tmp_path):
    """gt/{a, b, c, e}.png and sr/{a_x4, b, c, d}.png: a (suffix match) and b (identical) score, c has
    the wrong size, d has no GT and e no SR."""
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir(), gt.mkdir()
    a, b = photo("chelsea.png", (120, 60, 184, 108)), photo("coffee.png", (200, 100, 264, 148))
    save(a, gt / "a.png"), save(degrade(a, 0), sr / "a_x4.png")
    save(b, gt / "b.png"), save(b, sr / "b.png")
    save(photo("rocket.jpg", (0, 0, 64, 48)), gt / "c.png"), save(photo("rocket.jpg", (0, 0, 60, 48)), sr / "c.png")
    save(photo("gravel.png", (0, 0, 32, 32)), sr / "d.png"), save(photo("grass.png", (0, 0, 32, 32)), gt / "e.png")
    (sr / "readme.txt").write_text("not an image")
    return sr, gt, a, b


def test_cli_writes_json_lists_missing_and_fails_on_size_mismatch(folders, tmp_path, capsys):
    sr, gt, a, b = folders
    out = tmp_path / "metrics" / "scores.json"
    assert main(["--sr", str(sr), "--gt", str(gt), "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["images"]] == ["a", "b"]
    row_a, row_b = result["images"]
    assert row_a["sr"].endswith("a_x4.png") and row_a["gt"].endswith("a.png")
    assert row_a["psnr_y"] == pytest.approx(psnr_y(as_batch(degrade(a, 0)), as_batch(a)).item(), abs=1e-9)
    assert row_a["ssim_y"] == pytest.approx(ssim_y(as_batch(degrade(a, 0)), as_batch(a)).item(), abs=1e-9)
    assert row_b["psnr_y"] == float("inf") and row_b["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    assert result["mean"]["psnr_y"] == float("inf")
    assert result["mean"]["ssim_y"] == pytest.approx((row_a["ssim_y"] + 1.0) / 2, abs=1e-12)
    assert result["mean"]["lpips"] is None and row_a["dists"] is None
    assert row_a["niqe"] is None and any(n.startswith("a: no NIQE") for n in result["notes"])  # 64x48 < 193 px
    assert len(result["errors"]) == 1 and "c:" in result["errors"][0] and "60x48" in result["errors"][0]
    assert sorted(os.path.basename(line) for line in result["missing"]) == ["d.png", "e.png"]
    assert any("LPIPS off" in n and "--lpips-vgg" in n for n in result["notes"])
    assert any("DISTS off" in n and "--dists" in n for n in result["notes"])
    printed = capsys.readouterr().out
    mean_line = next(line for line in printed.splitlines() if line.startswith("mean"))
    assert "inf" in mean_line and f"{result['mean']['ssim_y']:.4f}" in mean_line
    assert "missing: no GT image for SR" in printed and "error: c:" in printed

    os.remove(sr / "c.png")
    assert main(["--sr", str(sr), "--gt", str(gt)]) == 0


def test_metrics_stay_on_the_cpu_while_the_networks_run_on_their_device(folders):
    """PSNR / SSIM / NIQE compute in float64, which an MPS device lacks: only LPIPS / DISTS get the images on the
    network's device (here 'meta', which computes nothing, standing in for it)."""
    sr, gt, _, _ = folders
    big = photo("coffee.png", (0, 0, 200, 200))  # NIQE needs 193 px: it is scored too
    save(big, gt / "f.png"), save(big, sr / "f.png")
    seen = []

    class NetworkOnAnotherDevice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))

        def forward(self, x, y):
            seen.append((x.device.type, y.device.type))
            return torch.tensor(0.25)
    report = evaluate_folders(sr, gt, lpips=NetworkOnAnotherDevice())
    assert seen == [("meta", "meta")] * 3 and [row["lpips"] for row in report["images"]] == [0.25] * 3
    assert report["images"][1]["psnr_y"] == float("inf")  # b: identical images, scored on the CPU
    assert report["images"][2]["name"] == "f" and report["images"][2]["niqe"] > 0


def test_cli_rejects_unknown_flags_and_requires_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--sr", str(tmp_path), "--gt", str(tmp_path), "--psnr-crop", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --psnr-crop" in capsys.readouterr().err
    assert main(["--gt", str(tmp_path)]) == 2
    assert main(["--sr", str(tmp_path / "nowhere"), "--gt", str(tmp_path)]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert main(["--sr", str(tmp_path), "--device", "gpu"]) == 2  # a typo: one line, not a traceback
    assert capsys.readouterr().err.splitlines() == ["evaluate.py: error: --device gpu: not a device (cpu, cuda, "
                                                    "cuda:N or mps)"]
    assert main(["--sr", str(tmp_path), "--json", str(tmp_path)]) == 2  # checked before any scoring
    assert capsys.readouterr().err.splitlines() == [f"evaluate.py: error: --json {tmp_path} is a folder; give a "
                                                    "file name"]


def test_cli_json_that_cannot_be_written_is_one_line(folders, tmp_path, capsys):
    sr, gt, _, _ = folders
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the JSON's folder should be")
    assert main(["--sr", str(sr), "--gt", str(gt), "--json", str(blocker / "scores.json")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: ") and str(blocker) in err[0]


def test_folders_subfolders_unreadable_files_and_duplicate_stems(tmp_path):
    sr, gt = tmp_path / "sr" / "set5", tmp_path / "gt" / "set5"
    sr.mkdir(parents=True), gt.mkdir(parents=True)
    g = photo("astronaut.png", (200, 100, 232, 132))
    save(g, gt / "g.png"), save(g, sr / "g_x4.png")
    save(g, gt / "h.png"), (sr / "h.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = evaluate_folders(tmp_path / "sr", tmp_path / "gt")
    assert [row["name"] for row in result["images"]] == ["set5/g"] and result["missing"] == []
    assert len(result["errors"]) == 1 and result["errors"][0].startswith("set5/h: ") and "h.png" in result["errors"][0]
    save(g, sr / "g_x4.jpg")
    with pytest.raises(ValueError, match="share the stem 'set5/g_x4'"):
        evaluate_folders(tmp_path / "sr", tmp_path / "gt")


def test_results_written_beside_their_inputs_pair_with_the_ground_truth(tmp_path, capsys):
    """`python sample.py lr/` writes lr/NAME_x4.png beside lr/NAME.png: the result is scored, not the input (a
    quarter of its size, either way round: a result turned upright by EXIF), and a note says so. Files that only
    share such names are scored as they are."""
    lr, gt = tmp_path / "lr", tmp_path / "gt"
    lr.mkdir(), gt.mkdir()
    hr = photo("chelsea.png", (120, 60, 184, 108))  # (48, 64, 3)
    save(hr, gt / "p.png"), save(hr[::4, ::4], lr / "p.png"), save(degrade(hr, 0), lr / "p_x4.png")
    save(hr.transpose(1, 0, 2), gt / "t.png"), save(hr[::4, ::4], lr / "t.png")  # stored 16x12, shown 12x16
    save(degrade(hr, 0).transpose(1, 0, 2), lr / "t_x4.png")
    save(hr[::4, ::4], lr / "q.png")  # an input without its result yet: unmatched, nothing to pair it with
    result = evaluate_folders(lr, gt)
    assert [(row["name"], os.path.basename(row["sr"])) for row in result["images"]] == [("p", "p_x4.png"),
                                                                                       ("t", "t_x4.png")]
    assert result["errors"] == [] and [os.path.basename(line) for line in result["missing"]] == ["q.png"]
    assert result["notes"][:2] == [f"{lr / 'p.png'}: left out, the input of {lr / 'p_x4'}",
                                   f"{lr / 't.png'}: left out, the input of {lr / 't_x4'}"]
    assert [row["sr"] for row in evaluate_folders(lr)["images"]] == [str(lr / n) for n in ("p_x4.png", "q.png",
                                                                                         "t_x4.png")]
    other = tmp_path / "other"  # another method's results for a GT set that has both foo and foo_x4
    other.mkdir()
    for folder in (gt, other):
        save(hr, folder / "foo.png"), save(hr[::2, ::2], folder / "foo_x4.png")
    names = {row["name"]: os.path.basename(row["sr"]) for row in evaluate_folders(other, gt)["images"]}
    assert names == {"foo": "foo.png", "foo_x4": "foo_x4.png"}
    assert main(["--sr", str(lr / "p_x4.png")]) == 2
    assert f"{lr / 'p_x4.png'}: not a folder" in capsys.readouterr().err


def test_ground_truth_of_odd_size_is_cropped_to_the_result_modcrop(tmp_path):
    """An HR of 66x50 gives an LR of 16x12 and an SR of 64x48: the GT's right and bottom strip goes (a note says
    so); any other difference in size stays an error."""
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir(), gt.mkdir()
    hr = photo("chelsea.png", (120, 60, 186, 110))  # (50, 66, 3)
    save(hr, gt / "a.png"), save(degrade(hr[:48, :64], 0), sr / "a_x4.png")
    save(hr, gt / "b.png"), save(degrade(hr[:48, :60], 0), sr / "b_x4.png")
    result = evaluate_folders(sr, gt)
    (row,) = result["images"]
    assert row["name"] == "a" and row["psnr_y"] == pytest.approx(
        psnr_y(as_batch(degrade(hr[:48, :64], 0)), as_batch(hr[:48, :64])).item(), abs=1e-9)
    assert "a: GT 66x50 cropped to 64x48 at the right and bottom" in result["notes"][0]
    assert len(result["errors"]) == 1 and result["errors"][0].startswith("b: SR 60x48")


# ----------------------------------------------------------------------------------------------------
# DISTS

class ReferenceDISTS(torch.nn.Module):
    """DISTS_pytorch's DISTS, transcribed: torchvision VGG16 features cut into stages, max-pools replaced
    by its L2pooling (np.hanning(5)[1:-1] filter, padding 1, stride 2)."""

    def __init__(self, features, alpha, beta):
        super().__init__()
        a = np.hanning(5)[1:-1]
        g = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
        self.filter = g / g.sum()
        cuts = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
        self.stages = [[features[i] for i in range(lo, hi)] for lo, hi in cuts]
        self.alpha, self.beta = alpha, beta
        self.chns = [3, 64, 128, 256, 512, 512]

    def l2pool(self, x):
        w = self.filter[None, None].repeat(x.shape[1], 1, 1, 1)
        return (F.conv2d(x ** 2, w, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()

    def forward_once(self, x):
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        h = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        feats = [x]
        for stage in self.stages:
            for layer in stage:
                h = self.l2pool(h) if isinstance(layer, torch.nn.MaxPool2d) else layer(h)
            feats.append(h)
        return feats

    def forward(self, x, y):
        feats0, feats1 = self.forward_once(x), self.forward_once(y)
        dist1 = dist2 = 0
        c1 = c2 = 1e-6
        w_sum = self.alpha.sum() + self.beta.sum()
        alpha = torch.split(self.alpha / w_sum, self.chns, dim=1)
        beta = torch.split(self.beta / w_sum, self.chns, dim=1)
        for k in range(len(self.chns)):
            x_mean = feats0[k].mean([2, 3], keepdim=True)
            y_mean = feats1[k].mean([2, 3], keepdim=True)
            S1 = (2 * x_mean * y_mean + c1) / (x_mean ** 2 + y_mean ** 2 + c1)
            dist1 = dist1 + (alpha[k] * S1).sum(1, keepdim=True)
            x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
            y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
            xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
            S2 = (2 * xy_cov + c2) / (x_var + y_var + c2)
            dist2 = dist2 + (beta[k] * S2).sum(1, keepdim=True)
        return 1 - (dist1 + dist2).flatten()


@pytest.fixture(scope="module")
def dists_files(tmp_path_factory):
    """A torchvision-format VGG16 file (features.* plus a classifier key) and a DISTS weights.pt."""
    folder = tmp_path_factory.mktemp("dists")
    torch.manual_seed(1)
    features = make_layers(cfgs["D"])
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(1000)
    alpha, beta = 0.1 + 0.02 * torch.rand(1, 1475, 1, 1), 0.1 + 0.02 * torch.rand(1, 1475, 1, 1)
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save({"alpha": alpha, "beta": beta}, folder / "weights.pt")
    return str(folder / "vgg16-397923af.pth"), str(folder / "weights.pt"), ReferenceDISTS(features, alpha, beta)


def test_dists_matches_dists_pytorch_transcription(dists_files):
    vgg_path, dists_path, reference = dists_files
    model = load_dists(vgg_path, dists_path)
    x = as_batch(photo("chelsea.png", (100, 50, 148, 90)), photo("ihc.png", (0, 0, 48, 40)))
    y = as_batch(*(degrade(a, 3) for a in (photo("chelsea.png", (100, 50, 148, 90)), photo("ihc.png", (0, 0, 48, 40)))))
    with torch.no_grad():
        ours, ref = model(x, y), reference(x, y)
    assert ours.shape == (2,) and (ref > 1e-3).all()
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    assert model(x, x).abs().max() < 1e-6


def test_dists_loading_errors_and_missing_files(dists_files, tmp_path):
    vgg_path, dists_path, _ = dists_files
    notes = []
    assert try_load_dists(None, None, log=notes.append) is None
    assert notes == ["DISTS off: no weights given (--dists and --vgg)"]
    with pytest.raises(WeightsError, match="DISTS needs two files; --vgg is not given"):
        try_load_dists(None, dists_path, log=pytest.fail)
    with pytest.raises(WeightsError, match="absent.pt: no such file"):
        try_load_dists(vgg_path, str(tmp_path / "absent.pt"), log=pytest.fail)
    bad = tmp_path / "bad.pt"
    torch.save({"alpha": torch.rand(1, 1474, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}, bad)
    with pytest.raises(WeightsError, match="bad.pt.*alpha"):
        try_load_dists(vgg_path, str(bad))
    with pytest.raises(WeightsError, match="weights.pt.*missing"):
        load_dists(dists_path, dists_path)


def test_cli_fills_dists_column(dists_files, folders, tmp_path):
    vgg_path, dists_path, _ = dists_files
    sr, gt, a, b = folders
    os.remove(sr / "c.png")
    out = tmp_path / "scores.json"
    assert main(["--sr", str(sr), "--gt", str(gt), "--json", str(out), "--vgg", vgg_path, "--dists", dists_path]) == 0
    result = json.loads(out.read_text())
    with torch.no_grad():
        expected = load_dists(vgg_path, dists_path)(as_batch(degrade(a, 0)), as_batch(a)).item()
    assert result["images"][0]["dists"] == pytest.approx(expected, abs=1e-6)
    assert abs(result["images"][1]["dists"]) < 1e-6
    assert result["mean"]["dists"] == pytest.approx((result["images"][0]["dists"] + result["images"][1]["dists"]) / 2)
    assert not any("DISTS" in n for n in result["notes"])


def test_cli_fills_lpips_column(dists_files, folders, tmp_path):
    losses = pytest.importorskip("losses")
    vgg_path = dists_files[0]
    heads_path = os.path.join(os.path.dirname(importlib.util.find_spec("lpips").origin), "weights", "v0.1", "vgg.pth")
    sr, gt, a, b = folders
    os.remove(sr / "c.png")
    out = tmp_path / "scores.json"
    assert main(["--sr", str(sr), "--gt", str(gt), "--json", str(out),
                 "--lpips-vgg", vgg_path, "--lpips-heads", heads_path]) == 0
    result = json.loads(out.read_text())
    with torch.no_grad():
        expected = losses.try_load_lpips(vgg_path, heads_path)(as_batch(degrade(a, 0)) * 2 - 1, as_batch(a) * 2 - 1)
    assert result["images"][0]["lpips"] == pytest.approx(expected.item(), abs=1e-6)
    assert result["images"][1]["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert result["images"][0]["dists"] is None
