"""Stand-in for ComfyUI's ``folder_paths``: a dict {folder: {name: path}} the test fills."""
import os

FOLDERS: dict[str, dict[str, str]] = {}


def get_filename_list(folder):
    return sorted(FOLDERS.get(folder, {}))


def get_full_path_or_raise(folder, name):
    try:
        return FOLDERS[folder][name]
    except KeyError:
        raise FileNotFoundError(f"Model in folder '{folder}' with filename '{name}' not found.") from None


def get_folder_paths(folder):
    return sorted({os.path.dirname(p) for p in FOLDERS.get(folder, {}).values()})
