"""The FlowSR super-resolver (Xu et al., ICCV 2025): autoencoder E/D + velocity UNet v + a fixed context c,
and the inference pipeline that runs it.

    x    = up(x_LR)                           (bicubic / bilinear x4, FlowSR.upsample_lr)
    z_L  = s * E(x)                           (SPEC 1)
    z_H  = flow.sample(v, z_L, sigmas)        (SPEC 2: one Euler step from t = 1 to t = 0 is one-step SR)
    x_SR = colour_fix(D(z_H / s), x)          (SPEC 7)
    x_SR = x_SR + T texture draw              (tiny preset: texture.py, temperature T; 0 for sd21, which has none)

`FlowSR` is what train.py trains and what sample.py runs. It is built from a preset (`tiny`: pixel
autoencoder + a small UNet, trains on a CPU; `sd21`: Stable Diffusion 2.1-base with the CLIP embedding of
the fixed FlowSR prompt as context). Checkpoints (full for the tiny preset, LoRA in the published layout
for sd21) are read and written by plumbing/checkpoints.py.

`super_resolve` handles images of any size: latents larger than a tile go through the velocity network
in overlapping tiles blended with Gaussian weights (the published code's scheme), the VAE runs tiled, and
the colour of the result is matched to the input with StableSR's wavelet (or AdaIN) colour correction
(Wang et al. 2024, "Exploiting Diffusion Prior for Real-World Image Super-Resolution").
"""
import hashlib
import json
import os
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip
import lora
import texture as texture_model
from unet import UNet, UNetConfig
from flow import sample
from schedulers import flow_match_sigmas
from vae import AutoencoderKL, PixelAutoencoder
from plumbing import checkpoints
from plumbing.weights import WeightsError, read_state_dict, save_atomic

FLOWSR_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                 "and natural lighting.")
# The prompt's CLIP BPE ids, so a single-file SD base (which carries no tokenizer) still works with the
# default prompt; tests/test_flowsr.py checks them against the real tokenizer.
FLOWSR_PROMPT_IDS = (49406, 320, 1400, 268, 9977, 267, 279, 330, 267, 8118, 268, 16157, 2867, 593, 8157,
                     4353, 267, 14270, 5389, 267, 537, 3288, 5799, 269, 49407)
SD2_PAD_ID = 0
TINY_FLAT_GATE = 0.02  # k of FlowSR.detail_gate ([-1, 1] units: 2.55 grey levels): half open at FLAT_CONTRAST + k
TINY_PIXEL_HEAD = 32  # hidden channels of the tiny preset's PixelHead
TINY_TEXTURE = 64  # hidden channels of the tiny preset's texture.TexturePredictor
# FlowSR.detail_gate: local contrast under three 8-bit grey levels (x2 / 255: images are in [-1, 1]) is not detail.
# The contrast is zero on a linear ramp: in the bicubic up-sampling the gate reads, an LR step edge stays under
# this floor up to about 65 levels, so only stronger edges and fine texture open the gate.
FLAT_CONTRAST = 3 * 2 / 255

# LoRA targets of the sd21 preset: the UNet's resnet, attention, feed-forward, sampler and output layers (all
# but conv_in and the time embedding's MLP; the choice of OSEDiff-style one-step SR fine-tunes), and every
# layer of the VAE encoder.
UNET_LORA_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv", "conv_out", "proj_in", "proj_out",
                     "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]


def tiny_unet_config(latent_channels=48, context_dim=32):
    """A 3.9 M parameter UNet for the pixel autoencoder's 48-channel latents: trains on a laptop CPU.

    It keeps SD's block types, so that one UNet class serves both presets; with the tiny preset's fixed zero
    context (no prompt) the cross-attention layers add a constant (to_k / to_v have no bias) and only the
    self-attention in those blocks looks at the image.
    """
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(64, 128),
                      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=context_dim,
                      attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)


class PixelHead(nn.Module):
    """The tiny preset's velocity in pixels: the UNet's output, up-sampled bilinearly, and D(z) through three
    3x3 convolutions at full resolution, v = E(h(up(u), D(z))).

    The pixel autoencoder's latent is the image cut into 4x4 blocks; read as a velocity, the UNet's output u
    would write each block's 16 pixels through separate channels, and whatever those channels learn unevenly
    repeats with the blocks as a 4-px grid. Here u is a feature map instead: bilinear up-sampling spreads it
    smoothly over the pixels, and the same convolutions make every pixel, whatever its place in its block.
    """

    def __init__(self, ae, features, hidden=32):
        super().__init__()
        self.ae, c = ae, ae.channels
        self.conv_in = nn.Conv2d(features + c, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, c, 3, padding=1)

    def forward(self, u, z):
        u = F.interpolate(u, scale_factor=self.ae.downscale, mode="bilinear", align_corners=False)  # (B, F, H, W)
        h = torch.cat([u, self.ae.decode(z)], 1)  # (B, F + 3, H, W)
        h = self.conv_out(F.silu(self.conv_mid(F.silu(self.conv_in(h)))))  # (B, 3, H, W)
        return self.ae.encode(h)  # (B, C, h, w)


class FlowSR(nn.Module):
    """The velocity v(z, t) = g(z) * h(UNet(z, 1000 t, c), z) of FlowSR's flow, with its autoencoder (`ae`: E and
    D) and fixed context c. sd21: h and g are the identity (the UNet's output is the velocity); tiny: h is the
    PixelHead and g the detail gate, each optional, and `texture` the predictor of texture.py (or None).
    `super_resolve` below runs it on images."""

    def __init__(self, unet, ae, context, upsample="bicubic", flat_gate=0.0, pixel_head=0, texture=0):
        super().__init__()
        if (flat_gate or pixel_head) and not isinstance(ae, PixelAutoencoder):
            raise ValueError("FlowSR: the flat gate and the pixel head need the pixel autoencoder")
        self.unet, self.ae, self.upsample, self.flat_gate = unet, ae, upsample, flat_gate
        self.head = PixelHead(ae, unet.config.out_channels, pixel_head) if pixel_head else None
        # last: drawing its initial weights leaves the UNet's and the head's those of a model without it
        self.texture = texture_model.TexturePredictor(texture) if texture else None
        self.register_buffer("context", context, persistent=False)  # (1, L, D)

    def forward(self, z, timesteps, context=None):
        """The velocity v(z, t, c): the `net` that flow.py and consistency.py call."""
        context = self.context if context is None else context
        u = self.unet(z, timesteps, context.expand(z.shape[0], -1, -1).to(z.dtype))  # (B, C, h, w)
        v = u if self.head is None else self.head(u, z)  # with a head, u holds features, not a velocity
        return v * self.detail_gate(z) if self.flat_gate else v

    def detail_gate(self, z):
        """g = d / (d + k) in [0, 1): 0 where the image is flat, near 1 where it has detail (tiny preset).

        d is the largest local contrast |x - mean_3x3(x)| within 3 latent pixels, less FLAT_CONTRAST. Where
        the input is flat there is nothing to restore (up(down(x)) = x for a smooth x), so the velocity is 0
        there by construction rather than learned to within a grey level: no texture or latent grid on skies,
        walls or out-of-focus backgrounds. Contrast of a few grey levels (noise, JPEG ripples, a blurred
        photo's gradients) is no detail either: the gate stays shut below FLAT_CONTRAST.
        """
        x = self.ae.decode(z).float()  # (B, 3, H, W), the pixel autoencoder's exact inverse
        contrast = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean(1, keepdim=True)
        f = self.ae.downscale
        d = F.max_pool2d(contrast, kernel_size=7 * f, stride=f, padding=3 * f)  # (B, 1, H/f, W/f)
        d = (d - FLAT_CONTRAST).clamp(min=0)
        return (d / (d + self.flat_gate)).to(z.dtype)

    @property
    def scale(self):
        return self.ae.scaling_factor

    @property
    def default_tile_size(self):
        """Latent tile size of the velocity network: SD's 96 (the published code), 64 (256 px) for the tiny model.

        For SD, tiles bound memory at a cost: each latent pixel follows mostly the tile whose centre is nearest,
        so seams run half-way between tile centres. The tiny model's self-attention learned on 16 x 16 latents
        (64-px crops); over a whole large image it costs time quadratic in the area and strays far from training:
        its tiles of 64 (overlap 16) run 512 -> 2048 px 3.6x faster than tiles of 256 on two CPU cores and score
        higher PSNR-Y than one pass (bench/README.md, "Tiles for the tiny model")."""
        return 96 if isinstance(self.ae, AutoencoderKL) else 64

    @property
    def default_tile_overlap(self):
        """Latent overlap of consecutive tiles, blended with Gaussian weights: 32 for SD (the published code), 16."""
        return 32 if isinstance(self.ae, AutoencoderKL) else 16

    @property
    def pad_multiple(self):
        """Input sizes must divide by this: the autoencoder's and the UNet's down-sampling together."""
        return self.ae.downscale * self.tile_multiple

    @property
    def tile_multiple(self):
        """Latent tile sizes must divide by this: the UNet's down-sampling."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def upsample_lr(self, x_lr, mode=None):
        """up(x_LR): (B, 3, h, w) -> (B, 3, 4h, 4w), in the model's mode unless `mode` is given."""
        return F.interpolate(x_lr, scale_factor=4, mode=mode or self.upsample, align_corners=False).clamp(-1, 1)

    def encode(self, x, tile_size=None, posterior="mean", generator=None):
        """z = s * E(x): the posterior mean, or with posterior="sample" a draw from it (a VAE's only)."""
        if posterior not in ("mean", "sample"):
            raise ValueError(f"encode: posterior must be 'mean' or 'sample', got {posterior!r}")
        if posterior == "sample" and isinstance(self.ae, AutoencoderKL):
            mean, logvar = self.ae.posterior(x, tile_size=tile_size)
            noise = torch.randn(mean.shape, generator=generator).to(mean)  # drawn on the CPU: same on any device
            return self.scale * (mean + torch.exp(0.5 * logvar) * noise)
        return self.scale * self.ae.encode(x, tile_size=tile_size)

    def decode(self, z, tile_size=None):
        return self.ae.decode(z / self.scale, tile_size=tile_size)

    def config_dict(self):
        return {"unet": self.unet.config.to_dict(), "autoencoder": self.ae.to_dict(), "upsample": self.upsample,
                "flat_gate": self.flat_gate, "pixel_head": self.head.conv_in.out_channels if self.head else 0,
                "texture": self.texture.net[0].out_channels if self.texture else 0}

    # ---- building -------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, upsample="bicubic", flat_gate=TINY_FLAT_GATE, pixel_head=TINY_PIXEL_HEAD, texture=TINY_TEXTURE):
        ae = PixelAutoencoder()
        config = tiny_unet_config(ae.latent_channels)
        return cls(UNet(config), ae, torch.zeros(1, 1, config.cross_attention_dim), upsample, flat_gate, pixel_head,
                   texture)

    @classmethod
    def sd21(cls, base, prompt=None, context=None, upsample="bicubic", dtype=torch.float32, cache_dir=None,
             channels_last=False):
        """SD 2.1-base from a diffusers folder or an original single file; `context` skips the text encoder.
        channels_last: convolution kernels in the layout super_resolve's activations have (for inference)."""
        unet = UNet.from_pretrained(base, dtype, channels_last)
        ae = AutoencoderKL.from_pretrained(base, dtype, channels_last=channels_last)
        if context is None:
            context = prompt_context(base, prompt or FLOWSR_PROMPT, cache_dir)
        if context.shape[-1] != unet.config.cross_attention_dim:
            raise WeightsError(f"{base}: text embedding width {context.shape[-1]} does not fit the UNet's "
                               f"cross-attention width {unet.config.cross_attention_dim}")
        return cls(unet, ae, context.to(dtype), upsample)

    # ---- checkpoints (plumbing/checkpoints.py) ----------------------------------------------------------

    def save(self, path, extra=None):
        """A full checkpoint: every UNet weight, the context, and the configs as metadata (tiny preset)."""
        checkpoints.save_full(self, path, extra)

    def save_lora(self, path, unet_rank, vae_rank, extra=None):
        """A LoRA checkpoint in the published FlowSR layout (SPEC 8); needs the base model to load."""
        checkpoints.save_lora(self, path, UNET_LORA_TARGETS, vae_encoder_targets(self.ae), unet_rank, vae_rank, extra)

    @classmethod
    def load(cls, path, base=None, prompt=None, context=None, dtype=torch.float32, cache_dir=None,
             channels_last=False):
        """Rebuild a model from a checkpoint of either kind.

        A LoRA checkpoint needs an SD 2.1-base: `base`, or the one its train.py run recorded. `prompt` (default:
        the run's, or the FlowSR prompt) or a ready `context` (1, 77, D) only applies to it (a full checkpoint
        carries its own context); `cache_dir` caches the prompt's text embedding.
        `dtype` and `channels_last` (convolution kernels laid out as super_resolve's activations are) apply as
        each tensor is read, so loading holds no second copy of the weights.
        """
        return checkpoints.load(cls, path, base, prompt, context, dtype, cache_dir, channels_last)


def vae_encoder_targets(ae):
    """Dotted names of every Linear / Conv2d of the VAE encoder (LoRA there leaves the decoder alone).

    An already wrapped layer counts under its own name, not its base_layer / lora_A / lora_B parts."""
    layers = (nn.Linear, nn.Conv2d, lora.LoRALayer)
    inside_lora = re.compile(r"\.(base_layer|lora_A|lora_B)(\.|$)")
    return [name for name, m in ae.named_modules() if name.startswith(("encoder.", "quant_conv"))
            and isinstance(m, layers) and not inside_lora.search(name)]


def prompt_ids(base, prompt):
    """(1, 77) token ids: from the base's tokenizer files, or the built-in ids of the default prompt."""
    folder = base if os.path.isdir(base) else None
    if folder and os.path.isdir(os.path.join(folder, "tokenizer")):
        return clip.CLIPTokenizer.from_pretrained(folder)([prompt])
    if prompt != FLOWSR_PROMPT:
        raise WeightsError(f"{base}: has no tokenizer/ folder; only the default prompt works with it")
    ids = list(FLOWSR_PROMPT_IDS) + [SD2_PAD_ID] * (77 - len(FLOWSR_PROMPT_IDS))
    return torch.tensor([ids])


@torch.no_grad()
def prompt_context(base, prompt=FLOWSR_PROMPT, cache_dir=None):
    """The CLIP text embedding (1, 77, D) of `prompt`, cached on disk by (base, prompt) when cache_dir is set."""
    cache = None
    if cache_dir:
        cache = os.path.join(cache_dir, f"context-{context_cache_key(base, prompt)}.safetensors")
        if os.path.isfile(cache):
            try:
                return read_state_dict(cache)["context"]
            except (WeightsError, KeyError):
                pass  # a damaged cache entry is recomputed and rewritten below
    text_model = clip.CLIPTextModel.from_pretrained(base)
    context = text_model(prompt_ids(base, prompt)).float()
    del text_model
    if cache:
        try:
            save_atomic({"context": context}, cache)
        except OSError:
            pass  # an unwritable cache only costs the next run the text encoder
    return context


def context_cache_key(base, prompt):
    """Changes when the prompt or the text encoder's files change (path, size and modification time)."""
    if os.path.isdir(base):
        folders = [os.path.join(base, d) for d in ("text_encoder", "tokenizer")]
        folders = [d for d in folders if os.path.isdir(d)] or [base]
        files = [os.path.join(root, name) for d in folders for root, _, names in sorted(os.walk(d))
                 for name in sorted(names)]
    else:
        files = [base]
    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([prompt, stats]).encode()).hexdigest()[:16]


# ---- inference: tiled velocity, colour correction, the pipeline -----------------------------------------

def tile_starts(length, tile, overlap):
    """Tile offsets covering [0, length); the last tile sits flush with the end."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile size {tile})")
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


def tiled_velocity(model, tile, overlap, progress=False):
    """The velocity v(z, t) of `model` for a latent of any size, as a `net` for flow.sample: overlapping
    tiles blended with Gaussian weights (tile 0: the whole latent at once)."""
    def velocity(z, timesteps, context=None):
        _, _, h, w = z.shape
        if not tile or (h <= tile and w <= tile):
            return model(z, timesteps, context)
        th, tw = min(tile, h), min(tile, w)
        weights = gaussian_weights(th, tw, z.device)
        out = torch.zeros(z.shape, device=z.device, dtype=torch.float32)
        total = torch.zeros(h, w, device=z.device, dtype=torch.float32)
        tiles = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
        for y, x in tqdm(tiles, desc="tiles", leave=False, disable=not progress):
            out[:, :, y:y + th, x:x + tw] += model(z[:, :, y:y + th, x:x + tw], timesteps, context).float() * weights
            total[y:y + th, x:x + tw] += weights
        return (out / total).to(z.dtype)
    return velocity


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
    if mode != "none":
        raise ValueError(f"color_fix: mode must be 'wavelet', 'adain' or 'none', got {mode!r}")
    return result


@torch.no_grad()
def super_resolve(model, lr, steps=1, shift=3.0, color="wavelet", upsample=None, tile_size=None, tile_overlap=None,
                  vae_tile_size=768, posterior="mean", generator=None, progress=False, sigmas=None,
                  texture=texture_model.DEFAULT_TEMPERATURE):
    """lr: (B, 3, h, w) in [0, 1] -> (B, 3, 4h, 4w) in [0, 1].

    steps = 1 is one-step SR (sigmas [1, 0]); more steps follow the shifted grid of schedulers.py, or the
    times in `sigmas` when given (from 1 down to 0).
    upsample overrides the model's up(x_LR) mode; posterior "sample" draws z_L from the VAE posterior
    (the published code) instead of taking its mean; vae_tile_size and tile_size 0 switch tiling off, and
    tile_size and tile_overlap None take the model's own (FlowSR.default_tile_size, default_tile_overlap).
    texture: the temperature T of texture.py's draw for a model that has a texture predictor (0: none); its noise
    is drawn from the seed of `generator` (default 0), the same for each image, so that a result is repeatable.
    """
    device, dtype = model.context.device, model.context.dtype
    up = model.upsample_lr(lr * 2 - 1, upsample)  # (B, 3, H, W) in [-1, 1]
    H, W = up.shape[-2:]
    pad_h, pad_w = -H % model.pad_multiple, -W % model.pad_multiple
    mode = "reflect" if pad_h < H and pad_w < W else "replicate"  # reflect cannot pad more than the size
    # channels-last input: every convolution then runs on NHWC activations (~10 % faster VAE on a CPU, the
    # layout tensor cores want on a GPU), with no copy of the weights; outputs differ only by float rounding
    x = F.pad(up, (0, pad_w, 0, pad_h), mode=mode).to(device, dtype, memory_format=torch.channels_last)
    ae_tile = vae_tile_size or None
    z_L = model.encode(x, tile_size=ae_tile, posterior=posterior, generator=generator)  # (B, C, H/f, W/f)
    sigmas = flow_match_sigmas(steps, shift) if sigmas is None else sigmas
    tile_size = model.default_tile_size if tile_size is None else tile_size
    tile_overlap = model.default_tile_overlap if tile_overlap is None else tile_overlap
    z_H = sample(tiled_velocity(model, tile_size, tile_overlap, progress), z_L, None, sigmas)
    decode_tile = ae_tile // model.ae.downscale if ae_tile else None
    sr = model.decode(z_H, tile_size=decode_tile).clamp(-1, 1)[:, :, :H, :W].float()  # (B, 3, H, W)
    sr = color_fix((sr + 1) / 2, ((up + 1) / 2).to(sr.device), color)  # (B, 3, H, W) in [0, 1]
    if model.texture is None or not texture:
        return sr
    seed = 0 if generator is None else generator.initial_seed()
    return (sr + texture * model.texture.sample(lr.to(device, torch.float32), seed).to(sr)).clamp(0, 1)
