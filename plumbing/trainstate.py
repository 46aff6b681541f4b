"""Resumable training state: what train.py writes so that --resume repeats an uninterrupted run.

One file per stage (OUT_DIR/stage{1,2}_state.pt, torch.save of tensors and plain values, read back with
weights_only=True) holds the trainable weights, the optimizer, in stage 2 the EMA target and the
discriminator, the step and the open log window; the data and time draws of step n are a pure function of
(seed, stage, n, rank), so nothing else is needed. It is written atomically (weights.write_atomic) and after
the model file, so it is what commits a checkpoint. A state of another model (preset, sizes, LoRA ranks,
upsampling) is refused, naming the differences.
"""
import dataclasses
import io
import json
import os
import sys

import torch

from plumbing.weights import write_atomic


def flat(value, prefix):
    """{"unet": {"in_channels": 4}} -> {"PREFIX.unet.in_channels": 4}, so that differences can be named."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()}


def model_signature(cfg, model):
    """What must agree between a checkpoint and the run resuming it, as a flat {name: value}."""
    signature = {"preset": cfg.preset, **flat(model.config_dict(), "model")}
    if cfg.preset == "sd21":
        signature.update(lora_rank=cfg.lora_rank, vae_lora_rank=cfg.vae_lora_rank)
    return json.loads(json.dumps(signature))  # tuples become lists, as they come back from the file


def save_state(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)  # to memory first: a full disk then fails in write() with a plain OSError
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def load_state(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        json.loads(state["signature"])
        return state
    except Exception as e:  # torch.load raises many types on a damaged file
        sys.exit(f"error: {path}: not a readable training state ({str(e).strip().splitlines()[0][:200]}); "
                 "move it away to start this stage over")


def check_resumable(path, saved, current):
    """Refuse a checkpoint of another model, naming the differences."""
    saved = {k: v for key, item in saved.items() for k, v in flat(item, key).items()}  # older files nest them
    diffs = [f"{k} {saved.get(k)!r} in the checkpoint, {v!r} here" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        sys.exit(f"error: {path} does not fit this run: " + "; ".join(diffs[:3]) + more)


def trim_log(path, stage, step):
    """Keep the log lines up to (stage, step): the steps after it are about to be (re)done."""
    def keep(line):
        try:
            record = json.loads(line)
            return (record["stage"], record["step"]) <= (stage, step)
        except (ValueError, KeyError, TypeError):
            return False  # a line torn by a kill
    if os.path.exists(path):
        with open(path) as f:
            kept = "".join(filter(keep, f)).encode()
        write_atomic(path, lambda out: out.write(kept))


def resume(cfg, stage, s, state_path, signature, say):
    """Load --resume's state into the stage's parts (refusing another model's); returns (step, log window)."""
    state = load_state(state_path)
    check_resumable(state_path, json.loads(state["signature"]), signature)
    if set(state["model"]) != {n for n, p in s.model.named_parameters() if p.requires_grad}:
        sys.exit(f"error: {state_path}: its trainable weights do not match this run's model")
    old = json.loads(state["config"])
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in old and old[k] != v and k != "resume"]
    if changed:
        say("note: resuming with changed settings: " + ", ".join(changed))
    s.model.load_state_dict(state["model"], strict=False)  # the frozen rest is rebuilt identically
    s.optimizer.load_state_dict(state["optimizer"])
    for name in ("target", "discriminator", "d_optimizer"):
        if name in state and getattr(s, name) is not None:  # a discriminator's optimizer only while --gan-weight > 0
            getattr(s, name).load_state_dict(state[name])
    say(f"resumed stage {stage} at step {state['step']} from {state_path}")
    return state["step"], state.get("window")
