"""Test support shared by the test files: the node-graph runner, the workflow validator, the ComfyUI driver."""
