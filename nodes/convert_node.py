"""The converter, run from ComfyUI: a models-folder file -> a quantized file beside it.

The conversion itself is the converter library's (``convert``); this module only maps the
node's ``<folder>/<file>`` choice to paths, names the output, and turns the converter's
progress callback into ComfyUI's progress bar (``comfy.utils.ProgressBar``).
"""
from __future__ import annotations

import os

# The models folders whose files the node offers (ComfyUI's folder_paths names).
MODEL_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")


def model_folders() -> tuple[str, ...]:
    return MODEL_FOLDERS


def output_name(name: str, fmt: str, suffix: str = "") -> str:
    """``flux1-dev.safetensors`` + ``bnb_nf4`` -> ``flux1-dev-bnb_nf4.safetensors`` (same subfolder)."""
    stem, _ = os.path.splitext(name)
    return f"{stem}-{suffix.strip() or fmt}.safetensors"


def convert_in_models_folder(choice: str, fmt: str, suffix: str = "", overwrite: bool = False,
                             **options) -> tuple[str, str]:
    """Convert ``<folder>/<file>`` to ``fmt``; returns (new file name in that folder, summary text).

    ``options``: further ``ConvertOptions`` fields (block_size, double_quant, optimize, ...).
    """
    import comfy.utils
    import folder_paths

    folder, _, name = choice.partition("/")
    if folder not in MODEL_FOLDERS or not name:
        raise ValueError(f"model must be '<folder>/<file>' with folder in {MODEL_FOLDERS}, got {choice!r}")
    src = folder_paths.get_full_path_or_raise(folder, name)
    new_name = output_name(name, fmt, suffix)
    dst = os.path.join(os.path.dirname(src), os.path.basename(new_name))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; set overwrite to replace it")

    bar = None

    def progress(done: int, total: int, key: str = "") -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    from ..convert.converter import ConvertOptions, convert_checkpoint

    summary = convert_checkpoint(src, dst, ConvertOptions(format=fmt, overwrite=overwrite, **options),
                                 progress=progress, show_progress=False)
    return new_name, summary.format_text()
