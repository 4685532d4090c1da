"""Preview models: ai-toolkit's own sampling, qfloat8 quantization and LoRA hook, so a request draws

what a training preview drew. No Ray.
"""
