"""MetaCanvas as a plain library: the MLLM plans on canvas tokens, connectors carry the plan into a DiT.

Never imports ComfyUI. See README.md for the graph it backs.
"""
