"""Stand-in: ComfyUI's format table (the real one lists fp8/nvfp4/mxfp8/int8 entries)."""
import torch

QUANT_ALGOS = {
    "float8_e4m3fn": {"storage_t": torch.float8_e4m3fn, "parameters": {"weight_scale", "input_scale"},
                      "comfy_tensor_layout": "TensorCoreFP8E4M3Layout"},
}
