"""Stand-in for ``comfy_api.latest``: the V3 schema classes, recording what nodes declare."""
from dataclasses import dataclass, field


class ComfyExtension:
    async def get_node_list(self):
        raise NotImplementedError


class _Input:
    io_type = None

    def __init__(self, id, **kwargs):
        self.id = id
        self.kwargs = kwargs

    def __getattr__(self, name):
        try:
            return self.__dict__["kwargs"][name]
        except KeyError:
            return None


class _Output:
    io_type = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _comfytype(name):
    input_cls = type("Input", (_Input,), {"io_type": name})
    output_cls = type("Output", (_Output,), {"io_type": name})
    return type(name, (), {"Input": input_cls, "Output": output_cls, "io_type": name})


class _IO:
    Combo = _comfytype("COMBO")
    Boolean = _comfytype("BOOLEAN")
    String = _comfytype("STRING")
    Int = _comfytype("INT")
    Model = _comfytype("MODEL")
    Clip = _comfytype("CLIP")
    Vae = _comfytype("VAE")
    Latent = _comfytype("LATENT")
    Image = _comfytype("IMAGE")
    Conditioning = _comfytype("CONDITIONING")

    @dataclass
    class Schema:
        node_id: str
        display_name: str = None
        category: str = "sd"
        inputs: list = field(default_factory=list)
        outputs: list = field(default_factory=list)
        hidden: list = field(default_factory=list)
        description: str = ""
        search_aliases: list = field(default_factory=list)
        is_output_node: bool = False

    class ComfyNode:
        @classmethod
        def define_schema(cls):
            raise NotImplementedError

    class NodeOutput:
        def __init__(self, *values, ui=None):
            self.result = values
            self.ui = ui


io = _IO
