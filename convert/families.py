"""Which weights to quantize: model families recognised from their keys, and their keep rules.

Quantizing everything hurts: small layers that every token passes through (the input and
output projections, the time/guidance/text embedders, norms) carry most of the sensitivity
and little of the size. Modulation linears (FLUX ``img_mod``, diffusers ``norm1.linear``,
Qwen-Image ``img_mod``) are large (a quarter to a third of these models) and are quantized,
except Chroma's approximator, which computes every block's modulation from one small MLP. Each family below is data: a regular expression that recognises it
(its named group ``prefix`` is where the component starts inside a full checkpoint, e.g.
``model.diffusion_model.``) and globs, relative to that prefix, of the 2-D weights it keeps in
their original precision, each with the reason printed in the summary. A checkpoint can hold
several components (a diffusion model, text encoders, a VAE); every key follows the rules of
the component with the longest matching prefix, and the generic rules apply everywhere.

Only 2-D floating-point ``*.weight`` tensors are candidates at all; whether the format can
hold a candidate's shape is the layout's decision, made when quantizing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Family:
    name: str
    detect: str  # regex with a named group "prefix", matched against every key
    keep: tuple[tuple[str, str], ...]  # (glob relative to the prefix, reason)

    def __post_init__(self):
        object.__setattr__(self, "_regex", re.compile(self.detect))


FIRST = "first layer (input projection)"
LAST = "last layer (output projection)"
EMBEDDER = "time/guidance/text embedder"
P = r"^(?P<prefix>(?:.*\.)?)"  # the component's prefix: empty or ending in a dot

# Order matters where one family's keys are a superset of another's: the first family that
# matches at a prefix wins (Chroma has FLUX's double_blocks; FLUX-diffusers has SD3's blocks).
FAMILIES: tuple[Family, ...] = (
    Family("chroma", P + r"distilled_guidance_layer\.", (
        ("img_in.*", FIRST), ("txt_in.*", FIRST + ", text"), ("final_layer.*", LAST),
        ("distilled_guidance_layer.*", "Chroma's approximator computes every block's modulation"),
    )),
    Family("flux", P + r"double_blocks\.\d+\.img_attn\.qkv\.weight$", (
        ("img_in.*", FIRST), ("txt_in.*", FIRST + ", text"), ("final_layer.*", LAST),
        ("time_in.*", EMBEDDER), ("vector_in.*", EMBEDDER), ("guidance_in.*", EMBEDDER),
    )),
    Family("flux-diffusers", P + r"single_transformer_blocks\.\d+\.attn\.to_q\.weight$", (
        ("x_embedder.*", FIRST), ("context_embedder.*", FIRST + ", text"), ("proj_out.*", LAST),
        ("norm_out.*", LAST), ("time_text_embed.*", EMBEDDER),
    )),
    Family("hunyuan-video", P + r"double_blocks\.\d+\.img_attn_qkv\.weight$", (
        ("img_in.*", FIRST), ("txt_in.*", "text input refiner"), ("final_layer.*", LAST),
        ("time_in.*", EMBEDDER), ("vector_in.*", EMBEDDER), ("guidance_in.*", EMBEDDER),
    )),
    Family("sd3", P + r"joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$", (
        ("x_embedder.*", FIRST), ("context_embedder.*", FIRST + ", text"), ("final_layer.*", LAST),
        ("t_embedder.*", EMBEDDER), ("y_embedder.*", EMBEDDER), ("pos_embed*", "positional embedding"),
    )),
    Family("qwen-image", P + r"transformer_blocks\.\d+\.img_mod\.1\.weight$", (
        ("img_in.*", FIRST), ("txt_in.*", FIRST + ", text"), ("proj_out.*", LAST),
        ("norm_out.*", LAST), ("time_text_embed.*", EMBEDDER),
    )),
    Family("sd3-diffusers", P + r"transformer_blocks\.\d+\.attn\.add_q_proj\.weight$", (
        ("pos_embed.*", FIRST), ("context_embedder.*", FIRST + ", text"), ("proj_out.*", LAST),
        ("norm_out.*", LAST), ("time_text_embed.*", EMBEDDER),
    )),
    Family("wan", P + r"blocks\.\d+\.self_attn\.q\.weight$", (
        ("patch_embedding.*", FIRST), ("text_embedding.*", FIRST + ", text"), ("img_emb.*", FIRST + ", image"),
        ("head.*", LAST), ("time_embedding.*", EMBEDDER), ("time_projection.*", EMBEDDER),
    )),
    Family("sd-unet", P + r"input_blocks\.\d+\.\d+\.transformer_blocks\.\d+\.attn1\.to_q\.weight$", (
        ("input_blocks.0.*", FIRST), ("out.*", LAST), ("time_embed.*", EMBEDDER), ("label_emb.*", EMBEDDER),
    )),
    Family("sd-unet-diffusers", P + r"down_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.\d+\.attn1\.to_q\.weight$", (
        ("conv_in.*", FIRST), ("conv_out.*", LAST), ("time_embedding.*", EMBEDDER), ("add_embedding.*", EMBEDDER),
    )),
    Family("t5", P + r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$", (
        ("shared.*", "token embedding"), ("encoder.embed_tokens.*", "token embedding"),
        ("*relative_attention_bias*", "positional embedding"),
    )),
    Family("clip", P + r"text_model\.encoder\.layers\.\d+\.self_attn\.q_proj\.weight$", (
        ("text_model.embeddings.*", "token/position embedding"), ("text_projection*", LAST),
    )),
    Family("llama-style", P + r"layers\.\d+\.self_attn\.q_proj\.weight$", (
        ("*embed_tokens*", "token embedding"), ("visual.*", "vision tower"),
    )),
    Family("vae", P + r"decoder\.up\.\d+\.block\.\d+\.conv1\.weight$", (
        ("*", "VAE: small and quality-critical"),
    )),
)

# Rules for every key, family or not: the layer kinds that quantize badly everywhere.
# Norm scales need no rule: they are 1-D. A 2-D weight named "norm" is an adaptive norm's
# modulation linear (diffusers' ``norm1.linear``), as large as the attention; families that
# need their modulation kept say so.
GENERIC_KEEP: tuple[tuple[str, str], ...] = (
    ("*embed_tokens*", "token embedding"),
    ("*token_embedding*", "token embedding"),
    ("*position_embedding*", "positional embedding"),
    ("*pos_embed*", "positional embedding"),
    ("lm_head.*", LAST),  # language models keep the head beside, not under, their "model." prefix
    ("*.lm_head.*", LAST),
)


@dataclass(frozen=True)
class Component:
    family: Family
    prefix: str

    def describe(self) -> str:
        return f"{self.family.name} at '{self.prefix}'" if self.prefix else self.family.name


def detect_components(keys) -> list[Component]:
    """Every (family, prefix) found in ``keys``; at one prefix the earliest family wins."""
    found: dict[str, int] = {}
    for key in keys:
        for index, family in enumerate(FAMILIES):
            match = family._regex.match(key)
            if match:
                prefix = match.group("prefix")
                found[prefix] = min(index, found.get(prefix, index))
                break
    return [Component(FAMILIES[i], prefix) for prefix, i in sorted(found.items())]


class KeepRules:
    """Decides, per key, whether a tensor must stay in its original precision, and why."""

    def __init__(self, keys, *, exclude=(), include=()):
        self.components = detect_components(keys)
        self.exclude = tuple(exclude)
        self.include = tuple(include)

    def component(self, key: str) -> Component | None:
        best = None
        for comp in self.components:
            if key.startswith(comp.prefix) and (best is None or len(comp.prefix) > len(best.prefix)):
                best = comp
        return best

    def keep_reason(self, key: str, shape: tuple[int, ...], is_float: bool) -> str | None:
        """None if ``key`` should be quantized, else the reason to keep it as it is."""
        if not key.endswith(".weight"):
            return "bias" if key.endswith(".bias") else "not a linear weight"
        if len(shape) != 2:
            if len(shape) == 1 and ("norm" in key or ".ln" in key):
                return "normalisation layer"
            return f"not a 2-D linear weight (shape {tuple(shape)})"
        if not is_float:
            return "not floating point"
        layer = key[: -len(".weight")]
        for glob in self.exclude:
            if fnmatchcase(key, glob) or fnmatchcase(layer, glob):
                return f"--exclude {glob}"
        if any(fnmatchcase(key, glob) or fnmatchcase(layer, glob) for glob in self.include):
            return None
        comp = self.component(key)
        relative = key[len(comp.prefix):] if comp else key
        rules = (comp.family.keep if comp else ()) + GENERIC_KEEP
        for glob, reason in rules:
            if fnmatchcase(relative, glob):
                return f"{comp.family.name}: {reason}" if comp and (glob, reason) in comp.family.keep else reason
        return None

    def describe(self) -> list[dict[str, object]]:
        """The rules in force, for the summary and the output's metadata."""
        return [{"family": c.family.name, "prefix": c.prefix, "keep": [g for g, _ in c.family.keep]}
                for c in self.components]
