"""ComfyUI node mappings of the MetaCanvas pack, a module per family: what both paths share (`nodes_planning`), the
SANA path (`nodes_sana`), the native Wan2.2/FLUX-Kontext graph nodes (`nodes_native`, patching ComfyUI's MODEL with
`model_patch`); `runtime` and `compat` are ComfyUI's services and the interfaces checked at start-up."""

from . import compat, nodes_native, nodes_planning, nodes_sana

_FAMILIES = (nodes_planning, nodes_sana, nodes_native)
NODE_CLASS_MAPPINGS = compat.checked(
    {name: cls for family in _FAMILIES for name, cls in family.NODE_CLASS_MAPPINGS.items()}
)
NODE_DISPLAY_NAME_MAPPINGS = {
    name: title for family in _FAMILIES for name, title in family.NODE_DISPLAY_NAME_MAPPINGS.items()
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
