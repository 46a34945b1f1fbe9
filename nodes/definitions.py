"""The LowBit nodes, in ComfyUI's V3 schema (``comfy_api.latest``).

Imported only inside ComfyUI (``nodes/__init__.py`` imports it lazily from ``comfy_entrypoint``).
The work lives in ``loading`` and ``convert_node``; a node here only declares its inputs
(with tooltips) and calls one function.
"""
from __future__ import annotations

import folder_paths
from comfy_api.latest import ComfyExtension, io

from . import loading
from .convert_node import convert_in_models_folder, model_folders
from ..layouts import FORMATS
from .ops import UI_FORMATS, loading_format

CATEGORY = "loaders/lowbit"

QUANTIZE_TOOLTIP = (
    "Quantize the float linear layers of the model's blocks while loading (on the GPU when there "
    "is one): nf4/fp4 = bitsandbytes-exact 4-bit, int8_lodewise = 8-bit, w4a4 = SVDQuant 4-bit "
    "weights and activations. 'none' keeps the file as it is (already-quantized files need none)."
)
LORA_TOOLTIP = (
    "How LoRAs applied downstream reach quantized layers. requantize (default): dequantize, add the "
    "LoRA, quantize again once at load - no cost per step, some rounding of the LoRA. runtime: the "
    "weights stay untouched and the LoRA is added in each forward - exact, a little slower per step."
)
CLIP_TYPES = ["stable_diffusion", "sd3", "flux", "flux2", "wan", "hidream", "chroma", "lumina2",
              "qwen_image", "hunyuan_image", "ltxv", "mochi", "cosmos", "pixart", "stable_cascade"]


def quantize_choices() -> list[str]:
    """"none" plus each UI format whose layout is in this build's format table."""
    return ["none", *(ui for ui, fmt in UI_FORMATS.items() if fmt in FORMATS)]


def _quantize_input():
    return io.Combo.Input("quantize_on_load", options=quantize_choices(), default="none", tooltip=QUANTIZE_TOOLTIP)


def _lora_input():
    return io.Combo.Input("lora_mode", options=list(loading.LORA_MODES), default=loading.DEFAULT_LORA_MODE,
                          tooltip=LORA_TOOLTIP, advanced=True)


class LowBitModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitModelLoader",
            display_name="Load Diffusion Model (LowBit)",
            category=CATEGORY,
            description=(
                "Loads a diffusion model (models/diffusion_models or models/unet) in 4 or 8 bits: "
                "comfy_lowbit files, bitsandbytes NF4/FP4 files (Forge/diffusers), comfy-kitchen "
                "SVDQuant tensors, or a bf16/fp16 file quantized while loading. Samples like any MODEL; "
                "weights stay quantized on the GPU and when offloaded."
            ),
            search_aliases=["nf4", "fp4", "int8", "w4a4", "svdquant", "bitsandbytes", "quantized unet"],
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The model file, from models/diffusion_models or models/unet."),
                _quantize_input(),
                _lora_input(),
            ],
            outputs=[io.Model.Output(tooltip="The diffusion model, quantized linear layers included.")],
        )

    @classmethod
    def execute(cls, unet_name, quantize_on_load="none", lora_mode=loading.DEFAULT_LORA_MODE):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(loading.load_diffusion_model(path, loading_format(quantize_on_load), lora_mode))


class LowBitCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitCheckpointLoader",
            display_name="Load Checkpoint (LowBit)",
            category=CATEGORY,
            description=(
                "Loads a full checkpoint (models/checkpoints) whose diffusion model and text encoders may "
                "be quantized in any format the LowBit model loader reads, or quantizes them while loading."
            ),
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The checkpoint file, from models/checkpoints."),
                _quantize_input(),
                _lora_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="The diffusion model."),
                io.Clip.Output(tooltip="The text encoder(s), for CLIP Text Encode."),
                io.Vae.Output(tooltip="The VAE, to decode latents into images."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name, quantize_on_load="none", lora_mode=loading.DEFAULT_LORA_MODE):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = loading.load_checkpoint(
            path, folder_paths.get_folder_paths("embeddings"), loading_format(quantize_on_load), lora_mode)
        return io.NodeOutput(model, clip, vae)


class LowBitCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitCLIPLoader",
            display_name="Load CLIP (LowBit)",
            category=CATEGORY,
            description=(
                "Loads a text encoder (models/text_encoders or models/clip), quantized in any format the "
                "LowBit model loader reads, or quantizes its blocks while loading (e.g. T5-XXL in NF4)."
            ),
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders"),
                               tooltip="The text encoder file, from models/text_encoders or models/clip."),
                io.Combo.Input("type", options=CLIP_TYPES, default="stable_diffusion",
                               tooltip="Which model family the text encoder belongs to (as in Load CLIP)."),
                _quantize_input(),
            ],
            outputs=[io.Clip.Output(tooltip="The text encoder, for CLIP Text Encode.")],
        )

    @classmethod
    def execute(cls, clip_name, type="stable_diffusion", quantize_on_load="none"):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        clip = loading.load_text_encoder(path, type, folder_paths.get_folder_paths("embeddings"),
                                         loading_format(quantize_on_load))
        return io.NodeOutput(clip)


class LowBitConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = [f"{folder}/{name}" for folder in model_folders() for name in folder_paths.get_filename_list(folder)]
        return io.Schema(
            node_id="LowBitConvert",
            display_name="Convert Model to LowBit",
            category=CATEGORY,
            description=(
                "Converts a model file from the models folders into a new quantized file in the same "
                "folder (streaming, tensor by tensor; on the GPU when there is one) and returns the new "
                "file's name and the converter's summary. Run it once, then load the new file with the "
                "LowBit loaders."
            ),
            is_output_node=True,
            inputs=[
                io.Combo.Input("model", options=files, tooltip="<folder>/<file> to convert."),
                io.Combo.Input("format", options=quantize_choices()[1:], default=(quantize_choices()[1:] or [None])[0],
                               tooltip="Target format: nf4/fp4 (4-bit, bitsandbytes-exact), int8_lodewise "
                                       "(8-bit), w4a4 (SVDQuant, 4-bit weights and activations)."),
                io.Int.Input("block_size", default=0, min=0, max=4096, step=16,
                             tooltip="Values per scale (nf4/fp4: 64 like bitsandbytes; int8: 128). 0: the format's "
                                     "default."),
                io.Boolean.Input("double_quant", default=False,
                                 tooltip="nf4/fp4: also quantize the per-block scales to 8 bits (bitsandbytes "
                                         "'compress_statistics'), ~0.4 bit per weight smaller."),
                io.Boolean.Input("optimize", default=False,
                                 tooltip="nf4/fp4: search each block's scale to minimise its error (slower "
                                         "conversion, same file format, lower error)."),
                io.String.Input("suffix", default="",
                                tooltip="Appended to the new file's name; empty: the format name."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace the output file if it exists."),
            ],
            outputs=[
                io.String.Output(display_name="file_name", tooltip="The new file, relative to its models folder."),
                io.String.Output(display_name="summary", tooltip="What was quantized and kept, and the sizes."),
            ],
        )

    @classmethod
    def execute(cls, model, format, block_size=0, double_quant=False, optimize=False, suffix="", overwrite=False):
        name, summary = convert_in_models_folder(
            model, loading_format(format), suffix, overwrite,
            block_size=block_size or None, double_quant=double_quant, optimize=optimize)
        return io.NodeOutput(name, summary, ui={"text": [f"{name}\n{summary}"]})


NODES = [LowBitModelLoader, LowBitCheckpointLoader, LowBitCLIPLoader, LowBitConvert]


class LowBitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
