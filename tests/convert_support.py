"""Tiny checkpoints with real key names, per model family, for the converter tests.

Each generator returns ``{key: tensor}`` in bf16 with the layer names the family really uses,
shrunk to width ``H`` (a multiple of every format's block size), plus the keys the family's
rules must keep. Weights are random normal with a few 20x outlier columns, never zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_kitchen.tensor import BaseLayoutParams, QuantizedTensor, register_layout_class

from comfy_lowbit.layouts import LowBitLayout, QuantFormatError

H = 128  # model width of the generated checkpoints


def _w(gen, n, k):
    w = torch.randn(n, k, generator=gen) / k**0.5
    w[:, torch.randperm(k, generator=gen)[:2]] *= 20
    return w.to(torch.bfloat16)


def _linear(sd, gen, name, n, k, bias=True):
    sd[f"{name}.weight"] = _w(gen, n, k)
    if bias:
        sd[f"{name}.bias"] = (0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)


def _norm(sd, gen, name, n=H):
    sd[f"{name}.weight"] = (1 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)


def flux(gen, prefix=""):
    sd = {}
    for name, n, k in [("img_in", H, 64), ("txt_in", H, 2 * H), ("time_in.in_layer", H, 256), ("time_in.out_layer", H, H),
                       ("vector_in.in_layer", H, 2 * H), ("guidance_in.in_layer", H, 256),
                       ("double_blocks.0.img_attn.qkv", 3 * H, H), ("double_blocks.0.img_attn.proj", H, H),
                       ("double_blocks.0.img_mlp.0", 4 * H, H), ("double_blocks.0.img_mlp.2", H, 4 * H),
                       ("double_blocks.0.img_mod.lin", 6 * H, H), ("double_blocks.0.txt_attn.qkv", 3 * H, H),
                       ("single_blocks.0.linear1", 7 * H, H), ("single_blocks.0.linear2", H, 5 * H),
                       ("single_blocks.0.modulation.lin", 3 * H, H),
                       ("final_layer.linear", 64, H), ("final_layer.adaLN_modulation.1", 2 * H, H)]:
        _linear(sd, gen, prefix + name, n, k)
    sd[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(H // 4, dtype=torch.bfloat16)
    keep = {prefix + k + ".weight" for k in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer",
                                             "vector_in.in_layer", "guidance_in.in_layer", "final_layer.linear",
                                             "final_layer.adaLN_modulation.1")}
    return sd, keep


def sd3(gen, prefix=""):
    sd = {}
    for name, n, k in [("context_embedder", H, 2 * H), ("t_embedder.mlp.0", H, 256), ("y_embedder.mlp.0", H, 2 * H),
                       ("joint_blocks.0.x_block.attn.qkv", 3 * H, H), ("joint_blocks.0.x_block.mlp.fc1", 4 * H, H),
                       ("joint_blocks.0.x_block.adaLN_modulation.1", 6 * H, H),
                       ("joint_blocks.0.context_block.attn.proj", H, H), ("final_layer.linear", 64, H)]:
        _linear(sd, gen, prefix + name, n, k)
    sd[prefix + "x_embedder.proj.weight"] = torch.randn(H, 16, 2, 2, generator=gen).to(torch.bfloat16)
    sd[prefix + "pos_embed"] = torch.randn(1, 64, H, generator=gen).to(torch.bfloat16)
    keep = {prefix + k + ".weight" for k in ("context_embedder", "t_embedder.mlp.0", "y_embedder.mlp.0", "final_layer.linear")}
    return sd, keep


def sdxl_checkpoint(gen):
    """A full checkpoint: UNet under model.diffusion_model., a CLIP, and a VAE."""
    sd, u, c, v = {}, "model.diffusion_model.", "conditioner.embedders.0.transformer.", "first_stage_model."
    for name, n, k in [("time_embed.0", 4 * H, H), ("label_emb.0.0", 4 * H, 2 * H),
                       ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", H, H),
                       ("input_blocks.1.1.transformer_blocks.0.ff.net.0.proj", 8 * H, H),
                       ("input_blocks.1.1.proj_in", H, H), ("middle_block.1.transformer_blocks.0.attn2.to_k", H, 2 * H),
                       ("output_blocks.0.1.transformer_blocks.0.attn1.to_out.0", H, H)]:
        _linear(sd, gen, u + name, n, k, bias=not name.endswith("to_q"))
    sd[u + "input_blocks.0.0.weight"] = torch.randn(H, 4, 3, 3, generator=gen).to(torch.bfloat16)
    sd[u + "out.2.weight"] = torch.randn(4, H, 3, 3, generator=gen).to(torch.bfloat16)
    _norm(sd, gen, u + "input_blocks.1.1.norm")
    sd[c + "text_model.embeddings.token_embedding.weight"] = _w(gen, 1000, H)
    sd[c + "text_model.embeddings.position_embedding.weight"] = _w(gen, 77, H)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _linear(sd, gen, f"{c}text_model.encoder.layers.0.self_attn.{name}", H, H)
    _linear(sd, gen, c + "text_model.encoder.layers.0.mlp.fc1", 4 * H, H)
    _norm(sd, gen, c + "text_model.final_layer_norm")
    sd[v + "decoder.up.0.block.0.conv1.weight"] = torch.randn(H, H, 3, 3, generator=gen).to(torch.bfloat16)
    _linear(sd, gen, v + "decoder.mid.attn_1.q", H, H)  # VAE attention stored as a 2-D weight
    keep = {u + "time_embed.0.weight", u + "label_emb.0.0.weight", c + "text_model.embeddings.token_embedding.weight",
            c + "text_model.embeddings.position_embedding.weight", v + "decoder.mid.attn_1.q.weight"}
    return sd, keep


def wan(gen, prefix=""):
    sd = {}
    for name, n, k in [("text_embedding.0", H, 2 * H), ("time_embedding.0", H, 256), ("time_projection.1", 6 * H, H),
                       ("blocks.0.self_attn.q", H, H), ("blocks.0.cross_attn.k", H, H), ("blocks.0.ffn.0", 4 * H, H),
                       ("blocks.0.ffn.2", H, 4 * H), ("head.head", 64, H)]:
        _linear(sd, gen, prefix + name, n, k)
    sd[prefix + "blocks.0.modulation"] = torch.randn(1, 6, H, generator=gen).to(torch.bfloat16)
    keep = {prefix + k + ".weight" for k in ("text_embedding.0", "time_embedding.0", "time_projection.1", "head.head")}
    return sd, keep


def qwen_image(gen, prefix=""):
    sd = {}
    for name, n, k in [("img_in", H, 64), ("txt_in", H, 2 * H), ("time_text_embed.timestep_embedder.linear_1", H, 256),
                       ("transformer_blocks.0.img_mod.1", 6 * H, H), ("transformer_blocks.0.attn.to_q", H, H),
                       ("transformer_blocks.0.attn.add_q_proj", H, H), ("transformer_blocks.0.img_mlp.net.0.proj", 4 * H, H),
                       ("norm_out.linear", 2 * H, H), ("proj_out", 64, H)]:
        _linear(sd, gen, prefix + name, n, k)
    _norm(sd, gen, prefix + "txt_norm")
    keep = {prefix + k + ".weight" for k in ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                                             "norm_out.linear", "proj_out", "txt_norm")}
    return sd, keep


def t5(gen, prefix=""):
    sd = {prefix + "shared.weight": _w(gen, 500, H)}
    for name, n, k in [("encoder.block.0.layer.0.SelfAttention.q", H, H), ("encoder.block.0.layer.0.SelfAttention.o", H, H),
                       ("encoder.block.0.layer.1.DenseReluDense.wi_0", 2 * H, H),
                       ("encoder.block.0.layer.1.DenseReluDense.wo", H, 2 * H)]:
        _linear(sd, gen, prefix + name, n, k, bias=False)
    sd[prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = _w(gen, 32, 8)
    _norm(sd, gen, prefix + "encoder.final_layer_norm")
    keep = {prefix + "shared.weight", prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            prefix + "encoder.final_layer_norm.weight"}
    return sd, keep


def llama(gen, prefix="model."):
    sd = {prefix + "embed_tokens.weight": _w(gen, 500, H)}
    for name, n, k in [("layers.0.self_attn.q_proj", H, H), ("layers.0.self_attn.k_proj", H // 2, H),
                       ("layers.0.mlp.gate_proj", 3 * H, H), ("layers.0.mlp.down_proj", H, 3 * H)]:
        _linear(sd, gen, prefix + name, n, k, bias=False)
    _norm(sd, gen, prefix + "layers.0.input_layernorm")
    sd["lm_head.weight"] = _w(gen, 500, H)
    keep = {prefix + "embed_tokens.weight", prefix + "layers.0.input_layernorm.weight", "lm_head.weight"}
    return sd, keep


FAMILY_CHECKPOINTS = {"flux": flux, "sd3": sd3, "sd-unet": sdxl_checkpoint, "wan": wan, "qwen-image": qwen_image,
                      "t5": t5, "llama-style": llama}


class ToyBlockInt8Layout(LowBitLayout):
    """A throwaway layout for testing the converter alone: int8 codes, one fp32 scale per block of K."""

    FORMAT = "toy_block_int8"

    @dataclass(frozen=True)
    class Params(BaseLayoutParams):
        block_size: int = 32
        transposed: bool = False

    @classmethod
    def quantize(cls, tensor, block_size: int = 32, **kwargs):
        n, k = tensor.shape
        if k % block_size:
            raise QuantFormatError(f"K={k} is not a multiple of block_size {block_size}")
        blocks = tensor.float().reshape(n, k // block_size, block_size)
        scale = blocks.abs().amax(-1).clamp_min(1e-12) / 127
        q = torch.round(blocks / scale[..., None]).to(torch.int8).reshape(n, k)
        return q, cls.Params(scale=scale, orig_dtype=tensor.dtype, orig_shape=(n, k), block_size=block_size)

    @classmethod
    def dequantize(cls, q, params):
        n, k = params.orig_shape
        blocks = q.float().reshape(n, k // params.block_size, params.block_size) * params.scale[..., None]
        return blocks.reshape(n, k).to(params.orig_dtype)

    @classmethod
    def state_dict_tensors(cls, q, params):
        return {"": q, "_scale": params.scale}

    @classmethod
    def comfy_quant_config(cls, params):
        return {"format": cls.FORMAT, "block_size": params.block_size}

    @classmethod
    def from_state_dict(cls, layer, tensors, config):
        q, scale = tensors[""], tensors["_scale"]
        return QuantizedTensor(
            q, cls.__name__, cls.Params(scale=scale, orig_dtype=torch.bfloat16, orig_shape=tuple(q.shape),
                                        block_size=config["block_size"]))


register_layout_class(ToyBlockInt8Layout.__name__, ToyBlockInt8Layout)
