"""Streaming: converting a ~1 GB checkpoint must not hold the model in memory.

The conversion runs in a fresh interpreter that reports its resident set after imports
(the baseline) and its peak (``VmHWM``) after converting; the difference must stay under
400 MB while the input is 1 GiB (32 bf16 weights of 4096 x 4096, 32 MiB each).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_lowbit.convert.writer import SafetensorsWriter
from comfy_lowbit.layouts import FORMATS

LIMIT_MB = 400
TESTS = Path(__file__).parent

CHILD = r"""
import json, os, sys
sys.path.insert(0, {tests!r})

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB

import torch
import comfy_lowbit
from comfy_lowbit.layouts import FORMATS
from comfy_lowbit.convert.converter import ConvertOptions, convert_checkpoint
import convert_support
fmt = {fmt!r}
FORMATS.setdefault(convert_support.ToyBlockInt8Layout.FORMAT, convert_support.ToyBlockInt8Layout)
torch.set_num_threads(2)
baseline = status("VmRSS")
summary = convert_checkpoint({src!r}, {dst!r}, ConvertOptions(format=fmt, device="cpu"), show_progress=False)
print(json.dumps({{"baseline_mb": baseline, "peak_mb": status("VmHWM"), "quantized": len(summary.quantized),
                  "seconds": summary.seconds}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read the peak resident set")
def test_peak_memory_of_a_1gb_conversion(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(4096, 4096, generator=gen) / 64).to(torch.bfloat16)
    src, dst = tmp_path / "big.safetensors", tmp_path / "big-q.safetensors"
    with SafetensorsWriter(src) as writer:
        for i in range(32):
            writer.add(f"blocks.{i}.mlp.fc1.weight", weight)
            writer.add(f"blocks.{i}.mlp.fc1.bias", weight[0])
        writer.commit()
    del weight
    assert src.stat().st_size > 2**30

    fmt = "bnb_nf4" if "bnb_nf4" in FORMATS else "toy_block_int8"
    code = CHILD.format(tests=str(TESTS), fmt=fmt, src=str(src), dst=str(dst))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["quantized"] == 32
    grown = stats["peak_mb"] - stats["baseline_mb"]
    print(f"{fmt}: baseline {stats['baseline_mb']:.0f} MB, peak {stats['peak_mb']:.0f} MB, grew {grown:.0f} MB, "
          f"{stats['seconds']:.1f} s")
    assert grown < LIMIT_MB, f"converting 1 GiB grew the resident set by {grown:.0f} MB (limit {LIMIT_MB})"
    assert dst.stat().st_size < src.stat().st_size


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_ctrl_c_in_a_real_process_leaves_nothing(tmp_path):
    """SIGINT to a running `comfy-lowbit convert`: exit status 130, the tensor named, no files left."""
    import signal
    import time

    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(2048, 2048, generator=gen) / 45).to(torch.bfloat16)
    src = tmp_path / "in.safetensors"
    with SafetensorsWriter(src) as writer:
        for i in range(48):
            writer.add(f"blocks.{i}.attn.qkv.weight", weight)
        writer.commit()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "comfy_lowbit.cli", "convert", str(src), "-o",
                             str(tmp_path / "out.safetensors"), "--format", "int8_lodewise", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stderr.readline()  # tqdm's first update means tensors are being written
        if "converting" in line and "/48 tensors" in line:
            break
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted while converting tensor 'blocks." in err
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
