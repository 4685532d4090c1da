"""The compiled tier: the reference recipe on fixed shapes (LoRA slots, torch.compile, fp8, attention).

Picked by a model's `speed` settings; no Ray.
"""
