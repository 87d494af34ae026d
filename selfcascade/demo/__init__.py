"""The demo: a procedural shapes data set, its metrics, and a small text-to-image model on it.

Small enough to train on a CPU, and exact at every resolution, so the self-cascade claims
(composition kept at sizes the model never saw, native detail added) can be measured here.
"""
