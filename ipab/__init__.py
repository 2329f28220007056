"""The `ipab` console entry point: neutral ground that wires the control plane and the worker together."""
