"""Stand-in for the part of ``comfy.ops`` our operations build on (ComfyUI 0.29 shapes).

``_load_quantized_module`` / ``_quantized_weight_state_dict`` are module globals looked up
at call time, as in ComfyUI, so wrapping them (``stock_loaders``) takes effect.
"""
import json

import torch
import torch.nn.functional as F

from comfy.quant_ops import QUANT_ALGOS


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class manual_cast:
    """ComfyUI's float operations; only the name matters here."""


def _load_quantized_module(module, super_load, state_dict, prefix, local_metadata, strict,
                           missing_keys, unexpected_keys, error_msgs, load_extra_params=False):
    weight = state_dict.pop(f"{prefix}weight", None)
    if weight is None:  # ComfyUI 0.29: a warning, and the layer is left without a weight
        module.weight = None
        return
    conf = state_dict.pop(f"{prefix}comfy_quant", None)
    if conf is not None:
        fmt = json.loads(conf.numpy().tobytes()).get("format")
        QUANT_ALGOS[fmt]  # KeyError for a format nobody registered, as in ComfyUI
        raise ValueError(f"Unsupported quantization format: {fmt}")  # the closed if/elif
    module.weight = torch.nn.Parameter(weight.to(dtype=module.factory_kwargs["dtype"] or weight.dtype),
                                       requires_grad=False)
    super_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    if f"{prefix}weight" in missing_keys:
        missing_keys.remove(f"{prefix}weight")


def _quantized_weight_state_dict(module, sd, prefix, extra_quant_conf=None, extra_quant_params=()):
    if module.bias is not None:
        sd[f"{prefix}bias"] = module.bias
    sd[f"{prefix}weight"] = module.weight
    return sd


def mixed_precision_ops(quant_config={}, compute_dtype=torch.bfloat16, full_precision_mm=False, disabled=[]):
    class MixedPrecisionOps(manual_cast):
        _compute_dtype = compute_dtype

        class Linear(torch.nn.Module, CastWeightBiasOp):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                super().__init__()
                self.factory_kwargs = {"device": device, "dtype": MixedPrecisionOps._compute_dtype}
                self.in_features, self.out_features = in_features, out_features
                self.weight = None
                self.bias = torch.nn.Parameter(torch.empty(out_features, **self.factory_kwargs)) if bias else None

            def _load_from_state_dict(self, *args):
                _load_quantized_module(self, super()._load_from_state_dict, *args, load_extra_params=True)

            def state_dict(self, *args, destination=None, prefix="", **kwargs):
                sd = destination if destination is not None else {}
                return _quantized_weight_state_dict(self, sd, prefix)

            def forward(self, x):
                # ComfyUI's weight-only path: the weight (quantized or not) reaches F.linear.
                weight = self.weight.to(dtype=x.dtype)
                bias = None if self.bias is None else self.bias.to(dtype=x.dtype)
                return F.linear(x, weight, bias)

    return MixedPrecisionOps
