"""Intake: an HTTP request becomes work items (the reference rules, ai-toolkit's preview flags).

Pure Python: no Ray, no torch.
"""
