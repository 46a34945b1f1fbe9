"""From a file to a ComfyUI MODEL / CLIP / VAE, through ComfyUI's own loaders and our operations.

1. Read the file into a state dict in which every quantized linear weight we recognise is one
   QuantizedTensor under ``<layer>.weight`` (the converter's reader does this for our format
   and foreign ones: bitsandbytes/diffusers/Forge 4-bit, convert_to_quant). A QuantizedTensor
   reports its real (unpacked) shape, so ComfyUI's model detection, which reads shapes, sees
   the model it would see in a bf16 file.
2. Hand that to ``comfy.sd.load_diffusion_model_state_dict`` (or the checkpoint / text
   encoder equivalents) with ``custom_operations`` = our ops: ComfyUI detects the model,
   builds it with our ``Linear``, and loads, quantizing float linears on the way when asked.
3. Optionally switch the returned patcher to runtime LoRA (``runtime_lora``).
"""
from __future__ import annotations

import torch

from ..convert.families import KeepRules
from ..convert.readers import normalise_state_dict, read_checkpoint
from .ops import lowbit_operations

LORA_MODES = ("requantize", "runtime")
DEFAULT_LORA_MODE = "requantize"


def _file_metadata(path: str) -> dict | None:
    if not path.lower().endswith((".safetensors", ".sft")):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def read_state_dict(path: str) -> tuple[dict, dict | None]:
    """``path`` -> (state dict with our QuantizedTensors, safetensors metadata).

    safetensors files stream through the converter's reader; other files (.ckpt, .pt) go
    through ComfyUI's ``load_torch_file`` (weights-only unpickling) and the same normalisation.
    """
    if path.lower().endswith((".safetensors", ".sft")):
        return read_checkpoint(path, "cpu"), _file_metadata(path)
    import comfy.utils

    return normalise_state_dict(comfy.utils.load_torch_file(path, safe_load=True)), None


def _quantize_device() -> torch.device | None:
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    return device if device.type == "cuda" else None


def converter_keep_rule(sd: dict):
    """Quantize-on-load keeps in float what the converter would keep (its family rules).

    The rules judge the file's keys; ComfyUI then renames them before our ``Linear`` sees a
    layer name: it strips prefixes (``model.diffusion_model.double_blocks.0...`` ->
    ``diffusion_model.double_blocks.0...``) and replaces some (an SD1.5 checkpoint's
    ``cond_stage_model.transformer.text_model...`` -> ``clip_l.transformer.text_model...``).
    What survives both is the name inside the component (relative to the prefix its family
    was detected at, where the rules' globs apply too), so a layer is quantized when it ends
    with the component-relative name of a file layer the rules quantize (or is itself a tail
    of such a file layer's name).
    """
    rules = KeepRules(list(sd))
    tails, relative = set(), set()
    for key, tensor in sd.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if rules.keep_reason(key, tuple(tensor.shape), tensor.is_floating_point()) is None:
            layer = key[: -len(".weight")]
            parts = layer.split(".")
            tails.update(".".join(parts[i:]) for i in range(len(parts)))
            component = rules.component(key)
            relative.add(layer[len(component.prefix):] if component is not None else layer)

    def keep(layer: str) -> bool:
        if layer in tails:
            return False
        parts = layer.split(".")
        return not any(".".join(parts[i:]) in relative for i in range(len(parts)))

    return keep


def operations(quantize_on_load: str, sd: dict | None = None):
    quantize = None if quantize_on_load in (None, "none") else quantize_on_load
    return lowbit_operations(
        quantize=quantize,
        quantize_device=_quantize_device(),
        keep_float=converter_keep_rule(sd) if quantize and sd is not None else None,
    )


def _apply_lora_mode(patcher, lora_mode: str):
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
    if lora_mode == "runtime" and patcher is not None:
        from . import runtime_lora

        runtime_lora.enable(patcher)
    return patcher


def load_diffusion_model(path: str, quantize_on_load: str = "none", lora_mode: str = DEFAULT_LORA_MODE,
                         disable_dynamic: bool = False):
    """A diffusion model file -> ModelPatcher (ComfyUI's MODEL)."""
    import comfy.sd

    sd, metadata = read_state_dict(path)
    patcher = comfy.sd.load_diffusion_model_state_dict(
        sd, model_options={"custom_operations": operations(quantize_on_load, sd)}, metadata=metadata,
        disable_dynamic=disable_dynamic,
    )
    if patcher is None:
        raise RuntimeError(f"{path}: ComfyUI could not detect the model type from its tensor names and shapes")
    # ComfyUI rebuilds a non-dynamic copy from this when a node asks for one.
    patcher.cached_patcher_init = (load_diffusion_model, (path, quantize_on_load, lora_mode))
    return _apply_lora_mode(patcher, lora_mode)


def load_checkpoint(path: str, embedding_directory=None, quantize_on_load: str = "none",
                    lora_mode: str = DEFAULT_LORA_MODE):
    """A full checkpoint -> (MODEL, CLIP, VAE); our operations build both the model and the text encoder."""
    import comfy.sd

    sd, metadata = read_state_dict(path)
    ops = operations(quantize_on_load, sd)
    out = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=True, output_clip=True, embedding_directory=embedding_directory,
        model_options={"custom_operations": ops}, te_model_options={"custom_operations": ops}, metadata=metadata,
    )
    if out is None:
        raise RuntimeError(f"{path}: ComfyUI could not detect the checkpoint type")
    model, clip, vae = out[:3]
    _apply_lora_mode(model, lora_mode)
    return model, clip, vae


def load_text_encoder(path: str, clip_type: str, embedding_directory=None, quantize_on_load: str = "none"):
    """A text encoder file -> CLIP."""
    import comfy.sd

    sd, _ = read_state_dict(path)
    kind = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
    if kind is None:
        raise ValueError(f"unknown CLIP type {clip_type!r}; known: {[t.name.lower() for t in comfy.sd.CLIPType]}")
    return comfy.sd.load_text_encoder_state_dicts(
        [sd], embedding_directory=embedding_directory, clip_type=kind,
        model_options={"custom_operations": operations(quantize_on_load, sd)},
    )
