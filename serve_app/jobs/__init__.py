"""Async jobs: the manager, job records, the store, status events, webhooks and retention.

Plain Python driven by the Serve shell in `serving/jobs.py`; no Ray.
"""
