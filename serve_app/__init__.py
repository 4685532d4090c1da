"""flux-serve: FLUX.1-dev with ai-toolkit LoRAs on Ray Serve.

Importing this package starts nothing (no Ray, no CUDA, no logging set-up).
"""

__version__ = "0.1.0"
