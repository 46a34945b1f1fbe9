"""ComfyUI-LowBit: run and make 4- and 8-bit diffusion models.

Importing the package registers our layouts with comfy-kitchen. The ComfyUI entry point is
exposed only when ComfyUI itself imports, so the package (and the CLI) work without it.
"""
from __future__ import annotations

from . import layouts  # noqa: F401  (registers the layouts with comfy-kitchen)
from .layouts import FORMATS

__version__ = "0.1.0"

try:  # ComfyUI present: expose the V3 entry point.
    import comfy  # noqa: F401
except ImportError:
    pass
else:
    try:
        from .nodes import comfy_entrypoint  # noqa: F401
    except ImportError:  # nodes not available in this build
        pass

__all__ = ["FORMATS", "__version__"]
