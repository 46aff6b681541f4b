"""Command-line configs: one dataclass per script, every field a --flag.

Each script (train.py, sample.py, evaluate.py) declares its settings as a dataclass whose fields are made with
`flag(default, help)`. `parse(Config, argv)` turns that into an argparse parser (`--max-steps` for
`max_steps`; booleans get `--x/--no-x`), rejects unknown flags, and returns the filled dataclass;
`describe(config)` prints it at start and `asdict(config)` is what checkpoints store; `device_problem` checks
a --device value. `parse` also makes a strict console escape what it cannot show (a file name outside Windows'
code page), so that printing one does not end a run.
"""
import argparse
import dataclasses
import os
import sys

import torch


def flag(default, help, choices=None, positional=False, short=None, low=None, high=None, path=False):
    """A dataclass field carrying its command-line help (and optional choices, a short alias like "-o", the
    range [low, high] its value must lie in, or path=True: a file or folder that must be there when given)."""
    meta = {"help": help, "choices": choices, "positional": positional, "short": short, "range": (low, high),
            "path": path}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line (the usage is what -h is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(config_cls, description=None):
    parser = OneLineParser(description=description or config_cls.__doc__, allow_abbrev=False)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"help": with_default(meta.get("help", ""), default), "default": default}
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="*", **kwargs)
            continue
        names = ["--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
        if f.type in (bool, "bool"):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list):
            parser.add_argument(*names, nargs="*", type=str, **kwargs)
        else:
            arg_type = type(default) if default is not None else str
            parser.add_argument(*names, type=arg_type, choices=meta.get("choices"), **kwargs)
    return parser


def with_default(help, default):
    """The help text with the default appended, unless the text already explains it or there is none."""
    if "(default" in help or default in ("", None, []):
        return help
    shown = " ".join(default) if isinstance(default, list) else default
    return f"{help} (default: {shown})".replace("%", "%%")


def parse(config_cls, argv=None, description=None):
    """Parse argv (None = sys.argv[1:]) into config_cls; unknown flags exit with an error."""
    for stream in (sys.stdout, sys.stderr):  # a console that cannot show a file name's characters (Windows' code
        if getattr(stream, "errors", None) == "strict":  # page, output redirected) escapes them, not stops the run
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser(config_cls, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    dashes = argv.index("--") if "--" in argv else len(argv)  # what follows "--" is inputs, even "-x.png"
    argv, after_dashes = argv[:dashes], argv[dashes + 1:]
    args = parser.parse_intermixed_args(argv)  # flags may follow inputs (this parser refuses "--" itself)
    if after_dashes:
        positional = [f.name for f in dataclasses.fields(config_cls) if f.metadata.get("positional")]
        if not positional:
            parser.error(f"unrecognized arguments: {' '.join(after_dashes)}")
        setattr(args, positional[0], [*getattr(args, positional[0]), *after_dashes])
    for f in dataclasses.fields(config_cls):
        low, high = f.metadata.get("range", (None, None))
        value = getattr(args, f.name)
        if (low is not None and value < low) or (high is not None and value > high):
            parser.error(f"--{f.name.replace('_', '-')} {value}: must be {range_text(low, high)}")
        if f.metadata.get("path") and value and not os.path.exists(value):  # before hours of work, not after
            parser.error(f"--{f.name.replace('_', '-')} {value}: no such file or folder")
    return config_cls(**vars(args))


def range_text(low, high):
    if high is None:
        return f">= {low}"
    return f"<= {high}" if low is None else f"in [{low}, {high}]"


def device_problem(name):
    """Why --device `name` cannot run here (not a device, or not on this machine), or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name}: not a device (cpu, cuda, cuda:N or mps)"
    if device.type == "cuda" and not torch.cuda.is_available() or \
            device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: not available on this machine"
    return None


def describe(config):
    """One line per field, for the log at start."""
    width = max(len(f.name) for f in dataclasses.fields(config))
    return "\n".join(f"  {f.name:<{width}} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config))
