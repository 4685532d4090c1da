"""The generator core: a replica's batching, pixel budget, cancel marks and failure split around one

engine, driven by the Serve shell in `serving/generator.py` and by tests without Ray.
"""
