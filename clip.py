"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Two uses in FlowSR:
- the SD 2.1 UNet is conditioned on the CLIP text embedding c = CLIPTextModel(tokens(prompt)),
  shape (B, 77, 1024) (SPEC sections 1 and 7);
- the CLIP-IQA loss of SPEC section 5 compares CLIPModel.encode_image(x) with encode_text(prompts).

`CLIPTokenizer` is CLIP's byte-level BPE, matching transformers' CLIPTokenizer (the one diffusers
feeds SD with). Module names follow transformers' CLIPTextModel / CLIPModel, so their state dicts
load unchanged; the text encoders of original SD single files (OpenCLIP text tower for SD 2.x,
transformers layout for SD 1.x) are converted on loading by single_file.py (SPEC section 8).
"""
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing import single_file
from plumbing.weights import WeightsError, find_weights_file, load_strict, read_json, read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # of the RGB channels in [0, 1], CLIP's training set
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # of a transformers model folder


# ---------------------------------------------------------------------------------------------
# Tokenizer

def bytes_to_unicode():
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + i for i in range(len(others))])}


@lru_cache(maxsize=1)
def word_pattern():
    r"""CLIP's pre-tokenizer: 's|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+, written for `re`.

    `re` has no \p{..} classes, but its unicode \w is exactly letters + numbers + "_", and \d is the
    decimal digits (Nd). The other numbers (No, Nl: "²", "½", "Ⅻ") are listed explicitly, and \s is
    narrowed to Unicode White_Space (re's \s also holds the separators \x1c-\x1f)."""
    other_numbers = "".join(c for c in map(chr, range(sys.maxunicode + 1))
                            if c.isnumeric() and unicodedata.category(c) in ("No", "Nl"))
    letter = rf"[^\W\d_{other_numbers}]"
    number = rf"[\d{other_numbers}]"
    other = r"(?:[^\s\w]|[_\x1c-\x1f])"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|{letter}+|{number}|{other}+")


WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


class CLIPTokenizer:
    """Prompts -> token ids (B, model_max_length): BOS, BPE tokens, EOS, then padding.

    Text clean-up as transformers does it: NFC, runs of whitespace -> one space, lower-case (char by
    char, like the Rust tokenizer: no Greek final sigma). The special tokens (BOS, EOS, pad, unk) are
    cut out of the raw text first (exact strings; transformers also matches case variants when a file
    flags them "normalized", which is not reproduced) and map straight to their ids, so with SD 2.x's
    pad token "!" every "!" of a prompt becomes id 0, exactly as in diffusers. Unlike OpenCLIP, no
    ftfy fixes and no HTML unescaping ("&amp;" stays three tokens)."""

    def __init__(self, vocab, merges, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_chars = bytes_to_unicode()
        specials = (bos_token, eos_token, pad_token, unk_token)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids = [vocab[token] for token in specials]
        self.special_ids = dict(zip(specials, ids))
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self.special_split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self.model_max_length = model_max_length
        self.cache = {}

    @classmethod
    def from_pretrained(cls, path):
        """From a folder with vocab.json, merges.txt and special_tokens_map.json / tokenizer_config.json,
        or a whole SD folder holding tokenizer/."""
        folder = os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else path
        vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        vocab = read_json(vocab_path)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise WeightsError(f"{vocab_path}: not a token -> id mapping")
        merges = read_merges(merges_path)
        settings = {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(config_path):
            settings = read_json(config_path)
        # transformers' rule: special_tokens_map.json overrides tokenizer_config.json, unless the latter
        # is a newer file listing its own added tokens (SD 2.x's files set pad "!" only in the map)
        map_path = os.path.join(folder, "special_tokens_map.json")
        if os.path.isfile(map_path) and "added_tokens_decoder" not in settings:
            settings = {**settings, **read_json(map_path)}
        tokens = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = settings.get(name, "<|startoftext|>" if name == "bos_token" else "<|endoftext|>")
            tokens[name] = value["content"] if isinstance(value, dict) else value
            if tokens[name] not in vocab:
                raise WeightsError(f"{vocab_path}: {name} {tokens[name]!r} is not in the vocabulary")
        return cls(vocab, merges, **tokens, model_max_length=int(settings.get("model_max_length", 77)))

    def bpe(self, word):
        """Byte-pair merges of one pre-tokenized word (its bytes as characters), lowest rank first."""
        if word not in self.cache:
            parts, unmergeable = [*word[:-1], word[-1] + "</w>"], len(self.ranks)
            while len(parts) > 1:
                rank, i = min((self.ranks.get(pair, unmergeable), i) for i, pair in enumerate(zip(parts, parts[1:])))
                if rank == unmergeable:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            self.cache[word] = [self.vocab.get(part, self.unk_id) for part in parts]
        return self.cache[word]

    def encode(self, text):
        """Token ids of one prompt, without BOS/EOS and untruncated."""
        ids = []
        for piece in self.special_split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
                continue
            piece = "".join(c.lower() for c in WHITESPACE.sub(" ", unicodedata.normalize("NFC", piece)))
            for word in word_pattern().findall(piece):
                ids += self.bpe("".join(self.byte_chars[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, texts):
        """LongTensor (B, model_max_length): truncated to keep EOS last, then padded."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = [self.bos_id, *self.encode(text)[:self.model_max_length - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.model_max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def read_merges(path):
    """The merge rules of merges.txt as (left, right) pairs, in rank order (a '#version' line is skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not a readable text file ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    bad = next((n for n, pair in enumerate(merges) if len(pair) != 2), None)
    if bad is not None:
        raise WeightsError(f"{path}: merge rule {bad + 1} is not two tokens: {' '.join(merges[bad])!r}")
    return merges


# ---------------------------------------------------------------------------------------------
# Transformer (shared by the text and vision towers)

@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields and defaults (config.json files leave defaults out)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # width of CLIPModel.text_projection
    eos_token_id: int = 49407  # transformers pools at argmax(ids) when this is 2 (older configs)


@dataclass
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields and defaults."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # width of CLIPModel.visual_projection


def config_from_json(config_class, config):
    """A config dataclass from a transformers config.json dict: known fields, defaults for the rest."""
    return config_class(**{f.name: config[f.name] for f in fields(config_class) if f.name in config})


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, causal):
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, T, D/heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, causal):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {config.hidden_act!r} (only {', '.join(ACTIVATIONS)})")
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, causal):
        for layer in self.layers:
            x = layer(x, causal)
        return x


# ---------------------------------------------------------------------------------------------
# Text tower

class TextEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> last hidden state after final_layer_norm (B, T, D); causal attention."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{T} tokens, but the text model has {self.config.max_position_embeddings} positions")
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:T]  # (B, T, D)
        return self.final_layer_norm(self.encoder(x, causal=True))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """From a transformers text_encoder/ folder (config.json + model.safetensors or pytorch_model.bin),
        a whole SD folder, or an original SD single file (2.x: OpenCLIP, penultimate layer; 1.x)."""
        if os.path.isdir(path):
            folder = os.path.join(path, "text_encoder") if os.path.isdir(os.path.join(path, "text_encoder")) else path
            config = config_from_json(CLIPTextConfig, read_json(os.path.join(folder, "config.json")))
            weights_path = find_weights_file(folder, WEIGHT_NAMES)
            state_dict = read_state_dict(weights_path, dtype=dtype)
            state_dict = {key.removeprefix("text_model."): value for key, value in state_dict.items()}
            state_dict.pop("embeddings.position_ids", None)  # a buffer older transformers saved
        else:
            weights_path = path
            config_dict, state_dict = single_file.read_text_encoder(path, dtype)
            config = config_from_json(CLIPTextConfig, config_dict)
        with torch.device("meta"):
            model = cls(config)
        return load_strict(model, state_dict, weights_path)


# ---------------------------------------------------------------------------------------------
# Vision tower and the joint model

class VisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D), N = (S/patch)^2
        cls = self.class_embedding.expand(len(pixels), 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)


class CLIPVisionModel(nn.Module):
    """ViT: pixels (B, C, S, S) -> post_layernorm of the class token (B, D)."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic): the weights' name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)  # (B, 1 + N, D)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    """Text and image towers with their projections into the joint embedding space (B, projection_dim)."""

    def __init__(self, text_config, vision_config):
        super().__init__()
        if text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(f"projection_dim differs: text {text_config.projection_dim}, "
                             f"vision {vision_config.projection_dim}")
        self.image_size = vision_config.image_size
        self.text_model = CLIPTextModel(text_config)
        self.vision_model = CLIPVisionModel(vision_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, vision_config.projection_dim, bias=False)
        self.text_projection = nn.Linear(text_config.hidden_size, text_config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # contrastive temperature; unused by FlowSR

    def encode_text(self, input_ids):
        """Token ids (B, 77) -> (B, projection_dim), the hidden state at the EOS token."""
        hidden = self.text_model(input_ids)  # (B, 77, D)
        eos_token_id = self.text_model.config.eos_token_id
        # transformers' rule: configs with the old eos_token_id 2 take the largest id (EOS is the largest)
        eos = input_ids.argmax(-1) if eos_token_id == 2 else (input_ids == eos_token_id).int().argmax(-1)
        return self.text_projection(hidden[torch.arange(len(hidden), device=hidden.device), eos])

    def encode_image(self, pixels):
        """Pixels (B, 3, image_size, image_size), normalised with CLIP_MEAN/CLIP_STD -> (B, projection_dim)."""
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP takes {self.image_size}x{self.image_size} images, got {tuple(pixels.shape[-2:])}")
        return self.visual_projection(self.vision_model(pixels))

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        """From a transformers CLIPModel folder (config.json with text_config and vision_config,
        model.safetensors or pytorch_model.bin)."""
        config_path = os.path.join(path, "config.json")
        config = read_json(config_path)
        if "text_config" not in config or "vision_config" not in config:
            raise WeightsError(f"{config_path}: not a CLIPModel config (no text_config / vision_config)")
        projection = {"projection_dim": config.get("projection_dim", 512)}  # transformers projects both towers to it
        text_config = config_from_json(CLIPTextConfig, {**config["text_config"], **projection})
        vision_config = config_from_json(CLIPVisionConfig, {**config["vision_config"], **projection})
        weights_path = find_weights_file(path, WEIGHT_NAMES)
        state_dict = read_state_dict(weights_path, dtype=dtype)
        for buffer in ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"):
            state_dict.pop(buffer, None)  # saved by older transformers; positions are implicit here
        with torch.device("meta"):
            model = cls(text_config, vision_config)
        return load_strict(model, state_dict, weights_path)
