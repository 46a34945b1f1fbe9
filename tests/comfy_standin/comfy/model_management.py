"""Stand-in: device choice (CI has no GPU)."""
import torch


def get_torch_device():
    return torch.device("cpu")
