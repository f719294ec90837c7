"""The sampler's scheduler names, alone in a module that imports nothing, so a command's `--help` can list
them without importing torch or diffusers (`Backbone.make_scheduler` builds them)."""

SCHEDULERS = ("dpm_solver_flow", "flow_euler", "unipc_flow")
