"""FlowSR checkpoint files, written and read strictly.

Two kinds:
- full: every UNet weight, the pixel head's and the texture predictor's (when the model has them) and the context,
  with the configs as JSON metadata (`flowsr_model`: UNet, autoencoder, upsampling, flat gate, pixel head,
  texture), so the model is rebuilt from the file alone (the tiny preset);
- LoRA: the layout of the published FlowSR checkpoint (SPEC 8, lora.py), loaded on top of an SD 2.1-base
  given with `base=` (or the one recorded by the train.py run that wrote it); the LoRA is merged into the
  weights once, at load time. An SD 1.x base is refused with a message saying so (`check_text_width`).
"""
import json
import os
import re

import torch

import lora
from plumbing.weights import WeightsError, json_object, load_strict, read_metadata, read_state_dict, save_atomic
from unet import UNet, UNetConfig
from vae import PixelAutoencoder, vae_from_config

METADATA_KEY = "flowsr_model"
PARTS = {"head": "pixel_head", "texture": "texture"}  # the tiny preset's optional modules: {attribute: metadata key}


def save_full(model, path, extra=None):
    """Every UNet, pixel-head and texture-predictor weight, the context, and the model's configs as metadata."""
    tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    for part in PARTS:
        if getattr(model, part) is not None:
            tensors.update({f"{part}.{k}": v for k, v in getattr(model, part).state_dict().items()})
    tensors["context"] = model.context
    save_atomic(tensors, path, {METADATA_KEY: json.dumps({**model.config_dict(), **(extra or {})})})


def save_lora(model, path, unet_targets, vae_targets, unet_rank, vae_rank, extra=None):
    """The LoRA tensors in the published FlowSR layout (SPEC 8); loading needs the base model."""
    # The format needs a positive VAE rank; without a VAE LoRA an empty target list makes it apply to nothing.
    fields = {"unet_rank": unet_rank, "unet_lora_target_modules": unet_targets, "vae_rank": vae_rank or unet_rank,
              "vae_lora_target_modules": vae_targets if vae_rank else [], "lora_alpha": 8}
    lora.write_flowsr_checkpoint(path, fields, lora.lora_state_dict(model.unet),
                                 lora.lora_state_dict(model.ae) if vae_rank else {},
                                 extra_metadata={METADATA_KEY: json.dumps({"upsample": model.upsample,
                                                                           **(extra or {})})})


def recorded_upsample(path):
    """up(x_LR) of the model in `path`: as its metadata says, or by its kind's convention (a published LoRA
    checkpoint: bilinear, SPEC 7; a full one: bicubic)."""
    meta = read_metadata(path)
    own = json_object(meta.get(METADATA_KEY, "{}"), path, f"'{METADATA_KEY}' metadata")
    upsample = own.get("upsample", "bilinear" if lora.METADATA_KEY in meta else "bicubic")
    if upsample not in ("bilinear", "bicubic"):
        raise WeightsError(f"{path}: unknown upsample mode {upsample!r} in metadata")
    return upsample


def load(cls, path, base=None, prompt=None, context=None, dtype=torch.float32, cache_dir=None, channels_last=False):
    """A `cls` (FlowSR) rebuilt from a checkpoint of either kind; see FlowSR.load."""
    meta = read_metadata(path)
    own = json_object(meta.get(METADATA_KEY, "{}"), path, f"'{METADATA_KEY}' metadata")
    run = own.get("train_config") or {}  # what train.py recorded: its --base and --prompt
    if not isinstance(run, dict):
        raise WeightsError(f"{path}: 'train_config' in the metadata is not a JSON object")
    upsample = recorded_upsample(path)
    if lora.METADATA_KEY in meta:
        base = base or run.get("base")
        if not base:
            raise WeightsError(f"{path}: a LoRA checkpoint on SD 2.1-base: give the base model (--base)")
        if not isinstance(base, str) or not os.path.exists(base):
            raise WeightsError(f"{path}: its base model {base} is not there: give it with --base")
        model = cls.sd21(base, prompt or run.get("prompt") or None, context, upsample, dtype, cache_dir,
                         channels_last)
        check_text_width(path, model.unet, base)
        lora.apply_flowsr_checkpoint(path, model.unet, model.ae, merge=True)
        return model
    if METADATA_KEY not in meta:
        raise WeightsError(f"{path}: not a FlowSR checkpoint (no '{METADATA_KEY}' or '{lora.METADATA_KEY}' metadata)")
    if base:
        raise WeightsError(f"{path}: a full FlowSR checkpoint; it needs no --base")
    if prompt or context is not None:
        raise WeightsError(f"{path}: this model has a fixed context; a {'prompt' if prompt else 'context'} does not "
                           "apply to it")
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
    flat_gate = own.get("flat_gate", 0.0)
    if isinstance(flat_gate, bool) or not isinstance(flat_gate, (int, float)) or not flat_gate >= 0:
        raise WeightsError(f"{path}: flat_gate in metadata must be a number >= 0, got {flat_gate!r}")
    widths = {part: own.get(key, 0) for part, key in PARTS.items()}  # hidden channels; 0: the model has none
    for part, width in widths.items():
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise WeightsError(f"{path}: {PARTS[part]} in metadata must be an integer >= 0, got {width!r}")
    state = read_state_dict(path, dtype=dtype, channels_last=channels_last)
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise WeightsError(f"{path}: tensors that are not floating point: {', '.join(not_float[:5])}")
    context = state.pop("context", None)
    if context is None or context.dim() != 3 or context.shape[0] != 1 or \
            context.shape[-1] != unet_config.cross_attention_dim:
        raise WeightsError(f"{path}: no 'context' tensor of shape (1, L, {unet_config.cross_attention_dim})")
    part_states = {part: {k.removeprefix(part + "."): state.pop(k)  # out of `state`, which keeps the UNet's
                          for k in [k for k in state if k.startswith(part + ".")]} for part in PARTS}
    for part, part_state in part_states.items():
        if part_state and not widths[part]:
            raise WeightsError(f"{path}: {part}.* tensors but no {PARTS[part]} in the metadata")
    load_strict(unet, {k.removeprefix("unet."): v for k, v in state.items()}, path)
    model = cls(unet, ae, context, upsample, float(flat_gate), widths["head"], widths["texture"])
    for part in PARTS:
        if getattr(model, part) is not None:
            load_strict(getattr(model, part).to(context.dtype), part_states[part], path)
    return model


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
