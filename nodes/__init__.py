"""ComfyUI nodes: the only part of the package that imports ``comfy`` (lazily).

ComfyUI calls ``comfy_entrypoint()`` (V3 schema API) after it has imported ``comfy``; the
package root only imports this module when ``comfy`` is importable. Importing it also
teaches ComfyUI's stock loaders our formats (``stock_loaders``; switchable).
"""
from __future__ import annotations


async def comfy_entrypoint():
    from . import stock_loaders
    from .definitions import LowBitExtension

    stock_loaders.install()
    return LowBitExtension()


__all__ = ["comfy_entrypoint"]
