"""Stand-in for ComfyUI's ``comfy_api`` (see ../README.md)."""
