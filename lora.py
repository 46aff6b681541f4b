"""LoRA: low-rank adapters on Linear and Conv2d layers with PEFT's names, and the FlowSR checkpoint.

LoRA (Hu et al. 2021) freezes a pretrained weight W and learns a low-rank change of it:

    y = W x + (alpha / r) * B(A(x))        A: in -> r,  B: r -> out,  r << min(in, out)

A starts random (kaiming-uniform, as in PEFT) and B at zero, so a fresh adapter changes nothing.
For a convolution A is a conv with the layer's kernel, stride, padding and dilation and B is a 1x1
conv, so B A is again a single kernel: merging folds the delta into W and inference costs nothing
extra. alpha defaults to 8, PEFT's default, which the published FlowSR weights use (SPEC section 8).

State-dict keys are PEFT's, which is how published LoRA checkpoints name them:
    <module>.base_layer.weight   <module>.lora_A.default.weight   <module>.lora_B.default.weight
A target name matches a module when it equals the module's dotted name or is a dotted suffix of it
("to_out.0" matches "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"); a single string
instead of a list is a regular expression that must match the whole name (PEFT's rule too).

A layer can hold several adapters over its one base weight (PEFT's <module>.lora_A.<adapter>.weight); one is
active at a time. Stage 2 of FlowSR keeps its frozen teacher and its EMA target as two more adapters of the
student's model (add_adapter, AdapterView): three networks, one copy of the base weights (SPEC section 3).

The published FlowSR checkpoint (SPEC section 8) is one .safetensors file holding the LoRA of the
UNet and of the VAE encoder. Its metadata key "flowsr_checkpoint_metadata" is JSON
    {"fields": {"unet_rank", "unet_lora_target_modules", "vae_rank", "vae_lora_target_modules",
                optional "lora_alpha", ...},
     "tensor_names": {"unet_state_dict": {stored_name: key}, "vae_state_dict": {stored_name: key}}}
where stored_name is the tensor's name in the file and key its state-dict key in the UNet / VAE.
Files written here store tensors as "unet.<key>" and "vae.<key>"; reading accepts any stored names.
"""
import contextlib
import copy
import json
import math
import os
import re

import torch
import torch.nn as nn

from plumbing.weights import WeightsError, json_object, read_metadata, read_state_dict, save_atomic

DEFAULT_ALPHA = 8
METADATA_KEY = "flowsr_checkpoint_metadata"
TENSOR_GROUPS = {"unet": "unet_state_dict", "vae": "vae_state_dict"}
REQUIRED_FIELDS = ("unet_rank", "unet_lora_target_modules", "vae_rank", "vae_lora_target_modules")


class LoRALayer(nn.Module):
    """base_layer(x) + (alpha / rank) * B(A(x)) around an nn.Linear or nn.Conv2d."""

    def __init__(self, base_layer, rank, alpha=DEFAULT_ALPHA, adapter="default"):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        like = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        if isinstance(base_layer, nn.Linear):
            lora_A = nn.Linear(base_layer.in_features, rank, bias=False, **like)
            lora_B = nn.Linear(rank, base_layer.out_features, bias=False, **like)
        elif isinstance(base_layer, nn.Conv2d):
            if base_layer.groups != 1:
                raise ValueError("LoRA on a grouped nn.Conv2d is not supported")
            lora_A = nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size, base_layer.stride,
                               base_layer.padding, base_layer.dilation, padding_mode=base_layer.padding_mode,
                               bias=False, **like)
            lora_B = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False, **like)
        else:
            raise ValueError(f"LoRA wraps only nn.Linear and nn.Conv2d, not {type(base_layer).__name__}")
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({adapter: lora_A})
        self.lora_B = nn.ModuleDict({adapter: lora_B})
        self.adapter = adapter
        self.scale = alpha / rank
        self.disabled = False

    def forward(self, x):  # with the adapter `self.adapter` (the active one)
        out = self.base_layer(x)
        if self.disabled:
            return out
        return out + self.scale * self.lora_B[self.adapter](self.lora_A[self.adapter](x))

    def merge(self):
        """W += (alpha / rank) * B @ A, in place and in W's own memory layout, with no full-size temporary.

        For a conv, B's 1x1 kernel mixes A's kernels. A channels-last kernel (in memory: out, kh, kw, in) is
        updated through the 2-D view that walks its memory in order, with A's kernels permuted alike."""
        weight = self.base_layer.weight  # (out, in[, kh, kw])
        a = self.lora_A[self.adapter].weight  # (r, in[, kh, kw])
        b = self.lora_B[self.adapter].weight.flatten(1)  # (out, r)
        if weight.dim() == 4 and not weight.is_contiguous():
            weight, a = weight.permute(0, 2, 3, 1), a.permute(0, 2, 3, 1)  # (out, kh, kw, in), contiguous
        rows = weight.view(weight.shape[0], -1)  # (out, in * kh * kw) in memory order
        rows.addmm_(b.to(rows.dtype), a.reshape(a.shape[0], -1).to(rows.dtype), alpha=self.scale)


def target_matches(name, target_modules):
    """PEFT's rule: a regex string must match the whole name; a list entry must equal a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_layers(model):
    """(name, LoRALayer) for every LoRA wrapper in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALayer)]


def _matching_modules(model, target_modules):
    """Names of the modules matched by ``target_modules``; a target matching nothing is an error."""
    names = [name for name, _ in model.named_modules() if name and target_matches(name, target_modules)]
    if isinstance(target_modules, str):
        unmatched = [] if names else [target_modules]
    else:
        unmatched = [t for t in target_modules if not any(target_matches(name, [t]) for name in names)]
    if unmatched:
        raise ValueError(f"target module(s) {', '.join(map(repr, unmatched))} match no module of "
                         f"{type(model).__name__}")
    return names


def inject_lora(model, target_modules, rank, alpha=DEFAULT_ALPHA, adapter="default"):
    """Wrap every nn.Linear / nn.Conv2d that ``target_modules`` matches in a LoRALayer; return their names."""
    names = _matching_modules(model, target_modules)
    wrong = [f"{name} ({type(model.get_submodule(name)).__name__})" for name in names
             if not isinstance(model.get_submodule(name), (nn.Linear, nn.Conv2d))]
    if wrong:
        raise ValueError(f"LoRA targets must be nn.Linear or nn.Conv2d, but these are not: {_listed(wrong)}")
    for name in names:
        model.set_submodule(name, LoRALayer(model.get_submodule(name), rank, alpha, adapter))
    return names


def lora_parameters(model, adapter=None):
    """The A and B weights of every LoRA wrapper, layer by layer: those of `adapter`, by default of the active
    adapter (what an optimizer trains)."""
    return [p for _, layer in lora_layers(model) for part in (layer.lora_A, layer.lora_B)
            for p in part[adapter or layer.adapter].parameters()]


def mark_only_lora_trainable(model):
    """Freeze everything but the LoRA weights."""
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def lora_state_dict(model):
    """The active adapter's LoRA weights plus every other trainable parameter, under their PEFT / diffusers keys."""
    lora_ids = {id(p) for p in lora_parameters(model)}
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad or id(p) in lora_ids}


def load_lora_state_dict(model, state_dict, source):
    """Copy a LoRA state dict (LoRA pairs, optionally base or plain weights) into an injected model, strictly."""
    expected = model.state_dict()
    unknown = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in state_dict.items()
                  if k in expected and v.shape != expected[k].shape]
    missing = [f"{name}.{part}.{layer.adapter}.weight" for name, layer in lora_layers(model)
               for part in ("lora_A", "lora_B") if f"{name}.{part}.{layer.adapter}.weight" not in state_dict]
    problems = [f"{len(items)} {label}: {_listed(items)}" for label, items in
                (("unknown", unknown), ("missing LoRA", missing), ("shape mismatch", mismatched)) if items]
    if problems:
        raise WeightsError(f"{source}: LoRA weights do not fit {type(model).__name__}: " + "; ".join(problems))
    on_meta = [k for k in state_dict if expected[k].is_meta]
    if on_meta:
        raise ValueError(f"{source}: load the base weights before the LoRA; still on meta: {_listed(on_meta)}")
    model.load_state_dict(state_dict, strict=False)
    return model


def merge_lora(model):
    """Fold W += (alpha / r) * B @ A into every wrapped layer and put the plain layer back in its place."""
    with torch.no_grad():
        for name, layer in lora_layers(model):
            layer.merge()
            model.set_submodule(name, layer.base_layer)
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Inside this block every LoRA wrapper of ``model`` computes only its base layer."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


def add_adapter(model, name, source="default"):
    """Give every LoRA layer of ``model`` a frozen copy of its adapter ``source`` named ``name``; the base weights
    stay shared. Its weights are <module>.lora_A.<name>.weight and <module>.lora_B.<name>.weight (PEFT's keys)."""
    for layer_name, layer in lora_layers(model):
        if name in layer.lora_A:
            raise ValueError(f"{layer_name} already has a LoRA adapter {name!r}")
        for part in (layer.lora_A, layer.lora_B):
            part[name] = copy.deepcopy(part[source]).requires_grad_(False)


@contextlib.contextmanager
def adapter_active(model, name):
    """Inside this block every LoRA layer of ``model`` computes with its adapter ``name``."""
    named = lora_layers(model)
    missing = [layer_name for layer_name, layer in named if name not in layer.lora_A]
    if missing:
        raise ValueError(f"no LoRA adapter {name!r} in {_listed(missing)}")
    previous = [layer.adapter for _, layer in named]
    for _, layer in named:
        layer.adapter = name
    try:
        yield model
    finally:
        for (_, layer), adapter in zip(named, previous):
            layer.adapter = adapter


class AdapterView:
    """``model`` with its LoRA adapter ``adapter`` active, called without gradients: a second network that owns only
    its LoRA tensors and shares every base weight with ``model``. Stage 2's frozen teacher and its EMA target are
    such views of the student (SPEC 3: both are stop-gradient, sg[.]); the student is the model itself.

    Switching adapters only inside no-grad calls also keeps gradient checkpointing right: its recomputation in
    backward runs with the student's adapter, the one active outside these calls.
    """

    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapter_active(self.model, self.adapter):
            return self.model(*args, **kwargs)

    def parameters(self):
        """The adapter's A and B weights, layer by layer (consistency.update_ema pairs two views by this order)."""
        return iter(lora_parameters(self.model, self.adapter))

    def buffers(self):
        return iter(())  # the buffers belong to the shared base: nothing of them is this view's own

    def state_dict(self):
        """{<module>.lora_{A,B}.<adapter>.weight: tensor}: all a checkpoint needs to rebuild this view."""
        return {f"{name}.{part}.{self.adapter}.weight": getattr(layer, part)[self.adapter].weight.detach()
                for name, layer in lora_layers(self.model) for part in ("lora_A", "lora_B")}

    def load_state_dict(self, state_dict):
        """Copy the tensors of a state_dict() of the same adapter in; any other key set or shape is refused."""
        own = self.state_dict()
        unknown, missing = sorted(state_dict.keys() - own.keys()), sorted(own.keys() - state_dict.keys())
        mismatched = [k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
        if unknown or missing or mismatched:
            raise ValueError(f"LoRA adapter {self.adapter!r} does not fit: unknown {_listed(unknown) or 'none'}; "
                             f"missing {_listed(missing) or 'none'}; shape mismatch {_listed(mismatched) or 'none'}")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state_dict[key])


def _check_fields(fields, path):
    if not isinstance(fields, dict):
        raise WeightsError(f"{path}: FlowSR metadata 'fields' is not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise WeightsError(f"{path}: FlowSR metadata lacks the field(s) {', '.join(missing)}")
    for part in TENSOR_GROUPS:
        rank, targets = fields[f"{part}_rank"], fields[f"{part}_lora_target_modules"]
        if type(rank) is not int or rank < 1:
            raise WeightsError(f"{path}: {part}_rank must be a positive integer, got {rank!r}")
        if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise WeightsError(f"{path}: {part}_lora_target_modules must be a regex or a list of names")
    alpha = fields.get("lora_alpha", DEFAULT_ALPHA)
    if type(alpha) not in (int, float) or alpha <= 0:
        raise WeightsError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")


def _check_tensor_names(tensor_names, path):
    for group in TENSOR_GROUPS.values():
        names = tensor_names.get(group) if isinstance(tensor_names, dict) else None
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise WeightsError(f"{path}: FlowSR metadata 'tensor_names' lacks a {{name: key}} object '{group}'")
        if len(set(names.values())) != len(names):
            raise WeightsError(f"{path}: FlowSR metadata '{group}' maps two tensors to the same key")


def read_flowsr_checkpoint(path):
    """(fields, unet_state_dict, vae_state_dict) of a published-format FlowSR .safetensors file."""
    path = os.fspath(path)
    raw = read_metadata(path).get(METADATA_KEY)
    if raw is None:
        raise WeightsError(f"{path}: no '{METADATA_KEY}' metadata, not a FlowSR checkpoint")
    payload = json_object(raw, path, f"'{METADATA_KEY}'")
    fields, tensor_names = payload.get("fields"), payload.get("tensor_names")
    _check_fields(fields, path)
    _check_tensor_names(tensor_names, path)
    tensors = read_state_dict(path)
    listed = {stored for group in TENSOR_GROUPS.values() for stored in tensor_names[group]}
    absent = sorted(listed - tensors.keys())
    if absent:
        raise WeightsError(f"{path}: {len(absent)} tensor(s) named in the metadata are not in the file: "
                           f"{_listed(absent)}")
    unlisted = sorted(tensors.keys() - listed)
    if unlisted:
        raise WeightsError(f"{path}: {len(unlisted)} tensor(s) not named in the metadata: {_listed(unlisted)}")
    unet_sd = {key: tensors[stored] for stored, key in tensor_names["unet_state_dict"].items()}
    vae_sd = {key: tensors[stored] for stored, key in tensor_names["vae_state_dict"].items()}
    return fields, unet_sd, vae_sd


def write_flowsr_checkpoint(path, fields, unet_sd, vae_sd, extra_metadata=None):
    """Write the published FlowSR layout, storing each tensor as "unet.<key>" or "vae.<key>".

    `extra_metadata` ({str: str}) rides along under other keys (train.py stores its config there).
    """
    _check_fields(fields, path)
    tensors, tensor_names = {}, {}
    for part, state_dict in (("unet", unet_sd), ("vae", vae_sd)):
        tensor_names[TENSOR_GROUPS[part]] = {f"{part}.{key}": key for key in state_dict}
        tensors.update({f"{part}.{key}": value for key, value in state_dict.items()})
    metadata = {**(extra_metadata or {}), METADATA_KEY: json.dumps({"fields": fields, "tensor_names": tensor_names})}
    save_atomic(tensors, path, metadata)


def _adapter_name(state_dict, source):
    """The one adapter name used by a PEFT state dict ("default" when it holds no LoRA weights)."""
    names = {m.group(1) for key in state_dict for m in [re.search(r"\.lora_[AB]\.([^.]+)\.weight$", key)] if m}
    if len(names) > 1:
        raise WeightsError(f"{source}: several LoRA adapters ({', '.join(sorted(names))}), expected one")
    return names.pop() if names else "default"


def load_flowsr_lora(path, unet, vae):
    """Load a published-layout checkpoint strictly into the LoRA already injected in ``unet`` and ``vae`` (with
    DEFAULT_ALPHA), to train on from it; another lora_alpha is refused, as its weights would act at another scale."""
    fields, unet_sd, vae_sd = read_flowsr_checkpoint(path)
    if fields.get("lora_alpha", DEFAULT_ALPHA) != DEFAULT_ALPHA:
        raise WeightsError(f"{os.fspath(path)}: lora_alpha {fields['lora_alpha']}; training goes on from alpha "
                           f"{DEFAULT_ALPHA} only")
    # Training saves the LoRA alone, so plain weights loaded here would be lost from every file it writes.
    plain = [f"{part}.{key}" for part, sd in (("unet", unet_sd), ("vae", vae_sd)) for key in sd
             if not re.search(r"\.lora_[AB]\.[^.]+\.weight$", key)]
    if plain:
        raise WeightsError(f"{os.fspath(path)}: {len(plain)} plain (non-LoRA) weight(s): {_listed(plain)}; "
                           "training goes on from LoRA-only checkpoints, as it saves the LoRA alone")
    load_lora_state_dict(unet, unet_sd, path)
    load_lora_state_dict(vae, vae_sd, path)


def apply_flowsr_checkpoint(path, unet, vae, merge=True):
    """Inject the checkpoint's LoRA into ``unet`` and ``vae``, load it strictly, then (by default) merge it.

    The models must already hold their base weights. On error they are left half-changed: rebuild them.
    """
    fields, unet_sd, vae_sd = read_flowsr_checkpoint(path)
    alpha = fields.get("lora_alpha", DEFAULT_ALPHA)
    for part, model, state_dict in (("unet", unet, unet_sd), ("vae", vae, vae_sd)):
        source = f"{os.fspath(path)} ({part})"
        adapter = _adapter_name(state_dict, source)
        try:
            inject_lora(model, fields[f"{part}_lora_target_modules"], fields[f"{part}_rank"], alpha, adapter)
        except ValueError as e:
            raise WeightsError(f"{source}: {e}") from None
        load_lora_state_dict(model, state_dict, source)
        if merge:
            merge_lora(model)
    return unet, vae


def _listed(items, max_listed=5):
    more = f" (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
    return ", ".join(items[:max_listed]) + more
