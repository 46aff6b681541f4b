"""Reading an original single-file Stable Diffusion checkpoint (SPEC section 8).

Stability AI publishes SD as one file (`v2-1_512-ema-pruned.safetensors`, or a pickled `.ckpt`) in the
layout of the original latent-diffusion (LDM) code, not as the diffusers folder that unet.py, vae.py and
clip.py are written against. Three things differ, and this file undoes them:

- One file holds all three networks, told apart by a prefix: `model.diffusion_model.` (UNet),
  `first_stage_model.` (VAE), `cond_stage_model.` (text encoder: `.model.` is the OpenCLIP text tower of
  SD 2.x, `.transformer.text_model.` the transformers CLIP of SD 1.x). Each reader asks
  weights.read_state_dict for its prefix only, so loading the UNet does not read the VAE and text encoder
  (a bare VAE file, with no prefix at all, is read whole).
- The module names are LDM's: `input_blocks.4.1.proj_in` is diffusers' `down_blocks.1.attentions.0.proj_in`,
  `encoder.mid.attn_1.q` (a 1x1 conv) is `encoder.mid_block.attentions.0.to_q` (a Linear), and OpenCLIP's
  fused `attn.in_proj_weight` is the three `self_attn.{q,k,v}_proj`. convert_ldm_unet, convert_ldm_vae and
  openclip_text_weights rename and reshape, as diffusers' loaders/single_file_utils.py does; a key they
  do not know keeps its name, so that the strict load reports it.
- There is no config.json. The `*_config_from_*` functions read one off the tensor shapes and return it as the
  dict a config.json would hold, so each model module parses it exactly like a folder's. What no shape
  shows (head counts, norm groups, the VAE scaling factor) follows the SD family: see each function.
"""
import re

from plumbing.weights import WeightsError, read_state_dict

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
OPENCLIP_PREFIX, SD1_TEXT_PREFIX = "cond_stage_model.model.", "cond_stage_model.transformer.text_model."


def under(state_dict, prefix):
    """The entries whose names start with `prefix`, with the prefix cut off."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# UNet: input_blocks / middle_block / output_blocks -> down_blocks / mid_block / up_blocks

DOWN_BLOCK = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}  # diffusers' block type, by "has attention"
UP_BLOCK = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def read_unet(path, dtype=None, channels_last=False):
    """(config.json-style dict, state dict in diffusers names) of the UNet in an original SD file."""
    ldm = under(read_state_dict(path, UNET_PREFIX, dtype, channels_last), UNET_PREFIX)
    if not ldm:
        if "conv_in.weight" in read_state_dict(path, "conv_in.weight"):
            raise WeightsError(f"{path}: diffusers-layout UNet weights; pass the folder holding it and its config.json")
        raise WeightsError(f"{path}: no Stable Diffusion UNet weights (no {UNET_PREFIX}* keys)")
    config = unet_config_from_ldm(ldm, path)
    return config, convert_ldm_unet(ldm, config)


def unet_config_from_ldm(state_dict, source="LDM state dict"):
    """The diffusers UNet config of an LDM UNet state dict (prefix stripped), read off tensor shapes.

    Shapes give the channels, levels, depths, context width and projection type. The head count does not
    show in any shape, so it follows the two SD families: a linear proj_in (SD 2.x) means 64 channels per
    head, a 1x1-conv proj_in (SD 1.x) means 8 heads.
    """
    def shape(key):
        if key not in state_dict:
            raise WeightsError(f"{source}: weights do not fit a Stable Diffusion UNet (no {key})")
        return state_dict[key].shape

    in_channels = shape("input_blocks.0.0.weight")[1]
    input_blocks = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("input_blocks."))
    downsamplers = sorted(int(k.split(".")[1]) for k in state_dict
                          if k.startswith("input_blocks.") and k.endswith(".0.op.weight"))
    levels = len(downsamplers) + 1
    stage = input_blocks // levels  # input blocks per level: the ResNets and the downsampler after them
    if stage * levels != input_blocks or downsamplers != [stage * (i + 1) for i in range(levels - 1)]:
        raise WeightsError(f"{source}: weights do not fit a Stable Diffusion UNet (irregular input_blocks)")
    first_blocks = [1 + i * stage for i in range(levels)]
    channels = [shape(f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in first_blocks]
    attention = [f"input_blocks.{b}.1.proj_in.weight" in state_dict for b in first_blocks]
    linear = len(shape("middle_block.1.proj_in.weight")) == 2
    if linear and any(c % 64 for c in channels):
        raise WeightsError(f"{source}: SD 2.x-style UNet with channels {channels} that are not multiples of 64")
    depth = len({k.split(".")[3] for k in state_dict if k.startswith("middle_block.1.transformer_blocks.")})
    return dict(
        in_channels=in_channels, out_channels=shape("out.2.weight")[0], block_out_channels=channels,
        layers_per_block=stage - 1,
        down_block_types=[DOWN_BLOCK[a] for a in attention], up_block_types=[UP_BLOCK[a] for a in reversed(attention)],
        cross_attention_dim=shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        attention_head_dim=[c // 64 for c in channels] if linear else 8,
        use_linear_projection=linear, transformer_layers_per_block=depth)


LDM_RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_unet_prefixes(config):
    """(LDM prefix, diffusers prefix, is a ResNet) for every sub-module of the UNet.

    LDM numbers the blocks of each half in one sequence: input block 0 is conv_in, then every level has
    layers_per_block (ResNet, transformer) blocks and a downsampler; output blocks have one more ResNet
    per level and end with the upsampler. Transformers keep their inner names.
    """
    layers, levels = config["layers_per_block"], len(config["block_out_channels"])
    yield "time_embed.0.", "time_embedding.linear_1.", False
    yield "time_embed.2.", "time_embedding.linear_2.", False
    yield "input_blocks.0.0.", "conv_in.", False
    block = 1
    for level in range(levels):
        for i in range(layers):
            yield f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{i}.", True
            yield f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{i}.", False
            block += 1
        if level < levels - 1:
            yield f"input_blocks.{block}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", False
            block += 1
    yield "middle_block.0.", "mid_block.resnets.0.", True
    yield "middle_block.1.", "mid_block.attentions.0.", False
    yield "middle_block.2.", "mid_block.resnets.1.", True
    block = 0
    for level in range(levels):
        attention = config["up_block_types"][level] == UP_BLOCK[True]
        for i in range(layers + 1):
            yield f"output_blocks.{block}.0.", f"up_blocks.{level}.resnets.{i}.", True
            if attention:
                yield f"output_blocks.{block}.1.", f"up_blocks.{level}.attentions.{i}.", False
            if i == layers and level < levels - 1:
                slot = 2 if attention else 1  # after the transformer, if there is one
                yield f"output_blocks.{block}.{slot}.conv.", f"up_blocks.{level}.upsamplers.0.conv.", False
            block += 1
    yield "out.0.", "conv_norm_out.", False
    yield "out.2.", "conv_out.", False


def convert_ldm_unet(state_dict, config):
    """Rename an LDM UNet state dict (prefix stripped) to diffusers' module names; `config` as returned
    by unet_config_from_ldm (or any diffusers UNet config dict)."""
    prefixes = list(ldm_unet_prefixes(config))
    converted = {}
    for key, tensor in state_dict.items():
        for old, new, resnet in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                if resnet:
                    module, _, param = rest.rpartition(".")
                    rest = f"{LDM_RESNET_NAMES.get(module, module)}.{param}"
                key = new + rest
                break
        converted[key] = tensor
    return converted


# ---------------------------------------------------------------------------------------------
# VAE: encoder.down.N.block / mid.attn_1 / decoder.up.N -> down_blocks / mid_block / up_blocks

LDM_VAE_RENAMES = [
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
]
ATTENTION_LINEAR = re.compile(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def read_vae(path, dtype=None, channels_last=False):
    """The VAE of an SD file (under first_stage_model.), or of a bare VAE file such as
    vae-ft-mse-840000-ema-pruned.ckpt (LDM or diffusers names, no prefix), in diffusers names."""
    return convert_ldm_vae(under(read_state_dict(path, VAE_PREFIX, dtype, channels_last), VAE_PREFIX)
                           or read_state_dict(path, dtype=dtype, channels_last=channels_last))


def convert_ldm_vae(state_dict):
    """Rename an LDM VAE state dict (prefix stripped) to diffusers' module names; diffusers names pass."""
    # LDM numbers decoder levels from the lowest resolution up (up.0 is the last applied).
    up_levels = {int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in LDM_VAE_RENAMES:
            key = re.sub(pattern, replacement, key)
        if up_levels:
            key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                         lambda m: f"decoder.up_blocks.{max(up_levels) - int(m[1])}.resnets.", key)
            key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                         lambda m: f"decoder.up_blocks.{max(up_levels) - int(m[1])}.upsamplers.0.", key)
        if ATTENTION_LINEAR.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # LDM stores these as 1x1 convolutions
        out[key] = value
    return out


def vae_config_from_shapes(state_dict, source):
    """The diffusers AutoencoderKL config of a diffusers-named VAE state dict, read off tensor shapes.
    norm_num_groups and scaling_factor do not show: they are left out, so SD's 32 and 0.18215 apply."""
    def shape(key):
        if key not in state_dict:
            raise WeightsError(f"{source}: not an AutoencoderKL checkpoint (no {key}; expected "
                               f"first_stage_model.* or encoder.*/decoder.* keys)")
        return state_dict[key].shape

    in_channels = shape("encoder.conv_in.weight")[1]
    levels = layers = 0
    while f"encoder.down_blocks.{levels}.resnets.0.conv2.weight" in state_dict:
        levels += 1
    while f"encoder.down_blocks.0.resnets.{layers}.conv2.weight" in state_dict:
        layers += 1
    return dict(  # max(levels, 1): a file without any level fails on its first key
        block_out_channels=[shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(max(levels, 1))],
        layers_per_block=layers, in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("post_quant_conv.weight")[0])


# ---------------------------------------------------------------------------------------------
# Text encoder: OpenCLIP (SD 2.x) or transformers CLIP (SD 1.x) -> CLIPTextModel

OPENCLIP_RENAMES = (("transformer.resblocks.", "encoder.layers."), (".ln_1.", ".layer_norm1."),
                    (".ln_2.", ".layer_norm2."), (".attn.out_proj.", ".self_attn.out_proj."),
                    (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."), ("ln_final.", "final_layer_norm."),
                    ("token_embedding.", "embeddings.token_embedding."),
                    ("positional_embedding", "embeddings.position_embedding.weight"))


def read_text_encoder(path, dtype=None):
    """(config.json-style dict, state dict in CLIPTextModel names) of an SD 2.x or 1.x single file."""
    checkpoint = read_state_dict(path, "cond_stage_model.", dtype)
    if openclip := under(checkpoint, OPENCLIP_PREFIX):
        return openclip_text_weights(openclip, path)
    if state_dict := under(checkpoint, SD1_TEXT_PREFIX):
        state_dict.pop("embeddings.position_ids", None)  # a buffer older transformers saved
        return text_config_from_shapes(state_dict, "quick_gelu", path), state_dict
    if read_state_dict(path, "text_model.embeddings.token_embedding.weight"):
        raise WeightsError(f"{path}: transformers-layout text encoder weights; pass the folder holding it and its "
                           "config.json")
    raise WeightsError(f"{path}: no CLIP text encoder in this file "
                       f"(no keys under {OPENCLIP_PREFIX} or {SD1_TEXT_PREFIX})")


def openclip_text_weights(openclip, path):
    """OpenCLIP text tower -> (config dict, CLIPTextModel state dict). SD 2.x conditions on the
    penultimate layer, so the last resblock is dropped (ln_final is applied to the output of the one
    before), and so are the contrastive head's text_projection and logit_scale. The fused attention
    in_proj is split in q, k, v."""
    blocks = {int(key.split(".")[2]) for key in openclip if key.startswith("transformer.resblocks.")}
    if not blocks:
        raise WeightsError(f"{path}: no transformer.resblocks under {OPENCLIP_PREFIX}")
    unused = f"transformer.resblocks.{max(blocks)}."
    state_dict = {}
    for key, value in openclip.items():
        if key.startswith(unused) or key in ("text_projection", "logit_scale"):
            continue
        for old, new in OPENCLIP_RENAMES:
            key = key.replace(old, new)
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            layer, kind = key.rsplit(".attn.in_proj_", 1)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                state_dict[f"{layer}.self_attn.{name}.{kind}"] = part
        else:
            state_dict[key] = value
    return text_config_from_shapes(state_dict, "gelu", path), state_dict


def text_config_from_shapes(state_dict, hidden_act, path):
    """transformers' CLIPTextConfig fields of a CLIPTextModel state dict (CLIP heads are 64 wide);
    the activation is not in the tensors: OpenCLIP's SD 2.x tower uses gelu, OpenAI's SD 1.x quick_gelu."""
    def shape(key):
        if key not in state_dict:
            raise WeightsError(f"{path}: missing text encoder tensor {key}")
        return state_dict[key].shape

    vocab_size, width = shape("embeddings.token_embedding.weight")
    layers = {int(key.split(".")[2]) for key in state_dict if key.startswith("encoder.layers.")}
    return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
                num_hidden_layers=len(layers), num_attention_heads=width // 64,
                max_position_embeddings=shape("embeddings.position_embedding.weight")[0], hidden_act=hidden_act)
