"""Reading and writing weight files, strictly.

Every model in this project (unet.py, vae.py, clip.py, single_file.py, lora.py, train.py checkpoints)
loads through these few functions, so that one rule holds everywhere (SPEC section 8):

- a file that cannot be read (missing, truncated, corrupt, wrong format) gives one line of error
  naming the file, never a traceback from deep inside torch or safetensors;
- pickle files (.ckpt/.bin/.pt/.pth) are opened with ``torch.load(weights_only=True)`` only;
- a state dict must match the model exactly: any missing or unexpected key, or a shape mismatch,
  is an error that names the file and the first offending keys;
- models are built on the meta device and take the loaded tensors by assignment, so loading
  never holds two full copies of the weights; a .safetensors file can be read in part (by name prefix);
- writes are atomic (temporary file, fsync, rename): a crash never leaves a half-written file.
"""
import hashlib
import json
import os
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class WeightsError(ValueError):
    """A weight file that is unreadable or does not fit the model; the message is one line."""


def read_state_dict(path, prefix=None, dtype=None, channels_last=False):
    """Read the tensors of a .safetensors or pickle weight file into a dict (one copy).

    With `dtype`, each floating-point tensor is converted as it is read, so an fp32 file loads into bf16
    holding only the bf16 copy (plus one fp32 tensor at a time), never both whole state dicts. A .safetensors
    file is then read with plain reads rather than memory-mapped: the mapped fp32 pages would stay resident
    (and count in the process's memory) until the file closes, beside the converted copies.
    With `channels_last`, 4-D tensors (convolution kernels) are laid out channels-last as they are read: a
    convolution given channels-last activations and a contiguous kernel re-lays the kernel out on every call.

    With `prefix`, only the tensors whose names start with it (names unchanged). A .safetensors file then
    reads just those bytes: an original SD file holds UNet, VAE and text encoder in one 5 GB file
    (single_file.py). A pickle cannot be read in part: it is opened whole (memory-mapped) and filtered.
    """
    path = os.fspath(path)
    prefix = prefix or ""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"{path}: empty file")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:  # the header lists the names; tensors load on demand
                keys = [k for k in f.keys() if k.startswith(prefix)]  # safe_open has checked the header
                if not any(_converts(f.get_slice(k), dtype, channels_last) for k in keys):
                    return {k: f.get_tensor(k) for k in keys}  # memory-mapped, no copy
            return _read_safetensors_as(path, keys, dtype, channels_last)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if path.endswith(PICKLE_SUFFIXES):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError...)
            raise WeightsError(f"{path}: not a readable weights-only torch file ({first_line(e)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: does not hold a flat dict of tensors")
        return {k: _as(v, dtype, channels_last) for k, v in obj.items() if k.startswith(prefix)}
    raise WeightsError(f"{path}: unknown weight file type (expected .safetensors, .ckpt, .bin, .pt or .pth)")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors_as(path, keys, dtype, channels_last):
    """The tensors `keys` of a .safetensors file (8-byte header size, JSON header, data), each converted (see
    read_state_dict) before the next is read. A tensor that converts is read into one reused scratch buffer,
    so the memory of its stored form is allocated once, not once per tensor."""
    with open(path, "rb") as f:
        header_size, header = _read_header(f)
        tensors, scratch = {}, bytearray()
        for key in keys:
            entry = header[key]
            start, end = entry["data_offsets"]
            file_dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if file_dtype is None:
                raise ValueError(f"{key}: dtype {entry['dtype']} is not one these models use")
            if len(scratch) < end - start:
                scratch = bytearray(end - start)
            data = memoryview(scratch)[:end - start]
            f.seek(8 + header_size + start)
            if f.readinto(data) != len(data):
                raise ValueError(f"{key}: file ends inside the tensor")
            stored = torch.frombuffer(data, dtype=file_dtype) if data else torch.empty(0, dtype=file_dtype)
            tensor = _as(stored.view(entry["shape"]), dtype, channels_last)
            # a tensor that did not change still lies in the scratch buffer, which the next read overwrites
            tensors[key] = tensor.clone() if tensor.data_ptr() == stored.data_ptr() and data else tensor
        return tensors


def _converts(stored, dtype, channels_last):
    """Whether `stored` (a safetensors slice) changes when read with these options."""
    stored_dtype = SAFETENSORS_DTYPES.get(stored.get_dtype())
    new_dtype = dtype is not None and stored_dtype is not None and stored_dtype.is_floating_point and stored_dtype != dtype
    return new_dtype or (channels_last and len(stored.get_shape()) == 4)


def _as(tensor, dtype, channels_last=False):
    """`tensor` in `dtype` (floating point only) and, if 4-D and asked, channels-last: one copy, or none."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if channels_last and tensor.dim() == 4:
        return tensor.to(dtype=dtype, memory_format=torch.channels_last)
    return tensor.to(dtype)


def find_weights_file(folder, names):
    """The first of the file `names` present in `folder` (a diffusers or transformers model folder)."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise WeightsError(f"{folder}: no {' or '.join(names)}")


def _read_header(f):
    """(its size, the JSON header) of the .safetensors file open in `f`, left at the start of the data."""
    header_size = int.from_bytes(f.read(8), "little")
    return header_size, json.loads(f.read(header_size))


def tensors_digest(path):
    """A digest of a .safetensors file's tensors (names, dtypes, shapes, bytes) but not of its metadata: the
    same weights written again with other metadata have the same digest."""
    with open(path, "rb") as f:
        header = _read_header(f)[1]
        header.pop("__metadata__", None)
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_metadata(path):
    """The string-to-string metadata of a .safetensors file ({} when it has none)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def read_json(path):
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:  # JSON is UTF-8 (RFC 8259), whatever the system's locale
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON file ({first_line(e)})") from None


def check_state_dict(module, state_dict, source, max_listed=5):
    """Raise WeightsError unless ``state_dict`` has exactly the keys and shapes of ``module``."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    model_floats = {k for k, v in module.state_dict().items() if v.is_floating_point()}
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    wrong_dtype = [f"{k} is {state_dict[k].dtype}, not a float tensor"
                   for k in model_floats if k in state_dict and not state_dict[k].is_floating_point()]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                          ("wrong dtype", wrong_dtype)):
        if items:
            more = f" (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:max_listed])}{more}")
    if problems:
        raise WeightsError(f"{source}: weights do not fit {type(module).__name__}: " + "; ".join(problems))


def load_strict(module, state_dict, source):
    """Check, then load by assignment (the module may live on the meta device)."""
    check_state_dict(module, state_dict, source)
    float_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point() and not p.is_meta), None)
    if float_dtype is not None:
        state_dict = {k: v.to(float_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def save_atomic(tensors, path, metadata=None):
    """Write a .safetensors file atomically (see write_atomic)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))


def write_atomic(path, write):
    """Call write(binary file) on a temporary file in the same folder, fsync, rename over `path`.

    A crash or a full disk never leaves half a file: the old file stays until the new one is complete.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:  # not mkstemp, whose files are private (0600) whatever the umask
            write(f)
            f.flush()
            os.fsync(f.fileno())  # through the handle that wrote it: Windows cannot flush a read-only one
        rename_durably(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # name the file asked for, not the temporary one
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
        raise


def rename_durably(tmp, path):
    """Put the written and fsynced `tmp` in place of `path`, and fsync the folder so that the rename survives."""
    os.replace(tmp, path)
    try:
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # Windows cannot open a folder as a file (nor fsync one); the file is in place
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def first_line(error, limit=200):
    """The first line of an exception's message (cut after `limit` characters, marked by '...'; None: all), for
    one-line errors."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    return text[0] if limit is None or len(text[0]) <= limit else text[0][:limit] + "..."


def json_object(text, path, what):
    """A JSON object from metadata text; anything else is a WeightsError naming the file and `what` it was."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise WeightsError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: {what} is not a JSON object")
    return value
