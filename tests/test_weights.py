"""weights.py: reading part of a file by prefix, one-line errors naming the file, strict loading."""
import os
import random

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from plumbing import weights
from plumbing.weights import WeightsError

# A miniature original SD file: three networks told apart by prefix (SPEC section 8).
TENSORS = {"model.diffusion_model.conv_in.weight": torch.randn(4, 2),
           "model.diffusion_model.out.2.bias": torch.randn(3),
           "first_stage_model.encoder.conv_in.weight": torch.randn(5),
           "cond_stage_model.model.ln_final.bias": torch.randn(2)}
UNET = {k for k in TENSORS if k.startswith("model.diffusion_model.")}


@pytest.fixture(params=["safetensors", "zip pickle", "wrapped pickle"])
def sd_file(request, tmp_path):
    if request.param == "safetensors":
        save_file(TENSORS, tmp_path / "sd.safetensors")
        return tmp_path / "sd.safetensors"
    path = tmp_path / "sd.ckpt"
    torch.save(TENSORS if request.param == "zip pickle" else {"state_dict": TENSORS, "global_step": 7}, path)
    return path


def test_prefix_gives_exactly_the_prefixed_tensors(sd_file):
    part = weights.read_state_dict(sd_file, prefix="model.diffusion_model.")
    assert set(part) == UNET  # names kept whole
    assert all(torch.equal(part[k], TENSORS[k]) for k in part)
    whole = weights.read_state_dict(sd_file)
    assert set(whole) == set(TENSORS) and weights.read_state_dict(sd_file, prefix=None).keys() == whole.keys()
    assert weights.read_state_dict(sd_file, prefix="no_such_network.") == {}


def test_prefix_reads_no_other_tensor_of_a_safetensors_file(tmp_path, monkeypatch):
    """The point of the prefix: loading the UNet of a 5 GB SD file must not load its VAE and text encoder."""
    save_file(TENSORS, tmp_path / "sd.safetensors")
    loaded, real_safe_open = [], weights.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.open = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):  # keys(), metadata(), ...: untouched
            return getattr(self.open, name)

        def get_tensor(self, name):
            loaded.append(name)
            return self.open.get_tensor(name)

    monkeypatch.setattr(weights, "safe_open", Recording)
    assert set(weights.read_state_dict(tmp_path / "sd.safetensors", prefix="model.diffusion_model.")) == UNET
    assert sorted(loaded) == sorted(UNET)


def test_dtype_converts_each_tensor_as_it_is_read(tmp_path):
    """An fp32 file read into bf16 peaks near the bf16 copy, not at fp32 + bf16 (mapped file pages count too)."""
    import subprocess
    import sys
    tensors = {f"w{i}": torch.randn(1024, 1024) for i in range(32)}  # 128 MiB of fp32
    save_file({**tensors, "steps": torch.arange(3)}, tmp_path / "big.safetensors")
    probe = ("import torch; from plumbing import weights; "
             "kib = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)); "
             "open('/proc/self/clear_refs', 'w').write('5'); before = kib('VmRSS'); "  # 5: reset the peak (VmHWM)
             f"d = weights.read_state_dict({str(tmp_path / 'big.safetensors')!r}, dtype=torch.bfloat16); "
             "assert d['steps'].dtype == torch.int64 and d['w0'].dtype == torch.bfloat16; "
             "print((kib('VmHWM') - before) / 1024)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grew = float(subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True,
                                check=True).stdout)
    assert grew < 128, f"peak grew by {grew:.0f} MiB: the bf16 copy is 64 MiB, fp32 + bf16 would be 192"
    read = weights.read_state_dict(tmp_path / "big.safetensors", dtype=torch.bfloat16)
    assert all(torch.equal(read[k], v.bfloat16()) for k, v in tensors.items())


def test_a_dtype_no_model_uses_is_a_one_line_error(tmp_path):
    """An fp8 tensor next to fp32 ones: read as stored it loads; converted on reading it is refused by name."""
    path = tmp_path / "fp8.safetensors"
    save_file({"w": torch.randn(4, 4), "scale": torch.ones(4).to(torch.float8_e4m3fn)}, path)
    assert weights.read_state_dict(path)["scale"].dtype == torch.float8_e4m3fn
    with pytest.raises(WeightsError, match=r"fp8\.safetensors: not a readable safetensors file \(scale: dtype F8_E4M3 "):
        weights.read_state_dict(path, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["zip pickle", "wrapped pickle"])
def test_dtype_converts_pickles_too(tmp_path, kind):
    path = tmp_path / "sd.ckpt"
    torch.save(TENSORS if kind == "zip pickle" else {"state_dict": TENSORS}, path)
    read = weights.read_state_dict(path, "model.diffusion_model.", torch.float16)
    assert set(read) == UNET and all(read[k].dtype == torch.float16 for k in read)


@pytest.mark.parametrize("name", ["k.safetensors", "k.ckpt"])
def test_channels_last_lays_out_kernels_only(tmp_path, name):
    tensors = {"conv.weight": torch.randn(8, 4, 3, 3), "conv.bias": torch.randn(8), "proj.weight": torch.randn(4, 4)}
    save_file(tensors, tmp_path / name) if name.endswith(".safetensors") else torch.save(tensors, tmp_path / name)
    read = weights.read_state_dict(tmp_path / name, channels_last=True)
    assert read["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not read["conv.weight"].is_contiguous()
    assert all(torch.equal(read[k], v) and read[k].dtype == v.dtype for k, v in tensors.items())


def assert_one_line_error(fn, path, words):
    with pytest.raises(WeightsError) as info:
        fn()
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message


@pytest.mark.parametrize("prefix", [None, "model.diffusion_model."])
def test_unreadable_files_give_one_line_errors_naming_the_file(tmp_path, prefix):
    save_file(TENSORS, tmp_path / "good.safetensors")
    blob = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(blob[:len(blob) - 8])  # the header still parses
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save(TENSORS, tmp_path / "good.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "good.ckpt").read_bytes()[:300])
    torch.save({"learning_rate": 0.1, "weights": TENSORS}, tmp_path / "nested.pt")
    (tmp_path / "model.onnx").write_bytes(blob)
    cases = [("absent.safetensors", "no such file"), ("empty.safetensors", "empty file"),
             ("truncated.safetensors", "not a readable safetensors file"),
             ("random.safetensors", "not a readable safetensors file"),
             ("truncated.ckpt", "not a readable weights-only torch file"),
             ("random.pth", "not a readable weights-only torch file"),
             ("nested.pt", "does not hold a flat dict of tensors"), ("model.onnx", "unknown weight file type")]
    for name, words in cases:
        path = tmp_path / name
        if name.startswith("random"):
            path.write_bytes(random.Random(0).randbytes(4096))
        assert_one_line_error(lambda: weights.read_state_dict(path, prefix=prefix), path, words)


def test_metadata_json_and_folder_errors_name_the_file(tmp_path):
    save_file(TENSORS, tmp_path / "plain.safetensors", metadata={"flowsr": "1"})
    assert weights.read_metadata(tmp_path / "plain.safetensors") == {"flowsr": "1"}
    (tmp_path / "random.safetensors").write_bytes(random.Random(0).randbytes(4096))
    assert_one_line_error(lambda: weights.read_metadata(tmp_path / "random.safetensors"),
                          tmp_path / "random.safetensors", "not a readable safetensors file")
    assert_one_line_error(lambda: weights.read_metadata(tmp_path / "absent.safetensors"),
                          tmp_path / "absent.safetensors", "no such file")
    (tmp_path / "config.json").write_text('{"in_channels": 4,')
    assert_one_line_error(lambda: weights.read_json(tmp_path / "config.json"), tmp_path / "config.json",
                          "not a readable JSON file")
    names = ("model.safetensors", "pytorch_model.bin")
    assert_one_line_error(lambda: weights.find_weights_file(tmp_path, names), tmp_path,
                          "no model.safetensors or pytorch_model.bin")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert weights.find_weights_file(tmp_path, names) == os.path.join(tmp_path, "pytorch_model.bin")


def small_model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))  # keys 0.weight 0.bias 2.weight 2.bias


def test_load_strict_lists_missing_unexpected_and_mismatched_keys():
    good = small_model().state_dict()
    bad = {k: v for k, v in good.items() if k != "0.bias"}
    bad.update({"2.weight": torch.zeros(2, 5), "1.weight": torch.zeros(1), "head.weight": torch.zeros(1)})
    with pytest.raises(WeightsError) as info:
        weights.load_strict(small_model(), bad, "ckpt.safetensors")
    message = str(info.value)
    assert message.startswith("ckpt.safetensors: weights do not fit Sequential: ") and "\n" not in message
    assert "1 missing: 0.bias" in message
    assert "2 unexpected: 1.weight, head.weight" in message
    assert "1 shape mismatch: 2.weight (2, 5) vs model (2, 4)" in message

    many = nn.Sequential(*[nn.Linear(1, 1) for _ in range(4)])  # 8 tensors, none given
    with pytest.raises(WeightsError, match=r"8 missing: 0\.weight, 0\.bias, 1\.weight, 1\.bias, 2\.weight \(\+3 more"):
        weights.load_strict(many, {}, "empty.pt")


def test_load_strict_assigns_onto_the_meta_device():
    good = small_model().state_dict()
    with torch.device("meta"):
        model = small_model()
    weights.load_strict(model, good, "good.safetensors")
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())


def test_atomic_write_as_on_windows(tmp_path, monkeypatch):
    """Windows cannot open (or fsync) a folder, and fsyncs only a handle open for writing (FlushFileBuffers needs
    GENERIC_WRITE): the write still succeeds, with the file in place."""
    fcntl = pytest.importorskip("fcntl")  # reads a descriptor's access mode (POSIX)
    real_open, real_fsync = os.open, os.fsync

    def no_folders(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    def fsync_writable_only(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")
        return real_fsync(fd)
    monkeypatch.setattr(os, "open", no_folders)
    monkeypatch.setattr(os, "fsync", fsync_writable_only)
    weights.write_atomic(tmp_path / "a.txt", lambda f: f.write(b"written"))
    assert (tmp_path / "a.txt").read_bytes() == b"written" and os.listdir(tmp_path) == ["a.txt"]


def test_json_and_logs_are_read_as_utf8_whatever_the_locale(tmp_path):
    """vocab.json holds non-ASCII tokens; Windows' default text encoding is the locale's (cp1252), not UTF-8.
    Run with Python's warning for any open() that leaves the encoding to the locale (PEP 597) as an error, from
    after the imports on (some torch releases leave it to the locale themselves while importing)."""
    import json
    import subprocess
    import sys
    (tmp_path / "vocab.json").write_bytes(json.dumps({"Ġthe": 1, "é</w>": 2}, ensure_ascii=False).encode("utf-8"))
    (tmp_path / "log.jsonl").write_text('{"stage": 1, "step": 1}\n', encoding="utf-8")
    code = ("import warnings, torch; from plumbing.weights import read_json; "
            "from plumbing.trainstate import trim_log; from plumbing.training import LogWindow; "
            "warnings.simplefilter('error', EncodingWarning); "
            f"assert read_json({str(tmp_path / 'vocab.json')!r}) == {{'Ġthe': 1, 'é</w>': 2}}; "
            f"trim_log({str(tmp_path / 'log.jsonl')!r}, 1, 1); "
            "window = LogWindow({'sums': {'loss': 0.5}, 'count': 1, 'by_t': torch.ones(2, 4)}); "
            f"window.log(1, 2, 2, 1.0, print, {str(tmp_path / 'log.jsonl')!r})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-c", code],
                            cwd=root, capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "log.jsonl").read_bytes().count(b"\n") == 2 and b"\r" not in (tmp_path / "log.jsonl").read_bytes()


def test_first_line_marks_what_it_cuts():
    """A long library message inside one of ours ("{path}: {message}; move it away") is cut visibly."""
    assert weights.first_line(ValueError("x" * 300)) == "x" * 200 + "..."
    assert weights.first_line(ValueError("short\nsecond line")) == "short"
    assert weights.first_line(ValueError("y" * 300), limit=None) == "y" * 300
    assert weights.first_line(KeyError()) == "KeyError"
