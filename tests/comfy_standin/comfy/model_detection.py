"""Stand-in for ``comfy.model_detection.detect_unet_config``: like ComfyUI's for SD1.x/SDXL
UNets, it reads the text width from the cross-attention's ``attn2.to_k`` weight shape."""

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def detect_unet_config(state_dict, key_prefix, metadata=None):
    return {"context_dim": state_dict[f"{key_prefix}{TO_K}"].shape[1]}
