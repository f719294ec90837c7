"""Building UI-format workflows from node specs (`workflows.Spec`): nodes with their widgets in declaration order,
sockets and links the editor reads back. Used to write the shipped native workflows and variants of them in tests.

    g = Graph(specs)
    unet = g.add("UNETLoader", (20, 60), unet_name="wan2.2_ti2v_5B_fp16.safetensors")
    apply = g.add("MetaCanvasApply", (400, 60))
    g.link(unet, "MODEL", apply, "model")
    workflow = g.workflow()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from .workflows import VIRTUAL_NODES, Spec

# The packs a shared workflow's nodes come from (`cnr_id`, as Comfy-Org's templates carry them), so the editor can
# offer to install a missing one: this pack at its version, core nodes at the oldest ComfyUI release tested.
PACK = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
CORE_RELEASE = "0.3.64"


def pack_of(node_type: str) -> dict:
    """The `cnr_id` and `ver` properties of a node of this type."""
    if node_type.startswith("MetaCanvas"):
        return {"cnr_id": PACK["name"], "ver": PACK["version"]}
    return {"cnr_id": "comfy-core", "ver": CORE_RELEASE}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets: list
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    properties: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # color, bgcolor, title


class Graph:
    def __init__(self, specs: dict[str, Spec]) -> None:
        self.specs = specs
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, node_type: str, pos, size=(320, 120), properties: dict | None = None, **values) -> Node:
        """A node with widget `values` (by input name; the others at their defaults)."""
        spec = self.specs[node_type]
        widgets = []
        for name, kind, options in spec.widgets:
            if kind == "CONTROL":
                widgets.append(values.pop("control_after_generate", "fixed"))
            elif kind == "UPLOAD":
                widgets.append("image")
            elif name in values:
                widgets.append(values.pop(name))
            elif "default" in options:
                widgets.append(options["default"])
            elif kind == "COMBO" and options["choices"]:
                widgets.append(options["choices"][0])
            else:
                raise ValueError(f"{node_type}: give a value for widget {name}")
        if values:
            raise ValueError(f"{node_type}: no widgets named {sorted(values)}")
        node = Node(len(self.nodes) + 1, node_type, tuple(pos), tuple(size), widgets)
        node.inputs = [{"name": n, "type": t, "link": None} for n, t, _ in spec.sockets]
        names = spec.output_names or spec.outputs
        node.outputs = [
            {"name": n, "type": t, "links": [], "slot_index": i}
            for i, (n, t) in enumerate(zip(names, spec.outputs, strict=True))
        ]
        node.properties = {"Node name for S&R": node_type, **(properties or {})}
        if node_type not in VIRTUAL_NODES:
            node.properties |= pack_of(node_type)
        self.nodes.append(node)
        return node

    def markdown(self, pos, size, text: str) -> Node:
        """A MarkdownNote (the editor renders it; never sent to the server)."""
        node = self.add("MarkdownNote", pos, size, text=text)
        node.properties = {}
        return node

    def group(self, title: str, nodes: list[Node], pad: int = 20, title_height: int = 50) -> None:
        """A titled box around `nodes` (the editor moves them together), as Comfy-Org's templates have by step."""
        x0 = min(n.pos[0] for n in nodes) - pad
        y0 = min(n.pos[1] for n in nodes) - pad - title_height
        x1 = max(n.pos[0] + n.size[0] for n in nodes) + pad
        y1 = max(n.pos[1] + n.size[1] for n in nodes) + pad
        bounding = [x0, y0, x1 - x0, y1 - y0]
        self.groups.append(
            {
                "id": len(self.groups) + 1,
                "title": title,
                "bounding": bounding,
                "color": "#3f789e",
                "font_size": 24,
                "flags": {},
            }
        )

    def link(self, src: Node, output: str, dst: Node, input_name: str) -> None:
        """`src`'s output (by name) into `dst`'s input (a socket, or a widget turned into one)."""
        src_spec, dst_spec = self.specs[src.type], self.specs[dst.type]
        names = src_spec.output_names or src_spec.outputs
        slot = names.index(output)
        kind = src_spec.outputs[slot]
        target = next((i for i, s in enumerate(dst.inputs) if s["name"] == input_name), None)
        if target is None:  # a widget fed by a link: the editor lists it as an input carrying "widget"
            declared = dst_spec.input_type(input_name)
            assert declared is not None, f"{dst.type} has no input {input_name}"
            dst.inputs.append({"name": input_name, "type": declared, "widget": {"name": input_name}, "link": None})
            target = len(dst.inputs) - 1
        link_id = len(self.links) + 1
        dst.inputs[target]["link"] = link_id
        src.outputs[slot]["links"].append(link_id)
        self.links.append([link_id, src.id, slot, dst.id, target, kind])

    def workflow(self) -> dict:
        executed = [n for n in self.nodes if n.type not in VIRTUAL_NODES]
        order = {n.id: i for i, n in enumerate(executed)}
        nodes = []
        for n in self.nodes:
            nodes.append(
                {
                    "id": n.id,
                    "type": n.type,
                    "pos": list(n.pos),
                    "size": list(n.size),
                    "flags": {},
                    "order": order.get(n.id, len(executed)),
                    "mode": 0,
                    "inputs": n.inputs,
                    "outputs": n.outputs,
                    "properties": n.properties,
                    **n.extra,
                    "widgets_values": n.widgets,
                }
            )
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [10, 60]}},
            "version": 0.4,
        }
