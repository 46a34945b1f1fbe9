"""Runtime LoRA: adapters on our quantized layers run in the forward; the weights stay untouched.

ComfyUI's default way to apply a LoRA to a quantized weight is dequantize -> add the patch ->
requantize (``Linear.set_weight`` -> ``requantize_from_float``). That is fast at sampling time
but rounds the patched weight to 4 bits again, which can wash out a weak LoRA. In runtime mode
an adapter patch (LoRA, LoHa, LoKr, ...) on one of our quantized layers is instead given to
ComfyUI's bypass machinery (``comfy.weight_adapter.BypassInjectionManager``): the layer
computes ``linear(x, W_q) + adapter(x)``, exactly, at the cost of the adapter's own matmuls on
every step. Patches on float layers, and non-adapter patches (weight diffs, bias diffs), keep
ComfyUI's normal path.

The mode rides on the MODEL itself: the loader swaps the patcher's class for a subclass whose
``add_patches`` does the routing, and ``ModelPatcher.clone`` keeps the class, so every LoRA
loader downstream (LoraLoader, LoraLoaderModelOnly, hooks) is routed the same way.
"""
from __future__ import annotations

import itertools
import logging

logger = logging.getLogger(__name__)

_CLASSES: dict[type, type] = {}
_SEQUENCE = itertools.count()


def _quantized_weight_keys(model) -> set[str]:
    from .ops import is_lowbit

    return {f"{name}.weight" for name, module in model.named_modules() if is_lowbit(getattr(module, "weight", None))}


def _runtime_class(base: type) -> type:
    if base in _CLASSES or getattr(base, "lowbit_runtime_lora", False):
        return _CLASSES.get(base, base)

    import comfy.weight_adapter

    class RuntimeLoraPatcher(base):
        lowbit_runtime_lora = True

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            quantized = _quantized_weight_keys(self.model)
            bypass, regular = {}, {}
            for key, patch in patches.items():
                adapter = isinstance(patch, comfy.weight_adapter.WeightAdapterBase)
                name = key if isinstance(key, str) else None  # tuple keys carry offsets: regular path
                if adapter and name in quantized and strength_model == 1.0:
                    bypass[name] = patch
                else:
                    regular[key] = patch
            applied = super().add_patches(regular, strength_patch, strength_model) if regular else []
            if bypass:
                manager = comfy.weight_adapter.BypassInjectionManager()
                for key, adapter in bypass.items():
                    manager.add_adapter(key, adapter, strength=strength_patch)
                self.set_injections(f"lowbit_runtime_lora_{next(_SEQUENCE)}", manager.create_injections(self.model))
                logger.info("comfy_lowbit: %d LoRA adapters run at runtime on quantized layers, %d patched",
                            len(bypass), len(regular))
            return list(applied) + list(bypass)

    RuntimeLoraPatcher.__name__ = RuntimeLoraPatcher.__qualname__ = f"RuntimeLora{base.__name__}"
    _CLASSES[base] = RuntimeLoraPatcher
    return RuntimeLoraPatcher


def enable(patcher):
    """Switch a ModelPatcher (and its future clones) to runtime LoRA on quantized layers."""
    patcher.__class__ = _runtime_class(type(patcher))
    return patcher
