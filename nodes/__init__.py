"""ComfyUI nodes: the only part of the package that imports `comfy` (lazily)."""
