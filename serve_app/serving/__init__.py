"""Serving: the Ray Serve shells (ingress, generator, jobs), handle dispatch and metrics.

The only package, with app.py, that imports Ray.
"""
