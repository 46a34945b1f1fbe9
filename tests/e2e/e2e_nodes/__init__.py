"""Two test-only ComfyUI nodes for the e2e workflows (installed into custom_nodes by the e2e script).

The tiny random Flux has no text encoder and no VAE worth shipping, so:
* ``LowBitE2EConditioning``: seeded random conditioning of the shapes Flux expects
  (context (1, 8, 64), pooled (1, 32));
* ``LowBitE2ELatentToImage``: a fixed 16->3 channel projection of the latent, upscaled 8x,
  squashed to [0, 1]: an IMAGE for SaveImage that changes whenever the latent does.
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


class E2EExtension(ComfyExtension):
    async def get_node_list(self):
        return [LowBitE2EConditioning, LowBitE2ELatentToImage]


async def comfy_entrypoint():
    return E2EExtension()
