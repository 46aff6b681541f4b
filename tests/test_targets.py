"""bench/targets.py: the three targets of the bundled model, checked on a folder of photos; and the checks
bench/reproduce.py makes before it trains."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import PHOTOS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import targets  # noqa: E402
from data import load_image  # noqa: E402
from degradations import degrade_bicubic  # noqa: E402
from evaluate import psnr_y  # noqa: E402
from flowsr import FlowSR, super_resolve  # noqa: E402
from reproduce import to_8bit  # noqa: E402

KINDS = ("bicubic", "jpeg75", "realesrgan")


def scored(psnr, niqe):
    return {("a", kind): (psnr, niqe) for kind in KINDS}


def test_each_target_passes_and_fails_at_its_threshold():
    images = [("a", None, dict.fromkeys(KINDS))]
    bicubic, peer = scored(30.0, 20.0), scored(29.0, 15.0)
    verdicts = targets.check({"bicubic": bicubic, "realesrgan": peer, "model": scored(28.5, 17.9)}, images,
                             {"a, blurred": -0.9})
    assert [v[0] for v in verdicts] == ["fidelity"] * 3 + ["perception"] * 3 + ["flat"]
    assert all(ok for _, _, ok, _ in verdicts)  # 28.5 = min(30, 29) - 0.5; NIQE 17.9 <= 20 - 2; flat -0.9 dB
    verdicts = targets.check({"bicubic": bicubic, "realesrgan": peer, "model": scored(28.49, 18.1)}, images,
                             {"a, blurred": -1.1})
    assert not any(ok for _, _, ok, _ in verdicts)
    # without the peer the floor is bicubic's alone; photos too small for NIQE leave perception unmet, and say so
    verdicts = targets.check({"bicubic": bicubic, "model": scored(29.4, None)}, images, {})
    assert [(target, ok) for target, _, ok, _ in verdicts] == [("fidelity", False)] * 3 + [("perception", False)] * 3
    assert verdicts[-1][3] == "not measured: no photo of 193 px a side"


def test_runs_on_a_folder_and_writes_its_verdicts(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("brick.png", "camera.png"):
        Image.open(os.path.join(PHOTOS, "train", name)).convert("RGB").resize((64, 48)).save(photos / name)
    out, checkpoint = tmp_path / "targets", tmp_path / "random.safetensors"
    torch.manual_seed(0)
    FlowSR.tiny(flat_gate=0.0).save(checkpoint)  # random weights, no gate: its output is not bicubic's
    targets.main(["--heldout", str(photos), "--out", str(out), "--work-dir", str(tmp_path / "cache"),
                  "--threads", "1", "--checkpoint", str(checkpoint)])
    report = json.loads((tmp_path / "targets.json").read_text())
    assert [v[:2] for v in report["verdicts"]] == (
        [["fidelity", f"{name}, {targets.KINDS[kind]}"] for name in ("brick", "camera") for kind in KINDS]
        + [["perception", targets.KINDS[kind]] for kind in KINDS]  # not measured: 48 px is too small for NIQE
        + [["flat", f"{name}, blurred (sigma 4)"] for name in ("brick", "camera")])
    assert set(report["results"]["model"]) == {f"{name}|{kind}" for name in ("brick", "camera") for kind in KINDS}
    assert "| brick | clean bicubic |" in (tmp_path / "targets.md").read_text()
    # the numbers: bicubic's PSNR-Y recomputed here, the model's its own, the verdicts check()'s on them
    hr = to_8bit(load_image(photos / "brick.png")[0][None])
    bicubic = to_8bit(F.interpolate(degrade_bicubic(hr[0], 4)[None], scale_factor=4, mode="bicubic"))
    assert report["results"]["bicubic"]["brick|bicubic"][0] == pytest.approx(psnr_y(bicubic, hr).item(), abs=1e-9)
    model = to_8bit(super_resolve(FlowSR.load(checkpoint).eval(), degrade_bicubic(hr[0], 4)[None], 1, tile_size=0,
                                  vae_tile_size=0))
    assert report["results"]["model"]["brick|bicubic"][0] == pytest.approx(psnr_y(model, hr).item(), abs=1e-9)
    assert report["results"]["model"]["brick|bicubic"][0] != report["results"]["bicubic"]["brick|bicubic"][0]
    images = [(name, None, dict.fromkeys(KINDS)) for name in ("brick", "camera")]
    results = {key: {tuple(k.rsplit("|", 1)): tuple(v) for k, v in r.items()} for key, r in report["results"].items()}
    fidelity = [v for v in targets.check(results, images, {}) if v[0] == "fidelity"]
    assert [list(v) for v in fidelity] == report["verdicts"][:6]


def test_niqe_offsets_average_the_crops_moved_right_and_down(monkeypatch):
    """--niqe-offsets: the mean over crops at each offset, each smaller by the largest offset; the whole image
    without offsets; None where a crop is under NIQE's minimum size."""
    monkeypatch.setattr(targets, "niqe", lambda x: x[:, 0, 0, 0] * 1000 + x.shape[2] + x.shape[3] / 1000)
    sr = torch.rand(1, 3, 200, 230)
    whole = sr[0, 0, 0, 0].item() * 1000 + 200 + 0.23
    assert targets.niqe_score(sr, []) == pytest.approx(whole)
    moved = [sr[0, 0, o, o].item() * 1000 + 197 + 0.227 for o in (0, 3)]  # crops of 197 x 227
    assert targets.niqe_score(sr, [0, 3]) == pytest.approx(sum(moved) / 2)
    assert targets.niqe_score(sr, [0, 8]) is None  # 192 px: under NIQE_MIN_SIZE
    assert targets.niqe_score(sr[..., :192, :], []) is None
    assert targets.niqe_score(sr[..., :193, :], []) is not None and targets.niqe_score(sr, [0, 7]) is not None


@pytest.mark.parametrize("argv, message", [
    (["--heldout", "{tmp}", "--niqe-offsets", "0", "-4"], "--niqe-offsets take whole numbers of pixels"),
    (["--heldout", "{tmp}", "--crop", "208", "--niqe-offsets", "0", "16"], "--crop 208 less the largest"),
    (["--heldout", "{tmp}/nowhere"], "not a folder of photos"),
    (["--heldout", "{tmp}", "--crop", "100"], "--crop 100: NIQE needs at least 208"),
    (["--heldout", "{tmp}", "--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
])
def test_bad_arguments_exit_with_one_line(tmp_path, argv, message):
    with pytest.raises(SystemExit) as stop:
        targets.main([arg.format(tmp=tmp_path) for arg in argv])
    assert str(stop.value).startswith("error: ") and message in str(stop.value) and "\n" not in str(stop.value)


def test_an_unreadable_photo_in_the_folder_is_one_line(tmp_path):
    from report import run_main
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: targets.main(["--heldout", str(tmp_path), "--out", str(tmp_path / "out")]))
    assert stop.value.code == f"error: {tmp_path / 'bad.png'}: not a readable image (cannot identify image file " \
                              f"'{tmp_path / 'bad.png'}')"


@pytest.mark.parametrize("argv, message", [
    (["--euler-steps", "2", "x"], "--euler-steps / --uniform-steps take whole numbers >= 1"),
    (["--heldout", "{tmp}/nowhere"], "no such folder"),
    (["--heldout", "{tmp}"], "small 160x96: under 193 px a side"),
])
def test_reproduce_checks_its_scoring_flags_before_training(tmp_path, argv, message):
    """bench/reproduce.py trains for tens of minutes before it scores: what only the scoring reads is checked first."""
    import reproduce
    Image.new("RGB", (160, 104)).save(tmp_path / "small.png")
    work_dir = tmp_path / "work"
    with pytest.raises(SystemExit) as stop:
        reproduce.main([arg.format(tmp=tmp_path) for arg in argv] + ["--work-dir", str(work_dir)])
    assert str(stop.value).startswith("error: ") and message in str(stop.value)
    assert not work_dir.exists()  # nothing trained, nothing written


def test_tiles_bench_scores_each_tiling_and_refuses_what_it_cannot_run(tmp_path, capsys):
    """bench/tiles.py: its one-pass row is super_resolve without tiles, and a tiled row is another computation."""
    import tiles
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(os.path.join(PHOTOS, "heldout", "coffee.png")).convert("RGB").crop((0, 0, 320, 208)).save(
        photos / "coffee.png")
    checkpoint = tmp_path / "random.safetensors"
    torch.manual_seed(0)
    FlowSR.tiny(flat_gate=0.0).save(checkpoint)  # random weights, no gate: tiles change its output
    tiles.main(["--heldout", str(photos), "--checkpoint", str(checkpoint), "--tiles", "0/0", "32/8", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| one pass", "| 32 / 8"]
    hr = load_image(photos / "coffee.png")[0]
    model = FlowSR.load(checkpoint).eval()
    clean = to_8bit(super_resolve(model, degrade_bicubic(hr, 4)[None], 1, tile_size=0, vae_tile_size=0))
    assert rows[0].split(" | ")[2].startswith(f"{psnr_y(clean, hr[None]).item():.3f} / ")
    assert rows[1].split(" | ")[2] != rows[0].split(" | ")[2]
    for bad in (["--tiles", "33/8"], ["--tiles", "32/32"], ["--tiles", "x"], ["--crop", "160"]):
        with pytest.raises(ValueError, match="--tiles|NIQE needs photos of at least 193 px"):
            tiles.main(["--heldout", str(photos), "--checkpoint", str(checkpoint), *bad])
