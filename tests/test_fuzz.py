"""Fuzzing the two readers of untrusted files: images (data.load_image, what sample.py reads with) and
checkpoints (FlowSR.load). Every malformed file must give one clear error, never a crash, a traceback, or a
huge allocation; and no code may unpickle with torch.load without weights_only=True.
"""
import ast
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import PHOTOS, ROOT
from flowsr import FlowSR
from unet import UNet, UNetConfig
from vae import PixelAutoencoder
from plumbing.weights import WeightsError

LIMIT_GB = 3  # extra address space the image fuzz loop may take: a decompression bomb would hit it and fail loudly


# ---- images -----------------------------------------------------------------------------------------------

def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, rows=b"", extra_chunks=b""):
    """A PNG with any declared size (8-bit RGB) and any pixel data: valid CRCs, so only the size check can stop it."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + extra_chunks + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


def valid_images():
    """Small real images in many formats and modes: the seeds of the mutations."""
    rgb = Image.open(os.path.join(PHOTOS, "heldout", "coffee.png")).convert("RGB").resize((24, 16))
    gray16 = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
    return {
        "png": encoded(rgb, "PNG"), "jpg": encoded(rgb, "JPEG", quality=90),
        "progressive.jpg": encoded(rgb, "JPEG", progressive=True), "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "webp": encoded(rgb, "WEBP"), "bmp": encoded(rgb, "BMP"), "tif": encoded(rgb, "TIFF", compression="tiff_lzw"),
        "gif": encoded(rgb.quantize(32), "GIF"), "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "16bit.png": encoded(gray16, "PNG"), "palette.png": encoded(rgb.quantize(16), "PNG"),
    }


def bombs(seeds):
    """Files that declare (or hold) far more pixels than they are worth."""
    jpg = bytearray(seeds["jpg"])
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    gif = bytearray(seeds["gif"])
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    bmp = bytearray(seeds["bmp"])
    bmp[18:26] = struct.pack("<ii", 200000, 200000)
    text_bomb = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b" " * (64 << 20), 9))
    return {
        "declared.png": png(100000, 100000, b"\0" * 1000),
        "max.png": png(2 ** 31 - 1, 2 ** 31 - 1),
        "strip.png": png(1_000_000, 1, b"\0" * (1 + 3 * 1_000_000)),  # a side below 8 pixels
        "zeros.png": png(4096, 4096, (b"\0" * (1 + 3 * 4096)) * 4096),  # 16 M pixels in a 50 kB file
        "text-bomb.png": png(8, 8, (b"\0" * 25) * 8, extra_chunks=text_bomb),
        "sof.jpg": bytes(jpg), "screen.gif": bytes(gif), "huge.bmp": bytes(bmp),
    }


def fuzz_images(folder, rng):
    seeds = valid_images()
    files = {**{f"seed.{k}": v for k, v in seeds.items()}, **bombs(seeds)}
    extensions = [".png", ".jpg", ".webp", ".bmp", ".tif", ".gif", ".jpeg"]
    for name, data in seeds.items():
        for i in range(8):  # truncated at random offsets
            files[f"cut{i}.{name}"] = data[:rng.randrange(len(data))]
        for i in range(8):  # a few random bytes changed
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 12)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            files[f"flip{i}.{name}"] = bytes(mutated)
        files[f"wrongext.{name}{rng.choice(extensions)}"] = data  # content decides, not the name
    magics = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\0", b"RIFF\0\0\0\0WEBPVP8 "]
    for i in range(60):  # noise, some of it behind a real signature
        files[f"noise{i}{rng.choice(extensions)}"] = rng.choice(magics) + rng.randbytes(rng.randrange(2000))
    paths = []
    for name, data in files.items():
        path = os.path.join(folder, name if os.path.splitext(name)[1] else name + ".png")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


READ_LOOP = textwrap.dedent("""
    import json, resource, sys
    import data
    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_bytes() + int(sys.argv[1]) * 2 ** 30  # torch maps GBs of address space at import: cap what follows
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in sys.argv[3:]:
        try:
            rgb, alpha, _ = data.load_image(path, max_pixels=int(sys.argv[2]))
            ok = (rgb.dtype == data.torch.float32 and rgb.dim() == 3 and rgb.shape[0] == 3
                  and bool(rgb.isfinite().all()) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1
                  and (alpha is None or tuple(alpha.shape) == (1, *rgb.shape[1:])))
            print(json.dumps({"path": path, "result": "image" if ok else "bad tensors"}), flush=True)
        except data.ImageError as e:
            print(json.dumps({"path": path, "result": "ImageError", "message": str(e)}), flush=True)
        except BaseException as e:
            print(json.dumps({"path": path, "result": type(e).__name__, "message": str(e)}), flush=True)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    print(json.dumps({"rss_growth_kb": rss_growth}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_image_fuzz_gives_image_errors_in_bounded_memory(tmp_path):
    paths = fuzz_images(str(tmp_path), random.Random(0))
    assert len(paths) > 250
    max_pixels = sample.SampleConfig().max_pixels
    result = subprocess.run([sys.executable, "-c", READ_LOOP, str(LIMIT_GB), str(max_pixels), *paths],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]  # a crash (segfault, abort) ends here
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    outcomes, rss_growth_kb = lines[:-1], lines[-1]["rss_growth_kb"]
    assert [o["path"] for o in outcomes] == paths
    unexpected = [o for o in outcomes if o["result"] not in ("image", "ImageError")]
    assert not unexpected, unexpected[:5]
    for o in outcomes:
        if o["result"] == "ImageError":
            assert o["message"].startswith(o["path"] + ": ") and "\n" not in o["message"]
            assert "MemoryError" not in o["message"]  # a refusal, not an allocation that failed against the cap
    by_name = {os.path.basename(o["path"]): o for o in outcomes}
    for name in ("declared.png", "max.png", "zeros.png", "sof.jpg", "screen.gif", "huge.bmp"):
        assert re.search(r"exceeds the limit|too large to decode safely", by_name[name]["message"]), by_name[name]
    assert "smaller than 8 pixels" in by_name["strip.png"]["message"]
    assert all(o["result"] == "image" for name, o in by_name.items() if name.startswith(("seed.", "wrongext.")))
    assert sum(o["result"] == "ImageError" for o in outcomes) > 100
    assert rss_growth_kb < 512 * 1024  # every refusal came before decoding


# ---- checkpoints ------------------------------------------------------------------------------------------

def small_checkpoint(path):
    """A full FlowSR checkpoint of a small UNet (the format is what is fuzzed, not the model)."""
    config = UNetConfig(in_channels=48, out_channels=48, block_out_channels=(32, 32), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                        attention_head_dim=2, norm_num_groups=8)
    FlowSR(UNet(config), PixelAutoencoder(), torch.randn(1, 3, 8)).save(path)
    with open(path, "rb") as f:
        return f.read()


def split(data):
    """(header dict, tensor bytes) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def lying_headers(data, rng):
    header, body = split(data)
    names = [k for k in header if k != "__metadata__"]
    out = {}

    def edited(edit):
        copy = json.loads(json.dumps(header))
        edit(copy)
        return join(copy, body)

    name = rng.choice(names)
    out["offsets-past-end.safetensors"] = edited(lambda h: h[name].update(data_offsets=[0, len(body) + 4096]))
    out["offsets-overlap.safetensors"] = edited(lambda h: h[names[1]].update(data_offsets=h[names[0]]["data_offsets"]))
    out["shape-too-big.safetensors"] = edited(lambda h: h[name].update(shape=[2 ** 40, 2 ** 20]))
    out["negative-shape.safetensors"] = edited(lambda h: h[name].update(shape=[-1]))
    out["unknown-dtype.safetensors"] = edited(lambda h: h[name].update(dtype="F99"))
    out["int-dtype.safetensors"] = edited(lambda h: h[name].update(dtype="I32"))  # same size, wrong kind
    out["bool-dtype.safetensors"] = edited(lambda h: [h[n].update(dtype="BOOL", shape=[h[n]["data_offsets"][1] -
                                                                                     h[n]["data_offsets"][0]])
                                                      for n in [name]])
    out["f64-dtype.safetensors"] = edited(lambda h: h[name].update(
        dtype="F64", shape=[(h[name]["data_offsets"][1] - h[name]["data_offsets"][0]) // 8]))
    out["no-metadata.safetensors"] = edited(lambda h: h.pop("__metadata__"))
    out["metadata-not-json.safetensors"] = edited(lambda h: h["__metadata__"].update(flowsr_model="{unet:"))
    out["metadata-wrong-types.safetensors"] = edited(lambda h: h["__metadata__"].update(
        flowsr_model=json.dumps({"unet": {"block_out_channels": "64"}, "autoencoder": [4]})))
    out["lora-no-base.safetensors"] = edited(lambda h: h["__metadata__"].update(flowsr_checkpoint_metadata="{}"))
    raw = json.dumps(header).encode()
    out["length-huge.safetensors"] = struct.pack("<Q", 2 ** 63) + raw + body
    out["length-past-end.safetensors"] = struct.pack("<Q", len(data)) + raw + body
    out["length-short.safetensors"] = struct.pack("<Q", len(raw) // 2) + raw + body
    out["header-garbage.safetensors"] = struct.pack("<Q", len(raw)) + rng.randbytes(len(raw)) + body
    for i in range(40):  # random bytes changed inside the header
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(8 + len(raw))] = rng.randrange(32, 127)
        out[f"header-flip{i}.safetensors"] = bytes(mutated)
    return out


def another_models_keys(tmp_path):
    """A valid file with the right metadata but the tensors of another model (a different UNet)."""
    small_checkpoint(str(tmp_path / "small.safetensors"))
    from safetensors.torch import save_file
    from plumbing.weights import read_metadata
    unet = UNet(UNetConfig(in_channels=48, out_channels=48, block_out_channels=(32, 64), layers_per_block=1,
                           cross_attention_dim=8, attention_head_dim=2, norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")))
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {"context": torch.zeros(1, 3, 8)}
    path = str(tmp_path / "other-model.safetensors")
    save_file(tensors, path, metadata=read_metadata(str(tmp_path / "small.safetensors")))
    return path


def fuzz_checkpoints(folder, rng):
    data = small_checkpoint(os.path.join(folder, "valid.safetensors"))
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    files = {f"cut{i}.safetensors": data[:rng.randrange(len(data))] for i in range(15)}
    files.update({f"cut-header{i}.safetensors": data[:rng.randrange(header_end)] for i in range(15)})
    files.update(lying_headers(data, rng))
    files["noise.safetensors"] = rng.randbytes(5000)
    files["pickle.ckpt"] = b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."  # not even opened: not a safetensors file
    paths = []
    for name, content in files.items():
        paths.append(os.path.join(folder, name))
        with open(paths[-1], "wb") as f:
            f.write(content)
    return paths


def test_checkpoint_fuzz_gives_weights_errors(tmp_path, capsys):
    paths = fuzz_checkpoints(str(tmp_path), random.Random(0)) + [another_models_keys(tmp_path)]
    loaded = []
    for path in paths:
        try:
            FlowSR.load(path)
        except WeightsError as e:
            message = str(e)
            assert message.startswith(path + ":") and "\n" not in message, message
        else:
            loaded.append(os.path.basename(path))
    # only harmless header edits (a character of a number in the config, say) may still load
    assert all(name.startswith("header-flip") for name in loaded), loaded
    assert len(loaded) < 10

    image = str(tmp_path / "a.png")
    Image.open(os.path.join(PHOTOS, "heldout", "coffee.png")).convert("RGB").resize((12, 12)).save(image)
    for name in ("cut3.safetensors", "offsets-past-end.safetensors", "int-dtype.safetensors",
                 "length-huge.safetensors", "other-model.safetensors", "pickle.ckpt"):
        path = str(tmp_path / name)
        capsys.readouterr()
        assert sample.main([image, "--checkpoint", path, "-q"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: "), err
    assert not os.path.exists(str(tmp_path / "a_x4.png"))


# ---- unpickling -------------------------------------------------------------------------------------------

def unsafe_torch_loads(source, filename):
    """(file, line) of every torch.load call without weights_only=True, and of any `from torch import load`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append((filename, node.lineno))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append((filename, node.lineno))
    return found


def test_no_torch_load_without_weights_only():
    bad = ("import torch\nx = torch." "load(p)\ny = torch." "load(p, weights_only=False)\n"
           "z = torch.load(p, weights_only=True)\n")
    assert [line for _, line in unsafe_torch_loads(bad, "example.py")] == [2, 3]  # the scan does see them
    sources = []
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "runs")]
        sources += [os.path.join(root, f) for f in files if f.endswith(".py")]
    assert any(p.endswith("weights.py") for p in sources) and any(p.endswith("test_fuzz.py") for p in sources)
    found = []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            found += unsafe_torch_loads(f.read(), os.path.relpath(path, ROOT))
    assert not found
