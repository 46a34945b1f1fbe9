"""Family detection and keep rules on key lists (no tensors): every family in the table is recognised
from its real key names, at its prefix, and keeps / quantizes the layers its rules say."""
from __future__ import annotations

import pytest

from comfy_lowbit.convert.families import FAMILIES, KeepRules, detect_components

W = (64, 64)

CASES = {
    # family: (keys, kept weight, quantized weight)
    "chroma": (["distilled_guidance_layer.layers.0.in_layer.weight", "double_blocks.0.img_attn.qkv.weight",
                "img_in.weight"], "distilled_guidance_layer.layers.0.in_layer.weight", "double_blocks.0.img_attn.qkv.weight"),
    "flux": (["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight", "single_blocks.0.linear1.weight"],
             "guidance_in.in_layer.weight", "single_blocks.0.linear1.weight"),
    "flux-diffusers": (["single_transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.add_q_proj.weight",
                        "x_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight"],
                       "x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
    "hunyuan-video": (["double_blocks.0.img_attn_qkv.weight", "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight",
                       "single_blocks.0.linear1.weight"],
                      "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight", "single_blocks.0.linear1.weight"),
    "sd3": (["joint_blocks.0.x_block.attn.qkv.weight", "t_embedder.mlp.0.weight"], "t_embedder.mlp.0.weight",
            "joint_blocks.0.x_block.attn.qkv.weight"),
    "sd3-diffusers": (["transformer_blocks.0.attn.add_q_proj.weight", "context_embedder.weight", "proj_out.weight"],
                      "context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"),
    "qwen-image": (["transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.attn.add_q_proj.weight",
                    "txt_in.weight"], "txt_in.weight", "transformer_blocks.0.img_mod.1.weight"),
    "wan": (["blocks.0.self_attn.q.weight", "time_projection.1.weight", "blocks.0.ffn.0.weight"],
            "time_projection.1.weight", "blocks.0.ffn.0.weight"),
    "sd-unet": (["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "time_embed.0.weight"],
                "time_embed.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    "sd-unet-diffusers": (["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                           "time_embedding.linear_1.weight"], "time_embedding.linear_1.weight",
                          "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
    "t5": (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "shared.weight",
           "encoder.block.0.layer.0.SelfAttention.q.weight"),
    "clip": (["text_model.encoder.layers.0.self_attn.q_proj.weight", "text_projection.weight"], "text_projection.weight",
             "text_model.encoder.layers.0.self_attn.q_proj.weight"),
    "llama-style": (["layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "visual.blocks.0.attn.qkv.weight"],
                    "visual.blocks.0.attn.qkv.weight", "layers.0.self_attn.q_proj.weight"),
    "vae": (["decoder.up.0.block.0.conv1.weight", "decoder.mid.attn_1.q.weight"], "decoder.mid.attn_1.q.weight", None),
}


def test_every_family_has_a_case():
    assert {f.name for f in FAMILIES} == set(CASES)


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_detection_and_rules(family, prefix):
    keys, kept, quantized = CASES[family]
    keys = [prefix + k for k in keys]
    comps = detect_components(keys)
    assert [(c.family.name, c.prefix) for c in comps] == [(family, prefix)]
    rules = KeepRules(keys)
    reason = rules.keep_reason(prefix + kept, W, True)
    assert reason and (family in reason or "VAE" in reason or "embedding" in reason or "normalisation" in reason), reason
    if quantized:
        assert rules.keep_reason(prefix + quantized, W, True) is None


def test_components_of_a_full_checkpoint_follow_their_own_rules():
    keys = ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.img_in.weight",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
            "text_encoders.t5xxl.transformer.shared.weight", "vae.decoder.up.0.block.0.conv1.weight", "vae.decoder.mid.attn_1.q.weight"]
    rules = KeepRules(keys)
    assert sorted(c.family.name for c in rules.components) == ["flux", "t5", "vae"]
    assert rules.keep_reason("model.diffusion_model.img_in.weight", W, True).startswith("flux:")
    assert rules.keep_reason("text_encoders.t5xxl.transformer.shared.weight", W, True).startswith("t5:")
    assert rules.keep_reason("vae.decoder.mid.attn_1.q.weight", W, True).startswith("vae:")
    assert rules.keep_reason("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", W, True) is None


@pytest.mark.parametrize("key, shape, is_float, reason", [
    ("blocks.0.fc.bias", (64,), True, "bias"),
    ("blocks.0.conv.weight", (64, 4, 3, 3), True, "not a 2-D linear weight"),
    ("blocks.0.fc.weight", (64, 64), False, "not floating point"),
    ("blocks.0.norm_q.weight", (64,), True, "normalisation layer"),
    ("transformer_blocks.0.norm1.linear.weight", (64, 64), True, None),  # adaptive-norm modulation: quantized
    ("blocks.0.fc.weight", (64, 64), True, None),
])
def test_generic_rules(key, shape, is_float, reason):
    got = KeepRules([key]).keep_reason(key, shape, is_float)
    assert (got is None) if reason is None else got.startswith(reason)


def test_exclude_beats_include_beats_family_rules():
    keys = ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"]
    rules = KeepRules(keys, exclude=["double_blocks.*"], include=["img_in", "double_blocks.0.img_attn.qkv"])
    assert rules.keep_reason("double_blocks.0.img_attn.qkv.weight", W, True) == "--exclude double_blocks.*"
    assert rules.keep_reason("img_in.weight", W, True) is None
