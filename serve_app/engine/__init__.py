"""The engine layer: plain Python over diffusers, no Ray."""
