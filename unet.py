"""The Stable Diffusion UNet (SD 1.x / 2.x): the velocity network v_theta(z, t, c) of SPEC sections 1-3.

A plain-PyTorch copy of diffusers' UNet2DConditionModel as Stable Diffusion configures it (Rombach et
al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"): an encoder-decoder of ResNet
blocks that all see an embedding of the timestep, with transformers (self-attention, cross-attention to
the text context c, GEGLU feed-forward) at the levels that have attention, and skip connections from
every encoder stage to the decoder.

Every module carries diffusers' name (down_blocks.0.resnets.0.conv1, ...attn1.to_q, ff.net.0.proj), so
a diffusers state dict loads with no renaming and PEFT LoRA target-module names match ours. Weights load
from a diffusers `unet/` folder or from an original single-file checkpoint (keys
`model.diffusion_model.input_blocks...`, SPEC section 8), which single_file.py renames.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing import diffusers_configs, single_file
from plumbing.weights import WeightsError, find_weights_file, load_strict, read_json, read_state_dict

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclass
class UNetConfig:
    """The UNet's shape; names and meanings follow diffusers' config.json. Defaults: SD 2.1-base.

    `attention_head_dim` is, despite its name, the NUMBER of attention heads (an int for every level, or
    one per level): diffusers kept the misnamed key (its issue #2011). SD 2.x's [5, 10, 20, 20] on
    channels (320, 640, 1280, 1280) means 64 channels per head; SD 1.x's 8 means 8 heads everywhere.
    """
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    cross_attention_dim: int = 1024
    attention_head_dim: int | tuple = (5, 10, 20, 20)
    use_linear_projection: bool = True  # proj_in/proj_out: Linear (SD 2.x) or 1x1 Conv2d (SD 1.x)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_layers_per_block: int = 1
    upcast_attention: bool = False  # accepted for config.json; attention runs in the model's dtype via SDPA
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    only_cross_attention: bool = False  # not supported; SD keeps self-attention
    dual_cross_attention: bool = False  # not supported
    sample_size: int | None = None  # ignored: the UNet takes any latent size

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"UNetConfig: {name} must be one int, got {getattr(self, name)!r}")
        for name in ("only_cross_attention", "dual_cross_attention"):
            if getattr(self, name):
                raise ValueError(f"UNetConfig: {name}=True is not supported (Stable Diffusion does not use it)")
        if not {CROSS_ATTN_DOWN, PLAIN_DOWN} >= set(self.down_block_types) or \
                not {CROSS_ATTN_UP, PLAIN_UP} >= set(self.up_block_types):
            raise ValueError(f"UNetConfig: block types {self.down_block_types} {self.up_block_types} not supported")
        levels = {len(self.block_out_channels), len(self.down_block_types), len(self.up_block_types), len(self.heads())}
        if len(levels) != 1:
            raise ValueError("UNetConfig: block_out_channels, block types and attention_head_dim differ in length")
        for channels, heads in zip(self.block_out_channels, self.heads()):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(f"UNetConfig: {channels} channels do not split into {heads} heads "
                                 f"and {self.norm_num_groups} norm groups")

    def heads(self):
        """Attention heads of each level (what diffusers calls attention_head_dim)."""
        if isinstance(self.attention_head_dim, int):
            return (self.attention_head_dim,) * len(self.block_out_channels)
        return self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config):
        """From a diffusers unet/config.json dict; refuses features that would change the math."""
        return cls(**diffusers_configs.unet_kwargs(config, {f.name for f in dataclasses.fields(cls)}))

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config):
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"UNetConfig: unknown keys {sorted(unknown)}")
        return cls(**config)


def timestep_embedding(t, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Sinusoidal features of (fractional) timesteps, as in DDPM / the Transformer: (B,) -> (B, dim); an odd dim
    gets a last column of zeros, as in diffusers."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    features = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2 half)
    return F.pad(features, (0, dim % 2))  # (B, dim)


def call(module, *args, checkpointed):
    """module(*args); under gradient checkpointing its activations are recomputed in backward, not stored."""
    if checkpointed:
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class TimestepMLP(nn.Module):
    def __init__(self, dim, emb_dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """norm-SiLU-conv twice with the timestep embedding added in between, plus a skip (1x1 conv if widths differ)."""

    def __init__(self, in_channels, out_channels, config):
        super().__init__()
        emb_dim, groups, eps = 4 * config.block_out_channels[0], config.norm_num_groups, config.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        # Without autograd the SiLUs and adds write into the fresh tensors they read: fewer buffers to
        # allocate and pass over (~5 % of a CPU upscale). With autograd they must not: backward needs them.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))  # (B, out, H, W)
        t = self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = h.add_(t) if inplace else h + t
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip) if inplace else skip + h


class Attention(nn.Module):
    """Multi-head attention from x to `context` (to x itself when context is None)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a parameter-free dropout

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N or L, dim)
        q, k, v = (a.unflatten(-1, (self.heads, -1)).transpose(1, 2) for a in (q, k, v))  # (B, heads, N or L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, N, dim)


class GEGLU(nn.Module):
    """Gated GELU unit (Shazeer 2020): one projection makes both the values and their gates."""

    def __init__(self, dim, inner_dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x):
        values, gates = self.proj(x).chunk(2, dim=-1)
        return values * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 stands where diffusers has its (parameter-free) dropout, so that net.2 keeps its name.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; each a residual branch."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Feature map -> tokens, transformer blocks, tokens -> feature map, added to the input."""

    def __init__(self, channels, heads, config):
        super().__init__()
        self.linear_projection = config.use_linear_projection
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        make_projection = nn.Linear if self.linear_projection else lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1)
        self.proj_in = make_projection(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, config.cross_attention_dim)
            for _ in range(config.transformer_layers_per_block))
        self.proj_out = make_projection(channels, channels)

    def forward(self, x, context, checkpointed):
        B, C, H, W = x.shape
        h = self.project(self.proj_in, self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C): one token per pixel
        for block in self.transformer_blocks:
            h = call(block, h, context, checkpointed=checkpointed)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return self.project(self.proj_out, h) + x

    def project(self, layer, h):
        """A Linear (SD 2.x) or 1x1 conv (SD 1.x): the same map over channels, in the form the weights come in."""
        return layer(h.movedim(1, -1)).movedim(-1, 1) if self.linear_projection else layer(h)


class Downsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, ceil(H/2), ceil(W/2))


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, *size)


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks (each followed by a transformer at attention levels), then a
    stride-2 conv unless it is the deepest level. Every output it makes is kept as a skip."""

    def __init__(self, in_channels, out_channels, heads, attention, downsample, config):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config)
                                     for i in range(config.layers_per_block))
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, heads, config) for _ in range(config.layers_per_block) if attention)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x, emb, context, skips, checkpointed):
        for i, resnet in enumerate(self.resnets):
            x = call(resnet, x, emb, checkpointed=checkpointed)
            if self.attentions:
                x = self.attentions[i](x, context, checkpointed)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks on [x, skip] (each followed by a transformer at attention levels),
    then nearest x2 upsampling + conv unless it is the last level."""

    def __init__(self, skip_channels, prev_channels, out_channels, heads, attention, upsample, config):
        super().__init__()
        layers = config.layers_per_block + 1  # one more than the encoder: it also takes the downsampler's skip
        inputs = [prev_channels] + [out_channels] * (layers - 1)
        skips = [out_channels] * (layers - 1) + [skip_channels]  # the last skip comes from the level above
        self.resnets = nn.ModuleList(ResnetBlock2D(i + s, out_channels, config) for i, s in zip(inputs, skips))
        self.attentions = nn.ModuleList(
            Transformer2DModel(out_channels, heads, config) for _ in range(layers) if attention)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x, emb, context, skips, checkpointed):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = call(resnet, x, emb, checkpointed=checkpointed)
            if self.attentions:
                x = self.attentions[i](x, context, checkpointed)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])  # the next skip's size: odd sizes round-trip
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, heads, config):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, config) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, config)])

    def forward(self, x, emb, context, checkpointed):
        x = call(self.resnets[0], x, emb, checkpointed=checkpointed)
        x = self.attentions[0](x, context, checkpointed)
        return call(self.resnets[1], x, emb, checkpointed=checkpointed)


class UNet(nn.Module):
    """v_theta(z, t, c): latent (B, in, h, w), timestep on the 0..1000 scale, context (B, L, D) -> (B, out, h, w)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        channels, heads, last = config.block_out_channels, config.heads(), len(config.block_out_channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepMLP(channels[0], 4 * channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], channels[i], heads[i], config.down_block_types[i] == CROSS_ATTN_DOWN,
                      i < last, config)
            for i in range(last + 1))
        self.mid_block = MidBlock(channels[-1], heads[-1], config)
        up_channels, up_heads = channels[::-1], heads[::-1]  # the decoder runs from the deepest level up
        self.up_blocks = nn.ModuleList(
            UpBlock(up_channels[min(i + 1, last)], up_channels[max(i - 1, 0)], up_channels[i], up_heads[i],
                    config.up_block_types[i] == CROSS_ATTN_UP, i < last, config)
            for i in range(last + 1))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, z, t, context):
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])  # (B,): a scalar is broadcast
        c0 = self.config.block_out_channels[0]
        emb = self.time_embedding(
            timestep_embedding(t, c0, self.config.flip_sin_to_cos, self.config.freq_shift).to(z.dtype))  # (B, 4*c0)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        x = self.conv_in(z)  # (B, c0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, context, skips, checkpointed)
        x = self.mid_block(x, emb, context, checkpointed)  # (B, C_last, h / 2^(levels-1), w / 2^(levels-1))
        for block in self.up_blocks:
            x = block(x, emb, context, skips, checkpointed)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out, h, w)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, channels_last=False):
        """Load a diffusers unet/ folder (or an SD folder holding one) or an original single-file checkpoint.
        dtype and channels_last (layout of the convolution kernels) apply as each tensor is read."""
        path = os.fspath(path)
        if os.path.isdir(os.path.join(path, "unet")):
            path = os.path.join(path, "unet")
        if os.path.isdir(path):  # config.json first: it tells a UNet folder from another model's
            config_path = os.path.join(path, "config.json")
            config = _parse_config(read_json(config_path), config_path)
            source = find_weights_file(path, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
            state_dict = read_state_dict(source, dtype=dtype, channels_last=channels_last)
        else:
            config_dict, state_dict = single_file.read_unet(path, dtype, channels_last)
            config, source = _parse_config(config_dict, path), path
        with torch.device("meta"):
            model = cls(config)
        return load_strict(model, state_dict, source).eval()


def _parse_config(config_dict, source):
    """UNetConfig of a config.json dict (or of the one single_file.py reads off tensor shapes)."""
    try:
        if not isinstance(config_dict, dict):
            raise ValueError("not a JSON object")
        return UNetConfig.from_diffusers(config_dict)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{source}: {e}") from None
