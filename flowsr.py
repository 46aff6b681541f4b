"""The FlowSR super-resolver as one module: autoencoder E/D + velocity UNet v + a fixed context c.

    z_L = s * E(up(x_LR))                     (SPEC 1)
    z_H_hat = z_L - v(z_L, 1000, c)           (SPEC 2, one Euler step from t = 1 to t = 0)
    x_SR = D(z_H_hat / s)

`FlowSR` is what train.py trains and what sample.py runs. It is built from a preset (`tiny`: pixel
autoencoder + a small UNet, trains on a CPU; `sd21`: Stable Diffusion 2.1-base with the CLIP embedding of
the fixed FlowSR prompt as context) and saved in one of two kinds of checkpoint:

- full: every UNet weight plus the context, and the configs as JSON metadata (`flowsr_model`), so
  `FlowSR.load(path)` rebuilds the model from the file alone (used for the tiny preset);
- LoRA: the layout of the published FlowSR checkpoint (SPEC 8, lora.py), loaded on top of an SD 2.1-base
  given with `base=` (or the one recorded by the train.py run that wrote it); the LoRA is merged into the
  weights once, at load time. An SD 1.x base is refused with a message saying so (`check_text_width`).
"""
import hashlib
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import lora
from unet import UNet, UNetConfig
from vae import AutoencoderKL, PixelAutoencoder, vae_from_config
from plumbing.weights import WeightsError, load_strict, read_metadata, read_state_dict, save_atomic

FLOWSR_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                 "and natural lighting.")
# The prompt's CLIP BPE ids, so a single-file SD base (which carries no tokenizer) still works with the
# default prompt; tests/test_flowsr.py checks them against the real tokenizer.
FLOWSR_PROMPT_IDS = (49406, 320, 1400, 268, 9977, 267, 279, 330, 267, 8118, 268, 16157, 2867, 593, 8157,
                     4353, 267, 14270, 5389, 267, 537, 3288, 5799, 269, 49407)
SD2_PAD_ID = 0
METADATA_KEY = "flowsr_model"

# LoRA targets of the sd21 preset: every conv / attention / feed-forward layer of the UNet (the choice of
# OSEDiff-style one-step SR fine-tunes), and every layer of the VAE encoder.
UNET_LORA_TARGETS = ["conv1", "conv2", "conv_shortcut", "conv", "conv_out", "proj_in", "proj_out",
                     "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]


def tiny_unet_config(latent_channels=48, context_dim=32):
    """A ~3 M parameter UNet for the pixel autoencoder's 48-channel latents: trains on a laptop CPU."""
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(64, 128),
                      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=context_dim,
                      attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)


class FlowSR(nn.Module):
    def __init__(self, unet, ae, context, upsample="bicubic"):
        super().__init__()
        self.unet, self.ae, self.upsample = unet, ae, upsample
        self.register_buffer("context", context, persistent=False)  # (1, L, D)

    def forward(self, z, timesteps, context=None):
        """The velocity v(z, t, c): the `net` that flow.py and consistency.py call."""
        context = self.context if context is None else context
        return self.unet(z, timesteps, context.expand(z.shape[0], -1, -1).to(z.dtype))

    @property
    def scale(self):
        return self.ae.scaling_factor

    @property
    def pad_multiple(self):
        """Input sizes must divide by this: the autoencoder's and the UNet's down-sampling together."""
        return self.ae.downscale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def upsample_lr(self, x_lr):
        """up(x_LR): (B, 3, h, w) -> (B, 3, 4h, 4w)."""
        return F.interpolate(x_lr, scale_factor=4, mode=self.upsample,
                             align_corners=False).clamp(-1, 1)

    def encode(self, x, tile_size=None):
        return self.scale * self.ae.encode(x, tile_size=tile_size)

    def decode(self, z, tile_size=None):
        return self.ae.decode(z / self.scale, tile_size=tile_size)

    def config_dict(self):
        return {"unet": self.unet.config.to_dict(), "autoencoder": self.ae.to_dict(), "upsample": self.upsample}

    # ---- building -------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, upsample="bicubic"):
        ae = PixelAutoencoder()
        config = tiny_unet_config(ae.latent_channels)
        return cls(UNet(config), ae, torch.zeros(1, 1, config.cross_attention_dim), upsample)

    @classmethod
    def sd21(cls, base, prompt=FLOWSR_PROMPT, context=None, upsample="bicubic", dtype=torch.float32, cache_dir=None):
        """SD 2.1-base from a diffusers folder or an original single file; `context` skips the text encoder."""
        unet = UNet.from_pretrained(base, dtype=dtype)
        ae = AutoencoderKL.from_pretrained(base, dtype=dtype)
        if context is None:
            context = prompt_context(base, prompt, cache_dir)
        if context.shape[-1] != unet.config.cross_attention_dim:
            raise WeightsError(f"{base}: text embedding width {context.shape[-1]} does not fit the UNet's "
                               f"cross-attention width {unet.config.cross_attention_dim}")
        return cls(unet, ae, context.to(dtype), upsample)

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self, path, extra=None):
        """A full checkpoint: every UNet weight, the context, and the configs as metadata."""
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors["context"] = self.context
        meta = {METADATA_KEY: json.dumps({**self.config_dict(), **(extra or {})})}
        save_atomic(tensors, path, meta)

    def save_lora(self, path, unet_rank, vae_rank, extra=None):
        """A LoRA checkpoint in the published FlowSR layout (SPEC 8); needs the base model to load."""
        # The format needs a positive VAE rank; without a VAE LoRA an empty target list makes it apply to nothing.
        fields = {"unet_rank": unet_rank, "unet_lora_target_modules": UNET_LORA_TARGETS,
                  "vae_rank": vae_rank or unet_rank,
                  "vae_lora_target_modules": vae_encoder_targets(self.ae) if vae_rank else [], "lora_alpha": 8}
        lora.write_flowsr_checkpoint(path, fields, lora.lora_state_dict(self.unet),
                                     lora.lora_state_dict(self.ae) if vae_rank else {},
                                     extra_metadata={METADATA_KEY: json.dumps({"upsample": self.upsample,
                                                                               **(extra or {})})})

    @classmethod
    def load(cls, path, base=None, prompt=None, context=None, dtype=torch.float32, cache_dir=None):
        """Rebuild a model from a checkpoint of either kind.

        A LoRA checkpoint needs an SD 2.1-base: `base`, or the one its train.py run recorded. `prompt` (default:
        the run's, or the FlowSR prompt) only applies to it; `cache_dir` caches the prompt's text embedding.
        """
        meta = read_metadata(path)
        own = _json_object(meta.get(METADATA_KEY, "{}"), path)
        run = own.get("train_config") or {}  # what train.py recorded: its --base and --prompt
        if not isinstance(run, dict):
            raise WeightsError(f"{path}: 'train_config' in the metadata is not a JSON object")
        upsample = own.get("upsample", "bilinear" if lora.METADATA_KEY in meta else "bicubic")
        if upsample not in ("bilinear", "bicubic"):
            raise WeightsError(f"{path}: unknown upsample mode {upsample!r} in metadata")
        if lora.METADATA_KEY in meta:
            base = base or run.get("base")
            if not base:
                raise WeightsError(f"{path}: a LoRA checkpoint on SD 2.1-base: give the base model (--base)")
            if not isinstance(base, str) or not os.path.exists(base):
                raise WeightsError(f"{path}: its base model {base} is not there: give it with --base")
            prompt = prompt or run.get("prompt") or FLOWSR_PROMPT
            model = cls.sd21(base, prompt, context, upsample, dtype, cache_dir)
            check_text_width(path, model.unet, base)
            lora.apply_flowsr_checkpoint(path, model.unet, model.ae, merge=True)
            return model
        if METADATA_KEY not in meta:
            raise WeightsError(f"{path}: not a FlowSR checkpoint (no '{METADATA_KEY}' or "
                               f"'{lora.METADATA_KEY}' metadata)")
        if base:
            raise WeightsError(f"{path}: a full FlowSR checkpoint; it needs no --base")
        if prompt:
            raise ValueError(f"{path}: this model has a fixed context; a prompt does not apply to it")
        try:
            unet_config = UNetConfig.from_dict(own["unet"])
            ae = vae_from_config(own["autoencoder"])
            with torch.device("meta"):
                unet = UNet(unet_config)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise WeightsError(f"{path}: bad model config in metadata ({type(e).__name__}: {e})") from None
        if not (isinstance(ae, PixelAutoencoder) and ae.channels == 3 and type(ae.factor) is int and ae.factor > 0):
            raise WeightsError(f"{path}: a full checkpoint needs a pixel autoencoder on RGB (factor >= 1)")
        if not ae.latent_channels == unet_config.in_channels == unet_config.out_channels:
            raise WeightsError(f"{path}: autoencoder latents ({ae.latent_channels} channels) do not fit the UNet")
        state = read_state_dict(path)
        not_float = [k for k, v in state.items() if not v.is_floating_point()]
        if not_float:
            raise WeightsError(f"{path}: tensors that are not floating point: {', '.join(not_float[:5])}")
        context = state.pop("context", None)
        if context is None or context.dim() != 3 or context.shape[0] != 1 or \
                context.shape[-1] != unet_config.cross_attention_dim:
            raise WeightsError(f"{path}: no 'context' tensor of shape (1, L, {unet_config.cross_attention_dim})")
        load_strict(unet, {k.removeprefix("unet."): v for k, v in state.items()}, path)
        return cls(unet.to(dtype), ae, context.to(dtype), upsample)


def _json_object(text, path):
    try:
        value = json.loads(text)
    except ValueError as e:
        raise WeightsError(f"{path}: '{METADATA_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: '{METADATA_KEY}' metadata is not a JSON object")
    return value


def vae_encoder_targets(ae):
    """Dotted names of every Linear / Conv2d of the VAE encoder (LoRA there leaves the decoder alone).

    An already wrapped layer counts under its own name, not its base_layer / lora_A / lora_B parts."""
    layers = (nn.Linear, nn.Conv2d, lora.LoRALayer)
    inside_lora = re.compile(r"\.(base_layer|lora_A|lora_B)(\.|$)")
    return [name for name, m in ae.named_modules() if name.startswith(("encoder.", "quant_conv"))
            and isinstance(m, layers) and not inside_lora.search(name)]


def check_text_width(path, unet, base):
    """Refuse an SD 1.x base for an SD 2.x checkpoint, with a message that says so.

    The LoRA of a cross-attention key / value projection (attn2.to_k, attn2.to_v) takes the text embedding
    as input, so its lora_A shows the width the checkpoint was trained with (SD 2.x: 1024, SD 1.x: 768).
    """
    _, unet_sd, _ = lora.read_flowsr_checkpoint(path)
    widths = {v.shape[1] for k, v in unet_sd.items() if re.search(r"\.attn2\.to_[kv]\.lora_A\.[^.]+\.weight$", k)}
    expected = unet.config.cross_attention_dim
    if widths and widths != {expected}:
        raise WeightsError(f"{path}: made for text embeddings {max(widths)} wide (SD 2.x: 1024), but the UNet of "
                           f"{base} takes {expected} (SD 1.x: 768): an SD 1.x base for an SD 2.x checkpoint? "
                           f"Use SD 2.1-base")


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
