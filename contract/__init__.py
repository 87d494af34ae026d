"""The job contract shared by the API and the worker: no torch, no FastAPI.

Both sides import from here, so the shape of a job crossing Redis is defined exactly once.
"""
