"""Network policy: which URLs may be fetched and the pinned-address fetch itself, shared by LoRA

downloads and webhook deliveries. No Ray.
"""
