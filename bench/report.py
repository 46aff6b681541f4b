"""What the benchmarks share: the machine they ran on, the JSON + markdown result pair, one-line errors."""
import datetime
import json
import os
import platform
import sys

import torch

from plumbing.weights import WeightsError, first_line, write_atomic

# torch's CPU probes are private: one that a torch lacks reads as False
CPU_FLAGS = tuple((flag, getattr(torch.cpu, probe, bool)) for flag, probe in (
    ("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"),
    ("avx512", "_is_avx512_supported"), ("avx2", "_is_avx2_supported")))


def machine():
    """CPU model and the flags that decide bf16 speed, cores, torch threads and version, GPU, date."""
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_flags": [name for name, supported in CPU_FLAGS if supported()],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(stem, report, markdown):
    """STEM.json (the report) and STEM.md (its markdown text), each written atomically."""
    write_atomic(stem + ".json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    write_atomic(stem + ".md", lambda f: f.write(markdown.encode()))


def publish(stem, report, markdown):
    """write_results into STEM's folder (made if missing), then the markdown and where it went, on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    write_results(stem, report, markdown)
    print(markdown)
    print(f"wrote {stem}.json and {stem}.md")


def check_work_dir(work_dir, settings, name="settings.json"):
    """A work dir holds runs of one set of settings: reuse them only for the same ones (else exit, one line)."""
    path = os.path.join(work_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != settings:
            changed = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v)
            sys.exit(f"error: {work_dir} holds runs made with other settings ({changed}); give another --work-dir "
                     "or delete it")
    write_atomic(path, lambda f: f.write(json.dumps(settings).encode()))


def run_main(main):
    """A benchmark's main(): a missing or bad checkpoint, photo or value exits with one line, not a traceback."""
    try:
        return main()
    except (WeightsError, ValueError, OSError) as e:
        sys.exit(f"error: {first_line(e, limit=None)}")
