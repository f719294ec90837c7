"""MetaCanvas for ComfyUI: the pack's entry point, loaded by ComfyUI from custom_nodes/.

`metacanvas_core` (the method as a plain library) sits beside this file; it is made importable by
appending this folder to sys.path (appended, so ComfyUI's own `nodes` module keeps precedence).
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

# ComfyUI imports this folder as a package. pytest imports this file alone, without a package, while it
# sets up the rootdir of a checkout whose folder name is not an identifier (e.g. comfyui-metacanvas).
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

    # Served by ComfyUI under /extensions/<this folder's name>/: web/docs/<node class>.md is each node's page in the
    # editor's help panel.
    WEB_DIRECTORY = "./web"

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
