"""The HTTP surface: routes, middleware, guards, output encoding, health bodies and the playground.

Starlette/FastAPI only; the Serve ingress mounts it, and tests drive it without Serve.
"""
