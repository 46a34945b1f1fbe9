"""Two test-only ComfyUI nodes for the e2e workflows (installed into custom_nodes by the e2e script).

The tiny random Flux has no text encoder and no VAE worth shipping, so:
* ``LowBitE2EConditioning``: seeded random conditioning of the shapes Flux expects
  (context (1, 8, 64), pooled (1, 32));
* ``LowBitE2ELatentToImage``: a fixed 16->3 channel projection of the latent, upscaled 8x,
  squashed to [0, 1]: an IMAGE for SaveImage that changes whenever the latent does;
* ``LowBitE2EConditioningStats``: an output node reporting a CLIP encoder's conditioning.
"""
import torch
from comfy_api.latest import ComfyExtension, io


class LowBitE2EConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitE2EConditioning", display_name="LowBit e2e conditioning", category="testing",
            description="Seeded random Flux conditioning for the LowBit e2e test.",
            inputs=[io.Int.Input("seed", default=0, tooltip="Seed of the random context.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed):
        gen = torch.Generator().manual_seed(seed)
        context = torch.randn(1, 8, 64, generator=gen)
        pooled = torch.randn(1, 32, generator=gen)
        return io.NodeOutput([[context, {"pooled_output": pooled}]])


class LowBitE2ELatentToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitE2ELatentToImage", display_name="LowBit e2e latent to image", category="testing",
            description="A fixed projection of a 16-channel latent to RGB for the LowBit e2e test.",
            inputs=[io.Latent.Input("samples")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples):
        latent = samples["samples"].float()
        proj = torch.Generator().manual_seed(1234)
        weight = torch.randn(3, latent.shape[1], generator=proj) / latent.shape[1] ** 0.5
        rgb = torch.einsum("oc,bchw->bohw", weight, latent)
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
        return io.NodeOutput(torch.sigmoid(rgb).permute(0, 2, 3, 1).contiguous())


class LowBitE2EConditioningStats(io.ComfyNode):
    """Output node: the conditioning's shape and values, as JSON text in the prompt's outputs."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LowBitE2EConditioningStats", display_name="LowBit e2e conditioning stats", category="testing",
            description="Reports a conditioning's tensor (shape, finiteness, first values) for the LowBit e2e test.",
            inputs=[io.Conditioning.Input("conditioning")],
            outputs=[], is_output_node=True,
        )

    @classmethod
    def execute(cls, conditioning):
        import json

        cond = conditioning[0][0].float()
        stats = {"shape": list(cond.shape), "finite": bool(torch.isfinite(cond).all()),
                 "values": cond.flatten()[:: max(1, cond.numel() // 4096)].tolist()}
        return io.NodeOutput(ui={"text": [json.dumps(stats)]})


class E2EExtension(ComfyExtension):
    async def get_node_list(self):
        return [LowBitE2EConditioning, LowBitE2ELatentToImage, LowBitE2EConditioningStats]


async def comfy_entrypoint():
    return E2EExtension()
