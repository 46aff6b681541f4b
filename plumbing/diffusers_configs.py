"""diffusers config.json dicts -> the keyword arguments of unet.UNetConfig and vae.AutoencoderKLConfig.

diffusers' configs carry many keys for features Stable Diffusion does not use. Each is accepted only at the
value that leaves SD's math unchanged, so a config of another model fails here with the key's name instead of
loading into the wrong network. For the UNet every other unknown key is an error too; the VAE's config.json
also carries keys that only steer diffusers' pipelines (sample_size, force_upcast), so its other keys are
ignored, and a VAE that differs in an ignored way still fails at loading, on its weights' names and shapes.
"""

UNET_FIXED = {  # key: the accepted values, the first being SD's
    "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "dropout": (0,), "act_fn": ("silu", "swish"), "num_attention_heads": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,), "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
UNET_HARMLESS = {"addition_embed_type_num_heads"}  # only matters when a feature above is switched on

VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "shift_factor": None, "latents_mean": None, "latents_std": None}
VAE_DEFAULTS = {"layers_per_block": 1, "norm_num_groups": 32, "in_channels": 3, "out_channels": 3,
                "latent_channels": 4, "scaling_factor": 0.18215}  # diffusers' own defaults for missing keys


def unet_kwargs(config, fields):
    """The UNetConfig fields (names in `fields`) of a diffusers unet/config.json dict; raises ValueError."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"config describes a {config['_class_name']}, not a UNet2DConditionModel")
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in UNET_HARMLESS:
            continue
        if key in UNET_FIXED:
            if value not in UNET_FIXED[key]:
                raise ValueError(f"UNet config {key}={value!r} is not supported "
                                 f"(Stable Diffusion 1.x/2.x uses {UNET_FIXED[key][0]!r})")
        elif key in fields:
            kwargs[key] = value
        else:
            raise ValueError(f"UNet config key {key!r} is not supported")
    return kwargs


def vae_kwargs(config):
    """The AutoencoderKLConfig fields of a diffusers vae/config.json dict; raises ValueError."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"config is for {config['_class_name']}, not AutoencoderKL")
    for key, supported in VAE_FIXED.items():
        if config.get(key, supported) != supported:
            raise ValueError(f"unsupported AutoencoderKL config {key}={config[key]!r} (only {supported!r})")
    block_out_channels = tuple(config.get("block_out_channels", (64,)))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [block] * len(block_out_channels)))
        if types != [block] * len(block_out_channels):
            raise ValueError(f"unsupported AutoencoderKL config {key}={types} "
                             f"(only {len(block_out_channels)} x {block})")
    return {"block_out_channels": block_out_channels, **{k: config.get(k, v) for k, v in VAE_DEFAULTS.items()}}
