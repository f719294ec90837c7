"""ComfyUI node mappings of the MetaCanvas pack: one module per family of nodes."""

from . import compat, nodes_loaders, nodes_native, nodes_planning, nodes_preview, nodes_sampling

_FAMILIES = (nodes_loaders, nodes_planning, nodes_preview, nodes_sampling, nodes_native)
NODE_CLASS_MAPPINGS = compat.checked(
    {name: cls for family in _FAMILIES for name, cls in family.NODE_CLASS_MAPPINGS.items()}
)
NODE_DISPLAY_NAME_MAPPINGS = {
    name: title for family in _FAMILIES for name, title in family.NODE_DISPLAY_NAME_MAPPINGS.items()
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
