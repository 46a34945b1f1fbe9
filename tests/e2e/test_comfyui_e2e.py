"""End to end in a real ComfyUI: our nodes load a tiny Flux, a LoRA is applied, KSampler samples,
SaveImage writes a PNG, and the PNGs are checked against a bf16 run.

Runs when ``COMFYUI_DIR`` points at a ComfyUI work tree (skips otherwise, as in CI):

    COMFYUI_DIR=/work/comfyui /work/comfyui/venv/bin/python -m pytest -q tests/e2e
    COMFYUI_DIR=... python tests/e2e/test_comfyui_e2e.py [--gpu]      # same, --gpu: no --cpu flag

``COMFYUI_PYTHON`` picks the interpreter for ComfyUI (default: ``$COMFYUI_DIR/venv/bin/python``
if it exists, else this one); ``COMFYUI_E2E_GPU=1`` is ``--gpu``; ``COMFYUI_E2E_ARGS`` adds
ComfyUI flags (``--novram`` offloads every weight to the CPU and streams it per layer: the
low-VRAM path). Each run makes a fresh base
directory (models, custom_nodes with this repository and the two test nodes in
``e2e_nodes/``, output, user), starts ``main.py`` headless on a free port, and queues the
API-format workflows of ``workflows/`` over HTTP with their ``$PLACEHOLDERS`` filled in.

What is checked, per format in the format table:
* our loader on a file quantized in that format, LoRA applied by ComfyUI's dequantize ->
  patch -> requantize path (the default ``lora_mode``);
* our loader quantizing the bf16 file on load, LoRA applied at runtime (``lora_mode=runtime``);
* ComfyUI's stock ``UNETLoader`` on the quantized file (our ``stock_loaders`` registration);
each succeeds, writes a finite, non-constant image, and lands closer to the bf16+LoRA image
than the LoRA moves the bf16 image (so the LoRA really applied, and quantization error is
smaller than its effect).

And the checkpoint loader (``LowBitCheckpointLoader``: MODEL, CLIP and VAE from one file) on a
tiny random SD1.5-layout checkpoint, bf16 as is, converted to the first format by our
converter, and quantized on load: its CLIP encodes the prompt, KSampler samples, its VAE
decodes; each quantized image lands closer to the bf16 one than another prompt moves that,
and the converted file and quantize-on-load give the same image. ComfyUI's stock
``CheckpointLoaderSimple`` on a converted file (UNet only: ComfyUI loads an SD1.x
checkpoint's text encoder with plain operations) is checked the same way.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
GPU = os.environ.get("COMFYUI_E2E_GPU", "0") == "1"
START_TIMEOUT_S = 240
PROMPT_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI work tree to run the e2e test")


def _python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI_DIR) / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI on a private base directory, driven over its HTTP API."""

    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        # The test drives the HTTP API only: a one-page web root spares the 80 MB frontend package.
        web = base / "web"
        web.mkdir(exist_ok=True)
        (web / "index.html").write_text("<html><body>ComfyUI-LowBit e2e</body></html>")
        args = [_python(), "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
                "--front-end-root", str(web)]
        if not GPU:
            args.append("--cpu")
        args += os.environ.get("COMFYUI_E2E_ARGS", "").split()  # e.g. --novram: offload every weight
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI not ready after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path}: {exc.code} {exc.read().decode(errors='replace')}") from None

    def run(self, workflow: str, **subs) -> Path:
        """Queue ``workflows/<workflow>.json`` with ``$KEY`` -> value; return the saved image."""
        outputs = self.run_outputs(workflow, **subs)
        images = [img for out in outputs.values() for img in out.get("images", [])]
        assert len(images) == 1, outputs
        img = images[0]
        return self.base / "output" / img.get("subfolder", "") / img["filename"]

    def run_outputs(self, workflow: str, **subs) -> dict:
        """Queue ``workflows/<workflow>.json`` with ``$KEY`` -> value; return its outputs."""
        text = (HERE / "workflows" / f"{workflow}.json").read_text()
        graph = json.loads(text)
        for node in graph.values():
            for name, value in node["inputs"].items():
                if isinstance(value, str) and value.startswith("$"):
                    node["inputs"][name] = subs[value[1:].lower()]
        prompt_id = self.post("/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})["prompt_id"]
        deadline = time.time() + PROMPT_TIMEOUT_S
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise AssertionError(f"{workflow} {subs}: {_execution_error(status)}")
                return entry["outputs"]
            time.sleep(0.2)
        raise TimeoutError(f"{workflow} {subs} did not finish in {PROMPT_TIMEOUT_S}s\n{self.log_tail()}")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _execution_error(status: dict) -> str:
    """The node, exception and last traceback lines of a failed prompt (not its inputs)."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            tb = "".join(data.get("traceback", [])).strip().splitlines()[-6:]
            return (f"{data.get('node_type')}: {data.get('exception_type')}: "
                    f"{str(data.get('exception_message', '')).strip()[:1500]}\n" + "\n".join(tb))
    return json.dumps(status.get("messages"))[-1500:]


@pytest.fixture(scope="module")
def comfy():
    base = Path(tempfile.mkdtemp(prefix="lowbit_e2e_"))
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / "ComfyUI-LowBit")
    os.symlink(HERE / "e2e_nodes", base / "custom_nodes" / "lowbit_e2e_nodes")
    models = base / "models"
    made = subprocess.run([_python(), str(HERE / "make_models.py"), COMFYUI_DIR, str(REPO), str(models)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    server = ComfyServer(base)
    server.formats = json.loads((models / "formats.json").read_text())
    yield server
    server.close()
    if os.environ.get("COMFYUI_E2E_KEEP") != "1":
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"kept {base}")


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    assert path.exists(), path
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def _distance(a, b) -> float:
    return float(((a - b) ** 2).mean() ** 0.5)


def _check_image(pixels) -> None:
    import numpy as np

    assert pixels.shape == (64, 64, 3), pixels.shape
    assert np.isfinite(pixels).all() and pixels.std() > 0.01, "image is constant or broken"


def test_nodes_are_registered(comfy):
    info = comfy.get("/object_info/LowBitModelLoader")["LowBitModelLoader"]
    assert info["display_name"] == "Load Diffusion Model (LowBit)"
    unet = info["input"]["required"]["unet_name"]  # V3 combo: ("COMBO", {"options": [...]})
    names = unet[1]["options"] if unet[0] == "COMBO" else unet[0]
    assert "tiny_flux_bf16.safetensors" in names
    for node in ("LowBitCheckpointLoader", "LowBitCLIPLoader", "LowBitConvert"):
        assert node in comfy.get(f"/object_info/{node}")


def test_clip_loader_quantizes_a_text_encoder(comfy):
    """LowBitCLIPLoader: a CLIP-L loaded as is and quantized on load; CLIPTextEncode runs on both."""
    import numpy as np

    def encode(quantize):
        text = comfy.run_outputs("clip_loader", quantize=quantize)["3"]["text"][0]
        stats = json.loads(text)
        assert stats["finite"] and stats["shape"] == [1, 77, 768], stats
        return np.array(stats["values"])

    ref = encode("none")
    report = {}
    for fmt, ui_name in comfy.formats.items():
        out = encode(ui_name)
        err = report[fmt] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        assert 0 < err < 0.5, f"{fmt}: CLIP-L output {err:.4f} from the bf16 encoder's (0: nothing quantized)"
    print("CLIP-L relative output error vs bf16:", json.dumps(report))


def test_formats_sample_with_lora(comfy):
    """Every format: quantized file + requantize LoRA, quantize-on-load + runtime LoRA, stock loader."""
    assert comfy.formats, "no formats in the table: nothing quantized was tested"
    common = dict(lora_mode="requantize", quantize="none")
    ref_plain = _pixels(comfy.run("lowbit_loader_lora", model="tiny_flux_bf16.safetensors", lora_strength=0.0,
                                  prefix="bf16_nolora", **common))
    ref_lora = _pixels(comfy.run("lowbit_loader_lora", model="tiny_flux_bf16.safetensors", lora_strength=1.0,
                                 prefix="bf16_lora", **common))
    _check_image(ref_plain)
    _check_image(ref_lora)
    lora_effect = _distance(ref_lora, ref_plain)
    assert lora_effect > 0.01, f"the LoRA changes the bf16 image by only {lora_effect:.4f}"
    report = {"device": comfy.get("/system_stats")["devices"][0]["name"], "lora_effect": lora_effect}
    failures = []

    def check(name: str, workflow: str, **subs) -> None:
        """One sampled image vs bf16+LoRA; failures are collected so every format gets its turn."""
        try:
            pixels = _pixels(comfy.run(workflow, **subs))
            _check_image(pixels)
            err = report[name] = _distance(pixels, ref_lora)
            assert err < lora_effect, f"{err:.4f} from bf16+LoRA; the LoRA itself moves the image {lora_effect:.4f}"
            print(f"ok   {name}: {err:.4f}", flush=True)
        except AssertionError as exc:
            report[name] = f"FAILED: {str(exc)[:2000]}"
            failures.append(name)
            print(f"FAIL {name}: {exc}", flush=True)

    for fmt, ui_name in comfy.formats.items():
        check(f"{fmt}/file+requantize", "lowbit_loader_lora", model=f"tiny_flux_{fmt}.safetensors", quantize="none",
              lora_mode="requantize", lora_strength=1.0, prefix=f"{fmt}_file")
        check(f"{fmt}/on_load+runtime", "lowbit_loader_lora", model="tiny_flux_bf16.safetensors", quantize=ui_name,
              lora_mode="runtime", lora_strength=1.0, prefix=f"{fmt}_onload")
        check(f"{fmt}/stock_loader", "stock_loader_lora", model=f"tiny_flux_{fmt}.safetensors", lora_strength=1.0,
              prefix=f"{fmt}_stock")
    # The converter node: bf16 file -> a new quantized file beside it, which then samples.
    fmt, ui_name = next(iter(comfy.formats.items()))
    outputs = comfy.run_outputs("convert", source="diffusion_models/tiny_flux_bf16.safetensors", quantize=ui_name)
    text = outputs["1"]["text"][0]
    new_name = text.splitlines()[0]
    assert new_name == "tiny_flux_bf16-e2e.safetensors", text
    assert (comfy.base / "models" / "diffusion_models" / new_name).exists()
    assert "quantized" in text and fmt in text, text
    check(f"{fmt}/converted+requantize", "lowbit_loader_lora", model=new_name, quantize="none",
          lora_mode="requantize", lora_strength=1.0, prefix=f"{fmt}_converted")
    # How ComfyUI placed the models (full load, or partial with offloaded MB under --lowvram/--novram).
    log = re.sub(r"\x1b\[[0-9;]*m", "", comfy.log_tail(10000))
    report["loads"] = [line.split("]", 1)[-1].strip() for line in log.splitlines()
                       if "loaded completely" in line or "loaded partially" in line]
    print(json.dumps(report, indent=1))
    if os.environ.get("COMFYUI_E2E_REPORT"):
        Path(os.environ["COMFYUI_E2E_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert not failures, f"failed: {failures}"


def test_checkpoint_loader_samples(comfy):
    """LowBitCheckpointLoader on a full SD1.5-layout checkpoint: MODEL, CLIP and VAE from one file.

    The bf16 file as is (the reference), the converter's file in the first format, and the bf16
    file quantized on load in that format: each encodes a prompt with its CLIP, samples with its
    MODEL, decodes with its VAE. A quantized run must land closer to the bf16 image than
    changing the prompt moves the bf16 image (so the text encoder's output really reaches the
    sampler, and quantization error is smaller than that); the converted file and
    quantize-on-load must agree (both quantize the UNet's and the CLIP's blocks alike).
    """
    fmt, ui_name = next(iter(comfy.formats.items()))
    prompt = "a photograph of an astronaut riding a horse"

    def sample(ckpt: str, quantize: str, text: str, prefix: str):
        pixels = _pixels(comfy.run("checkpoint_loader", ckpt=ckpt, quantize=quantize, prompt=text, prefix=prefix))
        _check_image(pixels)
        return pixels

    ref = sample("tiny_sd15_bf16.safetensors", "none", prompt, "ckpt_bf16")
    other = sample("tiny_sd15_bf16.safetensors", "none", "a watercolor of a lighthouse at night", "ckpt_bf16_other")
    prompt_effect = _distance(other, ref)
    assert prompt_effect > 0.01, f"another prompt changes the bf16 image by only {prompt_effect:.4f}"
    from_file = sample(f"tiny_sd15_{fmt}.safetensors", "none", prompt, f"ckpt_{fmt}_file")
    on_load = sample("tiny_sd15_bf16.safetensors", ui_name, prompt, f"ckpt_{fmt}_onload")
    # ComfyUI's own Load Checkpoint (our stock_loaders registration) on a file whose UNet only
    # is converted: ComfyUI builds an SD1.x checkpoint's text encoder with plain operations.
    stock = _pixels(comfy.run("stock_checkpoint_loader", ckpt=f"tiny_sd15_{fmt}_unet.safetensors", prompt=prompt,
                              prefix=f"ckpt_{fmt}_stock"))
    _check_image(stock)
    report = {"prompt_effect": prompt_effect, f"{fmt}/file": _distance(from_file, ref),
              f"{fmt}/on_load": _distance(on_load, ref), f"{fmt}/stock_loader": _distance(stock, ref),
              "file_vs_on_load": _distance(from_file, on_load)}
    print("checkpoint loader, distances between images:", json.dumps(report))
    for name in (f"{fmt}/file", f"{fmt}/on_load", f"{fmt}/stock_loader"):
        err = report[name]
        assert 0 < err < prompt_effect, f"{name}: {err:.4f} from bf16; another prompt moves it {prompt_effect:.4f}"
    # Quantize-on-load keeps what the converter keeps and quantizes the rest the same way (UNet
    # and CLIP blocks), so both images agree (to the pixel on a CPU).
    assert report["file_vs_on_load"] <= 0.25 * report[f"{fmt}/file"], report


if __name__ == "__main__":
    if "--gpu" in sys.argv:
        sys.argv.remove("--gpu")
        os.environ["COMFYUI_E2E_GPU"] = "1"
        GPU = True
    sys.exit(pytest.main([__file__, "-q", "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))
