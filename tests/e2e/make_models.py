"""Write the e2e test's model files: a tiny random-weight Flux, its quantized twins, a LoRA.

Runs under ComfyUI's Python (it builds the model with ``comfy.ldm.flux``, so ComfyUI's model
detection accepts the file as Flux):

    python make_models.py <comfyui_dir> <package_dir> <models_dir> [format ...]   (default: all)

* ``diffusion_models/tiny_flux_bf16.safetensors``: every tensor in bf16;
* ``diffusion_models/tiny_flux_<format>.safetensors``: the same weights, each linear layer of
  the blocks quantized to <format> in our per-layer file format (``layer_state_dict``);
* ``formats.json``: {format: the loader's name for it} for the formats written;
* ``text_encoders/clip_l_random.safetensors``: a random-weight CLIP-L (for the CLIP loader);
* ``loras/tiny_flux_lora.safetensors``: a rank-8 LoRA on the attention and MLP linears of
  every block (ComfyUI's ``diffusion_model.<layer>.lora_{up,down}.weight`` naming).
~1M parameters: a 2-step sample of a 64x64 latent takes well under a second on a CPU.
* ``checkpoints/tiny_sd15_bf16.safetensors``: a full SD1.5-layout checkpoint (UNet + CLIP-L +
  VAE in one file, the original ``model.diffusion_model.`` / ``cond_stage_model.transformer.``
  / ``first_stage_model.`` names) that ComfyUI's ``load_state_dict_guess_config`` detects as
  SD15: a one-level UNet (SD1.5's 320 channels and 768-wide cross-attention, which detection
  requires, one res block, one transformer), the random CLIP-L above, and a VAE with SD's
  fixed encoder and a narrow decoder (ComfyUI reads the decoder's width from the file);
* ``checkpoints/tiny_sd15_<format>.safetensors``: that checkpoint converted by our converter
  (``convert_checkpoint``, its family rules: UNet and CLIP blocks quantized, VAE kept), for
  the first format only (converting the CLIP-L takes 10-100 s per format on a CPU);
* ``checkpoints/tiny_sd15_<format>_unet.safetensors``: the same with only the UNet quantized,
  for ComfyUI's stock Load Checkpoint (which loads an SD1.x text encoder with plain operations).
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile

FLUX_CONFIG = dict(
    in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128, mlp_ratio=4.0,
    num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=False, txt_ids_dims=[],
)
LORA_RANK = 8
# The block linears that get quantized (and LoRA'd): everything with ".<index>." in the name.
IN_BLOCK = re.compile(r"^(double|single)_blocks\.\d+\..*\.weight$")


def main(comfyui_dir: str, package_dir: str, models_dir: str, formats: list[str]) -> None:
    sys.path.insert(0, comfyui_dir)
    link_root = tempfile.mkdtemp(prefix="lowbit_pkg_")
    os.symlink(os.path.abspath(package_dir), os.path.join(link_root, "comfy_lowbit"))
    sys.path.insert(0, link_root)

    import torch
    from safetensors.torch import save_file

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # building a model file needs no GPU, and there may be none
    import comfy.ldm.flux.model
    import comfy.ops
    from comfy_kitchen.tensor import QuantizedTensor
    from comfy_lowbit.layouts import FORMATS, layer_state_dict
    from comfy_lowbit.nodes.ops import UI_FORMATS

    formats = formats or [fmt for fmt in UI_FORMATS.values() if fmt in FORMATS]

    torch.manual_seed(0)
    model = comfy.ldm.flux.model.Flux(operations=comfy.ops.manual_cast, dtype=torch.float32, **FLUX_CONFIG)
    sd = {}
    for key, value in model.state_dict().items():
        # Weights ~ N(0, 1/fan_in) like a trained model's; norms ~1: outputs stay finite at bf16.
        if key.endswith(".scale") or "norm" in key:
            t = 1.0 + 0.1 * torch.randn(value.shape)
        elif value.dim() >= 2:
            t = torch.randn(value.shape) / value.shape[1] ** 0.5
        else:
            t = 0.02 * torch.randn(value.shape)
        sd[key] = t.to(torch.bfloat16).contiguous()
    block_linears = [k for k, v in sd.items() if IN_BLOCK.match(k) and v.dim() == 2]
    assert block_linears, "no block linears found: the tiny Flux layout changed"

    os.makedirs(os.path.join(models_dir, "diffusion_models"), exist_ok=True)
    os.makedirs(os.path.join(models_dir, "loras"), exist_ok=True)
    save_file(sd, os.path.join(models_dir, "diffusion_models", "tiny_flux_bf16.safetensors"))

    for fmt in formats:
        layout = FORMATS[fmt]
        out = {k: v for k, v in sd.items() if k not in block_linears}
        for key in block_linears:
            qt = QuantizedTensor.from_float(sd[key], layout.__name__)
            out.update(layer_state_dict(key[: -len(".weight")], qt))
        save_file({k: v.contiguous() for k, v in out.items()},
                  os.path.join(models_dir, "diffusion_models", f"tiny_flux_{fmt}.safetensors"))

    ui_names = {fmt: ui for ui, fmt in UI_FORMATS.items()}
    with open(os.path.join(models_dir, "formats.json"), "w") as f:
        json.dump({fmt: ui_names[fmt] for fmt in formats}, f)

    lora = {}
    for key in block_linears:
        layer = key[: -len(".weight")]
        n, k = sd[key].shape
        lora[f"diffusion_model.{layer}.lora_down.weight"] = (torch.randn(LORA_RANK, k) / k**0.5).to(torch.bfloat16)
        up = 0.5 * torch.randn(n, LORA_RANK) / LORA_RANK**0.5
        lora[f"diffusion_model.{layer}.lora_up.weight"] = up.to(torch.bfloat16)
    save_file(lora, os.path.join(models_dir, "loras", "tiny_flux_lora.safetensors"))
    # A CLIP-L text encoder (ComfyUI builds CLIP-L from a fixed config, so it is full size: 123 M
    # parameters) with random weights, for LowBitCLIPLoader.
    import json as _json

    from comfy.clip_model import CLIPTextModel

    with open(os.path.join(comfyui_dir, "comfy", "sd1_clip_config.json")) as f:
        clip_config = _json.load(f)
    te = CLIPTextModel(clip_config, dtype=torch.float32, device="cpu", operations=comfy.ops.manual_cast)
    te_sd = {}
    for key, value in te.state_dict().items():
        if "norm" in key:
            t = 1.0 + 0.1 * torch.randn(value.shape) if key.endswith("weight") else 0.02 * torch.randn(value.shape)
        elif "embedding" in key:
            t = 0.02 * torch.randn(value.shape)
        elif value.dim() >= 2:
            t = torch.randn(value.shape) / value.shape[1] ** 0.5
        else:
            t = 0.02 * torch.randn(value.shape) if value.is_floating_point() else value
        te_sd[key] = t.to(torch.bfloat16).contiguous() if value.is_floating_point() else value.contiguous()
    os.makedirs(os.path.join(models_dir, "text_encoders"), exist_ok=True)
    save_file(te_sd, os.path.join(models_dir, "text_encoders", "clip_l_random.safetensors"))

    write_checkpoints(models_dir, te_sd, formats[:1])  # converting the CLIP-L costs seconds per format
    print(f"wrote tiny Flux ({sum(v.numel() for v in sd.values())} params, {len(block_linears)} block linears), "
          f"formats {formats}, LoRA on {len(block_linears)} layers")


# SD1.5's UNet, as small as ComfyUI's SD15 detection allows (model_channels 320, context 768).
SD15_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-1, context_dim=768,
    num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
)
# SD's VAE: ComfyUI builds the encoder from this fixed config; the decoder's width ("ch") it
# reads from decoder.conv_in, so a narrow decoder keeps the file small and decoding fast.
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
VAE_DECODER_CH = 32


def random_weights(state_dict: dict) -> dict:
    """Trained-like random bf16 weights: ~N(0, 1/fan_in) for linears and convs, norm scales ~1."""
    import torch

    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            out[key] = value.contiguous()
            continue
        if value.dim() >= 2:
            t = torch.randn(value.shape) / value[0].numel() ** 0.5
        elif key.endswith(".weight") or key.endswith(".scale"):  # every 1-D weight here is a norm's scale
            t = 1.0 + 0.1 * torch.randn(value.shape)
        else:
            t = 0.02 * torch.randn(value.shape)
        out[key] = t.to(torch.bfloat16).contiguous()
    return out


def write_checkpoints(models_dir: str, clip_sd: dict, formats: list[str]) -> None:
    """The full SD1.5-layout checkpoint in bf16 and converted to each of ``formats``."""
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy_lowbit.convert.converter import ConvertOptions, convert_checkpoint

    torch.manual_seed(1)
    unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float32, device="meta", operations=comfy.ops.manual_cast)
    vae = AutoencoderKL(ddconfig=SD_VAE_CONFIG, embed_dim=4,
                        decoder_ddconfig=dict(SD_VAE_CONFIG, ch=VAE_DECODER_CH)).to("meta")
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in random_weights(unet.state_dict()).items()})
    # SD1.5 checkpoints carry no text_projection (SD1.5 never uses the pooled output).
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_sd.items()
               if not k.startswith("text_projection")})
    sd.update({f"first_stage_model.{k}": v for k, v in random_weights(vae.state_dict()).items()})
    folder = os.path.join(models_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    bf16 = os.path.join(folder, "tiny_sd15_bf16.safetensors")
    save_file(sd, bf16)
    for fmt in formats:
        summary = convert_checkpoint(bf16, os.path.join(folder, f"tiny_sd15_{fmt}.safetensors"),
                                     ConvertOptions(format=fmt, device="cpu"), show_progress=False)
        # ComfyUI's stock Load Checkpoint builds an SD1.x text encoder with plain operations
        # (only the diffusion model gets its quantized-layer loader), so its file keeps the CLIP.
        convert_checkpoint(bf16, os.path.join(folder, f"tiny_sd15_{fmt}_unet.safetensors"),
                           ConvertOptions(format=fmt, device="cpu", exclude=("cond_stage_model.*",)),
                           show_progress=False)
        print(f"checkpoint {fmt}: quantized {len(summary.quantized)} layers, kept {len(summary.kept)} tensors "
              f"({summary.families}), {summary.seconds:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
