"""The autoencoders that map images to latents and back: E and D of SPEC section 1.

- `AutoencoderKL`: the Stable Diffusion 1.x/2.x VAE (Rombach et al. 2022, "High-Resolution Image
  Synthesis with Latent Diffusion Models", section 3.1), written out in plain PyTorch with the module
  names of diffusers, so that diffusers state dicts load unchanged and LoRA target names match.
  `encode` returns the posterior mean E(x) (unscaled, (B, 4, H/8, W/8)); FlowSR uses the mean rather
  than a sample so that z_H = s * E(x_HR) and z_L = s * E(up(x_LR)) are deterministic.
- `PixelAutoencoder`: the parameter-free stand-in of SPEC section 1 (pixel-unshuffle by 4, s = 1)
  with the same interface, so tiny models can train on a CPU without a learned VAE.

Both accept `tile_size` / `tile_overlap`: large inputs are then processed in overlapping tiles
blended with linear ramps (as diffusers' tiled_encode / tiled_decode), so memory stays bounded.
"""
import math
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import diffusers_configs, single_file
from plumbing.weights import WeightsError, find_weights_file, load_strict, read_json, read_state_dict

EPS = 1e-6  # GroupNorm epsilon of every norm in the SD VAE


@dataclass
class AutoencoderKLConfig:
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    scaling_factor: float = 0.18215

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)

    @classmethod
    def from_diffusers(cls, config):
        """From a diffusers vae/config.json dict (diffusers' defaults fill missing keys)."""
        return cls(**diffusers_configs.vae_kwargs(config))

    def to_dict(self):
        return {"kind": "autoencoder_kl", **asdict(self), "block_out_channels": list(self.block_out_channels)}

    @classmethod
    def from_dict(cls, config):
        return cls(**{k: v for k, v in config.items() if k != "kind"})


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (1x1 conv when the channel count changes)."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        inplace = not torch.is_grad_enabled()  # as unet.ResnetBlock2D: in-place only where autograd is off
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip) if inplace else skip + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # "to_out.0" as in diffusers

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, H*W, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # The LDM VAE pads only right and bottom, so H -> H/2 exactly for even H.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                             downsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)  # (B, C_last, H/8, W/8)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, 2 * latent, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        # One more resnet per level than the encoder, as in the LDM VAE.
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                           upsample=i < len(channels) - 1)
            for i in range(len(channels))])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))  # (B, C_last, H/8, W/8)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.latent_channels = config.latent_channels
        self.downscale = 2 ** (len(config.block_out_channels) - 1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x, tile_size=None, tile_overlap=None):
        """Posterior mean, UNSCALED: (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8). Tiles are in pixels."""
        return self.posterior(x, tile_size, tile_overlap)[0]

    def posterior(self, x, tile_size=None, tile_overlap=None):
        """(mean, log-variance) of the diagonal Gaussian posterior, each (B, 4, H/8, W/8), unscaled."""
        if tile_size is None:
            moments = self._moments(x)
        else:
            tile_overlap = tile_size // 4 // self.downscale * self.downscale if tile_overlap is None else tile_overlap
            sizes = (tile_size, tile_overlap, *x.shape[-2:])
            if any(size % self.downscale for size in sizes):
                raise ValueError(f"tiled encode needs tile_size, tile_overlap, H and W divisible by "
                                 f"{self.downscale}, got {sizes}")
            moments = blend_tiles(self._moments, x, tile_size, tile_overlap, scale=1 / self.downscale)
        return moments[:, :self.latent_channels], moments[:, self.latent_channels:].clamp(-30, 20)

    def decode(self, z, tile_size=None, tile_overlap=None):
        """Image (unclamped) from an UNSCALED latent: (B, 4, h, w) -> (B, 3, 8h, 8w). Tiles are in latent pixels."""
        if tile_size is None:
            return self._decode(z)
        tile_overlap = tile_size // 4 if tile_overlap is None else tile_overlap
        return blend_tiles(self._decode, z, tile_size, tile_overlap, scale=self.downscale)

    def _moments(self, x):
        return self.quant_conv(self.encoder(x))  # (B, 2 * latent, H/8, W/8): mean and log-variance

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def to_dict(self):
        return self.config.to_dict()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, config=None, channels_last=False):
        """Load a diffusers vae/ folder, a whole SD folder (with vae/), or a single weight file.

        A single file may be an original SD checkpoint (VAE keys under `first_stage_model.`, other
        keys not read) or a bare VAE state dict in LDM or diffusers naming; its config is read from
        the tensor shapes (single_file.py). Shapes do not show norm_num_groups (32 assumed) or
        scaling_factor (0.18215 assumed): pass `config` to override, for a folder too. dtype and channels_last
        (layout of the convolution kernels) apply as each tensor is read.
        """
        path = os.fspath(path)
        if os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        if os.path.isdir(path):
            source = find_weights_file(path, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
            state_dict = read_state_dict(source, dtype=dtype, channels_last=channels_last)
            if config is None:
                config_path = os.path.join(path, "config.json")
                try:
                    config = AutoencoderKLConfig.from_diffusers(read_json(config_path))
                except ValueError as e:
                    raise WeightsError(f"{config_path}: {e}") from None
        else:
            source, state_dict = path, single_file.read_vae(path, dtype, channels_last)
            config = config or AutoencoderKLConfig.from_diffusers(single_file.vae_config_from_shapes(state_dict, path))
        with torch.device("meta"):
            model = cls(config)
        return load_strict(model, current_names(state_dict), source)


def blend_tiles(fn, x, tile_size, overlap, scale):
    """fn(x) computed on overlapping tiles of at most tile_size, blended with linear ramps over the overlaps.

    `scale` is fn's output size over its input size. An input that fits one tile gives fn(x) exactly.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"tile_overlap must be in [0, tile_size), got {overlap} for tile_size {tile_size}")
    H, W = x.shape[-2:]
    if H <= tile_size and W <= tile_size:
        return fn(x)
    align = round(1 / scale) if scale < 1 else 1  # tiles of an encoder must start on its output grid
    out = weight = None
    ramp_overlap = round(overlap * scale)
    for top, height in tile_spans(H, tile_size, overlap, align):
        for left, width in tile_spans(W, tile_size, overlap, align):
            y = fn(x[:, :, top:top + height, left:left + width])  # (B, C', height*scale, width*scale)
            if out is None:
                out = y.new_zeros(y.shape[0], y.shape[1], round(H * scale), round(W * scale))
                weight = y.new_zeros(1, 1, *out.shape[-2:])
            w = _ramp(y.shape[-2], ramp_overlap, y)[:, None] * _ramp(y.shape[-1], ramp_overlap, y)[None, :]
            t, l = round(top * scale), round(left * scale)
            out[:, :, t:t + y.shape[-2], l:l + y.shape[-1]] += y * w
            weight[:, :, t:t + y.shape[-2], l:l + y.shape[-1]] += w
    return out / weight


def tile_spans(length, tile_size, overlap, align=1):
    """[(start, size)]: the fewest equal tiles of at most tile_size that overlap by about `overlap`.

    Equal tiles just big enough to cover `length` do less work than full-size tiles with the last one
    pushed back flush with the end (1024 px in tiles of 768: 2 x 608 px instead of 2 x 768 px).
    Sizes and starts are multiples of `align`, which must divide length and tile_size.
    """
    if length <= tile_size:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile_size - overlap))
    size = min(tile_size, math.ceil((length + (count - 1) * overlap) / count / align) * align)
    starts = [(i * (length - size) // (count - 1)) // align * align for i in range(count)]
    return [(start, size) for start in starts]


def _ramp(n, overlap, like):
    """Weights rising linearly over `overlap` samples at both ends of a tile, 1 in the middle."""
    i = torch.arange(n, dtype=like.dtype, device=like.device)
    return torch.minimum(torch.minimum(i + 1, n - i) / (overlap + 1), torch.ones_like(i))


# Older diffusers versions named the mid-block attention layers differently (SPEC section 8).
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
OLD_ATTENTION = re.compile(r"\.attentions\.0\.(query|key|value|proj_attn)\.")


def current_names(state_dict):
    """Rename the attention layers of an old diffusers VAE state dict to today's names (to_q, ...)."""
    return {OLD_ATTENTION.sub(lambda m: f".attentions.0.{OLD_ATTENTION_NAMES[m[1]]}.", k): v
            for k, v in state_dict.items()}


class PixelAutoencoder(nn.Module):
    """Parameter-free autoencoder: pixel-unshuffle by `factor` (SPEC section 1, s = 1)."""

    def __init__(self, factor=4, channels=3):
        super().__init__()
        self.factor = factor
        self.channels = channels
        self.downscale = factor
        self.latent_channels = channels * factor ** 2
        self.scaling_factor = 1.0

    def encode(self, x, tile_size=None, tile_overlap=None):
        """(B, 3, H, W) -> (B, 48, H/4, W/4); exact and local, so tiling would change nothing."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"PixelAutoencoder needs H and W divisible by {self.factor}, got {tuple(x.shape[-2:])}")
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z, tile_size=None, tile_overlap=None):
        """(B, 48, h, w) -> (B, 3, 4h, 4w), the exact inverse of encode."""
        return F.pixel_shuffle(z, self.factor)

    def to_dict(self):
        return {"kind": "pixel", "factor": self.factor, "channels": self.channels}


def vae_from_config(config):
    """Rebuild either autoencoder (freshly initialised) from its saved `to_dict()`."""
    if config.get("kind") == "pixel":
        return PixelAutoencoder(config["factor"], config["channels"])
    if config.get("kind") == "autoencoder_kl":
        return AutoencoderKL(AutoencoderKLConfig.from_dict(config))
    raise ValueError(f"unknown autoencoder kind {config.get('kind')!r} (expected 'autoencoder_kl' or 'pixel')")
