import gzip
import importlib.util
import json
import os
import random

import pytest
import torch
from safetensors.torch import save_file

import clip
from conftest import projected
from plumbing import single_file
from plumbing import weights
from plumbing.weights import WeightsError

PROMPTS = [
    "A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural lighting.",
    "Hello, World!! Wow!? (yes) [no] {maybe} a-b_c__d ... --- $5 @home #tag 100% 3.14159 1,000,000",
    "don't I'm we'll they've you're he'd 'sup DON'T O'Neil's",
    "café naïve Über straße ǅemal e\u0301te\u0301",  # NFC composes the combining accents
    "emoji 😀🎉 👍🏽 CJK 日本語の文章 中文 한국어 Ελληνικά ΟΔΟΣ İstanbul عربي",
    "numbers beyond \\d: ½ ² x²y Ⅻ ① ٣ ३",
    "  multiple   spaces\n\nnew\tlines \u3000 ideographic\u00a0nbsp \x1cfile-separator\x85 ",
    "html entities stay: &amp; &lt;b&gt; &#39;q&#39; &nbsp;",
    # exact special-token strings map to their ids (case variants depend on transformers' per-file flags)
    "special tokens in text <|endoftext|> and <|startoftext|>,<|endoftext|>x",
    "",
    " ".join(f"word{i}" for i in range(60)),  # > 77 tokens: truncated, EOS kept last
]


def bytes_chars():
    return list(clip.bytes_to_unicode().values())


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """open_clip's real BPE laid out as transformers' CLIP vocab.json + merges.txt (49408 tokens)."""
    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]  # no slow import of open_clip
    lines = gzip.open(os.path.join(package, "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = bytes_chars() + [c + "</w>" for c in bytes_chars()] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tokenizer_folder(bpe_files, folder, pad):
    """SD 2.x's files set pad "!" only in special_tokens_map.json (tokenizer_config.json says
    "<|endoftext|>"): the map wins. SD 1.x pads with "<|endoftext|>" in both."""
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((bpe_files / name).read_bytes())
    eos = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": eos, "pad_token": pad, "unk_token": eos}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True,
         "tokenizer_class": "CLIPTokenizer", "unk_token": eos}))
    return folder


TRICKY = "abcXYZ 09'!?.,;-_ \n\t&#<|>éïßΣσİⅧ½²①日本😀\u0301\u200b\ufeff\x1c\x85\u3000\u0660"


def fuzz_prompts(alphabet=TRICKY, n=300):
    rng = random.Random(0)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(n)]


@pytest.mark.parametrize("pad, pad_id", [("!", 0), ("<|endoftext|>", 49407)])
def test_tokenizer_matches_transformers(bpe_files, tmp_path, pad, pad_id):
    # the fast tokenizer is transformers 5's only one; 4.x's slow CLIPTokenizer splits some non-ASCII text apart
    from transformers import CLIPTokenizerFast as HFTokenizer
    folder = tokenizer_folder(bpe_files, tmp_path / "sd" / "tokenizer", pad)
    ours = clip.CLIPTokenizer.from_pretrained(str(tmp_path / "sd"))  # a whole SD folder
    reference = HFTokenizer.from_pretrained(str(folder))
    assert ours.model_max_length == 77 and ours.pad_id == reference.pad_token_id == pad_id
    prompts = PROMPTS + fuzz_prompts()
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids = ours(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    assert torch.equal(ids, expected)
    assert ids[len(PROMPTS) - 1, -1] == 49407 and (ids[len(PROMPTS) - 1, :-1] != pad_id).all()  # over-long: EOS last
    assert ids[PROMPTS.index(""), :3].tolist() == [49406, 49407, pad_id]


def test_newer_tokenizer_config_with_added_tokens_overrides_special_tokens_map(bpe_files, tmp_path):
    from transformers import CLIPTokenizerFast as HFTokenizer
    folder = tokenizer_folder(bpe_files, tmp_path / "tok", "!")
    config = {**json.loads((folder / "tokenizer_config.json").read_text()), "unk_token": "<|endoftext|>"}
    config["added_tokens_decoder"] = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True}
                                      for i, token in ((49406, "<|startoftext|>"), (49407, "<|endoftext|>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, reference = clip.CLIPTokenizer.from_pretrained(str(folder)), HFTokenizer.from_pretrained(str(folder))
    assert ours.pad_id == reference.pad_token_id == 49407
    prompts = ["Wow!! a photo!", PROMPTS[0]]
    expected = reference(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), expected)


def test_pre_tokenizer_matches_clip_regex_with_unicode_classes():
    """The `re` emulation of \\p{L} / \\p{N} against CLIP's own pattern in the `regex` module (which
    open_clip uses), on tricky strings and on every "other number" (No, Nl) Python knows."""
    import regex
    import unicodedata
    clip_pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    rng = random.Random(0)
    assigned = [c for c in map(chr, range(0x30000)) if unicodedata.category(c) not in ("Cn", "Cs")]
    other_numbers = "".join(c for c in assigned if unicodedata.category(c) in ("No", "Nl"))
    texts = PROMPTS + fuzz_prompts() + [other_numbers + "a" + other_numbers[::-1]]
    texts += ["".join(rng.choice(assigned) for _ in range(20)) for _ in range(300)]
    for text in texts:
        text = text.lower()
        assert clip.word_pattern().findall(text) == clip_pattern.findall(text), ascii(text)


def test_tokenizer_file_errors(bpe_files, tmp_path):
    folder = tokenizer_folder(bpe_files, tmp_path / "tok", "!")
    (folder / "merges.txt").write_text("#version: 0.2\na b\nc d e\n")
    with pytest.raises(WeightsError, match=r"merges\.txt: merge rule 2 is not two tokens"):
        clip.CLIPTokenizer.from_pretrained(str(folder))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (folder / "merges.txt").write_bytes((bpe_files / "merges.txt").read_bytes())
    with pytest.raises(WeightsError, match=r"vocab\.json: pad_token '<pad>' is not in the vocabulary"):
        clip.CLIPTokenizer.from_pretrained(str(folder))
    (folder / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(WeightsError, match=r"vocab\.json: not a readable JSON file"):
        clip.CLIPTokenizer.from_pretrained(str(folder))
    with pytest.raises(WeightsError, match=r"nowhere.vocab\.json: no such file"):
        clip.CLIPTokenizer.from_pretrained(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# Models

def randomize_(module):
    """Random values everywhere, LayerNorm scales around 1: no zero bias or unit norm hides a mapping bug."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = name.endswith("weight") and p.dim() == 1 and "embedding" not in name
            p.copy_(1 + 0.2 * torch.randn_like(p) if is_norm_weight else 0.1 * torch.randn_like(p))
    return module.eval()


def tiny_text_config(hidden_act, **overrides):
    from transformers import CLIPTextConfig
    sizes = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act, layer_norm_eps=1e-5)
    return CLIPTextConfig(**{**sizes, **overrides})


def max_rel_diff(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_text_model_matches_transformers_both_key_layouts(tmp_path, hidden_act):
    from transformers import CLIPTextModel as HFTextModel
    reference = randomize_(HFTextModel(tiny_text_config(hidden_act)))
    reference.save_pretrained(str(tmp_path / "plain"))  # its config.json; the weights as transformers 5 writes them:
    save_file({k.removeprefix("text_model."): v.contiguous() for k, v in reference.state_dict().items()},
              tmp_path / "plain" / "model.safetensors")  # no "text_model." (transformers 4 writes it)
    sd_folder = tmp_path / "sd" / "text_encoder"  # older files: "text_model." prefix, position_ids, .bin
    sd_folder.mkdir(parents=True)
    (sd_folder / "config.json").write_bytes((tmp_path / "plain" / "config.json").read_bytes())
    prefixed = {"text_model." + k.removeprefix("text_model."): v.clone() for k, v in reference.state_dict().items()}
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(prefixed, sd_folder / "pytorch_model.bin")
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        for path in (tmp_path / "plain", tmp_path / "sd"):
            model = clip.CLIPTextModel.from_pretrained(str(path))
            assert model.config.hidden_act == hidden_act and len(model.encoder.layers) == 2
            out = model(ids)
            assert out.shape == (2, 77, 64) and max_rel_diff(out, expected) < 1e-4
            assert max_rel_diff(model(ids[:, :10]), reference(ids[:, :10]).last_hidden_state) < 1e-4
    half = clip.CLIPTextModel.from_pretrained(str(tmp_path / "plain"), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())


def build_openclip(layers=3, width=128, vocab_size=1000):
    """A tiny OpenCLIP model as SD 2.x holds it: FrozenOpenCLIPEmbedder deletes the vision tower."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    model = CLIP(32, CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
                 CLIPTextCfg(vocab_size=vocab_size, width=width, heads=width // 64, layers=layers))
    del model.visual
    return randomize_(model)


def openclip_penultimate(model, ids):
    """SD 2.x conditioning as OpenCLIP computes it: all resblocks but the last, then ln_final."""
    x = model.token_embedding(ids) + model.positional_embedding
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_openclip_single_file_gives_penultimate_layer(tmp_path, suffix):
    openclip = build_openclip()
    checkpoint = {"cond_stage_model.model." + k: v.clone() for k, v in openclip.state_dict().items()}
    checkpoint["model.diffusion_model.conv_in.weight"] = torch.randn(8, 4, 3, 3)  # the rest of an SD file
    checkpoint["first_stage_model.decoder.conv_out.bias"] = torch.randn(3)
    path = tmp_path / ("v2-tiny" + suffix)
    if suffix == ".safetensors":
        save_file(checkpoint, path)
    else:
        torch.save({"state_dict": checkpoint}, path)
    model = clip.CLIPTextModel.from_pretrained(str(path))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 128, 2)
    assert (config.intermediate_size, config.vocab_size, config.hidden_act) == (512, 1000, "gelu")
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert max_rel_diff(model(ids), openclip_penultimate(openclip, ids)) < 1e-4


def test_single_file_reads_only_text_encoder_tensors(tmp_path, monkeypatch):
    checkpoint = {"cond_stage_model.model." + k: v.contiguous() for k, v in build_openclip().state_dict().items()}
    save_file({**checkpoint, "model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "sd.safetensors")
    read = []

    def recording(path, prefix=None, dtype=None):
        tensors = weights.read_state_dict(path, prefix, dtype)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(single_file, "read_state_dict", recording)
    model = clip.CLIPTextModel.from_pretrained(str(tmp_path / "sd.safetensors"), dtype=torch.bfloat16)
    assert sorted(read) == sorted(checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # converted as read, no fp32 copy kept


def test_openclip_key_mapping_agrees_with_diffusers():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    openclip = build_openclip()
    checkpoint = {"cond_stage_model.model." + k: v for k, v in openclip.state_dict().items()}
    _, ours = single_file.openclip_text_weights(openclip.state_dict(), "x")
    theirs = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(None, checkpoint).items()}
    # diffusers hard-codes SD 2.x's dropped block (resblocks.23): the last of these 3 blocks stays in
    assert set(theirs) - set(ours) == {k for k in theirs if k.startswith("encoder.layers.2.")}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sd1_single_file(tmp_path):
    from transformers import CLIPTextModel as HFTextModel
    reference = randomize_(HFTextModel(tiny_text_config("quick_gelu", hidden_size=128, num_attention_heads=2)))
    checkpoint = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v.clone()
                  for k, v in reference.state_dict().items()}
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    checkpoint["model.diffusion_model.out.2.bias"] = torch.randn(4)
    save_file(checkpoint, tmp_path / "v1-tiny.safetensors")
    model = clip.CLIPTextModel.from_pretrained(str(tmp_path / "v1-tiny.safetensors"))
    assert model.config.hidden_act == "quick_gelu" and model.config.num_attention_heads == 2
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert max_rel_diff(model(ids), reference(ids).last_hidden_state) < 1e-4


def save_hf_clip(folder, eos_token_id, vocab_size=1000):
    from transformers import CLIPConfig, CLIPModel as HFCLIPModel
    text = tiny_text_config("gelu", vocab_size=vocab_size, eos_token_id=eos_token_id).to_dict()
    vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    reference = randomize_(HFCLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)))
    reference.save_pretrained(str(folder))
    return reference


@pytest.mark.parametrize("eos_token_id", [2, 500])  # 2: legacy argmax pooling; else the first EOS
def test_clip_model_matches_transformers(tmp_path, eos_token_id):
    reference = save_hf_clip(tmp_path, eos_token_id)
    model = clip.CLIPModel.from_pretrained(str(tmp_path))
    assert model.image_size == 32
    ids = torch.randint(0, 1000, (3, 77))
    ids[:, 20], ids[:, 40] = 500, 999  # pooling rules disagree: first 500 at 20 (or earlier), max at 40
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text, image = model.encode_text(ids), model.encode_image(pixels)
        assert text.shape == (3, 24) and image.shape == (2, 24)
        assert max_rel_diff(text, projected(reference.get_text_features(input_ids=ids))) < 1e-4
        assert max_rel_diff(image, projected(reference.get_image_features(pixel_values=pixels))) < 1e-4
        other_rule = 40 if eos_token_id == 500 else 20
        assert not torch.allclose(text, model.text_projection(model.text_model(ids)[:, other_rule]))
    with pytest.raises(ValueError, match="takes 32x32 images"):
        model.encode_image(torch.randn(1, 3, 64, 64))


def test_clip_model_folder_with_tokenizer_end_to_end(bpe_files, tmp_path):
    from transformers import CLIPTokenizerFast as HFTokenizer
    reference = save_hf_clip(tmp_path / "clip", eos_token_id=2, vocab_size=49408)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "clip" / name).write_bytes((bpe_files / name).read_bytes())
    prompts = ["Good photo.", "Bad photo.", "Sharp photo.", "Blurry photo."]
    tokenizer = clip.CLIPTokenizer.from_pretrained(str(tmp_path / "clip"))
    model = clip.CLIPModel.from_pretrained(str(tmp_path / "clip"))
    hf_ids = HFTokenizer.from_pretrained(str(tmp_path / "clip"))(
        prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = projected(reference.get_text_features(input_ids=hf_ids))
        assert max_rel_diff(model.encode_text(tokenizer(prompts)), expected) < 1e-4


# ---------------------------------------------------------------------------------------------
# Bad files

def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    from transformers import CLIPTextModel as HFTextModel
    HFTextModel(tiny_text_config("gelu")).save_pretrained(str(tmp_path / "te"))
    weights = tmp_path / "te" / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError) as e:
        clip.CLIPTextModel.from_pretrained(str(tmp_path / "te"))
    one_line_error(e, str(weights), "not a readable safetensors file")

    from safetensors.torch import load_file
    weights.write_bytes(good)
    state_dict = load_file(weights)
    del state_dict[next(k for k in state_dict if k.endswith("encoder.layers.1.mlp.fc2.bias"))]  # "text_model." or not
    save_file(state_dict, weights)
    with pytest.raises(WeightsError) as e:
        clip.CLIPTextModel.from_pretrained(str(tmp_path / "te"))
    one_line_error(e, str(weights), "1 missing: encoder.layers.1.mlp.fc2.bias")

    save_file({"conv_in.weight": torch.randn(8, 4, 3, 3), "time_embedding.linear_1.weight": torch.randn(8, 8)}, weights)
    with pytest.raises(WeightsError) as e:  # a UNet file given as text encoder
        clip.CLIPTextModel.from_pretrained(str(tmp_path / "te"))
    one_line_error(e, str(weights), "do not fit CLIPTextModel", "unexpected: conv_in.weight")

    save_file({"model.diffusion_model.conv_in.weight": torch.randn(8, 4, 3, 3)}, tmp_path / "unet-only.safetensors")
    with pytest.raises(WeightsError) as e:
        clip.CLIPTextModel.from_pretrained(str(tmp_path / "unet-only.safetensors"))
    one_line_error(e, "unet-only.safetensors", "no CLIP text encoder")
    save_file({"text_model.embeddings.token_embedding.weight": torch.randn(8, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as e:  # text_encoder/model.safetensors given without its folder
        clip.CLIPTextModel.from_pretrained(str(tmp_path / "model.safetensors"))
    one_line_error(e, "model.safetensors", "transformers-layout text encoder weights; pass the folder")

    with pytest.raises(WeightsError) as e:  # a text encoder folder is not a CLIPModel folder
        clip.CLIPModel.from_pretrained(str(tmp_path / "te"))
    one_line_error(e, "config.json", "not a CLIPModel config")

    weights.unlink()
    with pytest.raises(WeightsError) as e:
        clip.CLIPTextModel.from_pretrained(str(tmp_path / "te"))
    one_line_error(e, str(tmp_path / "te"), "no model.safetensors or pytorch_model.bin")


def test_unsupported_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported CLIP hidden_act 'relu'"):
        clip.CLIPTextModel(clip.CLIPTextConfig(hidden_act="relu"))


# ---------------------------------------------------------------------------------------------
# Full size (opt-in: FLOWSR_FULLSIZE=1; about 3 GB of memory, a few minutes on 2 CPU cores)

@pytest.mark.skipif(os.environ.get("FLOWSR_FULLSIZE") != "1", reason="full-size test: set FLOWSR_FULLSIZE=1")
def test_sd21_text_encoder_full_size(tmp_path):
    from transformers import CLIPTextModel as HFTextModel
    config = tiny_text_config("gelu", vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=23, num_attention_heads=16)
    ids = torch.randint(0, 49408, (1, 77))
    reference = randomize_(HFTextModel(config))
    reference.save_pretrained(str(tmp_path / "text_encoder"))
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
    del reference
    model = clip.CLIPTextModel.from_pretrained(str(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == 340_387_840  # SD 2.1's text encoder: 340.4M
    with torch.no_grad():
        assert max_rel_diff(model(ids), expected) < 1e-4
    del model

    openclip = build_openclip(layers=24, width=1024, vocab_size=49408)
    with torch.no_grad():
        expected = openclip_penultimate(openclip, ids)
    save_file({"cond_stage_model.model." + k: v.contiguous() for k, v in openclip.state_dict().items()},
              tmp_path / "v2-1.safetensors")
    del openclip
    model = clip.CLIPTextModel.from_pretrained(str(tmp_path / "v2-1.safetensors"))
    assert sum(p.numel() for p in model.parameters()) == 340_387_840
    with torch.no_grad():
        assert max_rel_diff(model(ids), expected) < 1e-4
