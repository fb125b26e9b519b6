"""Cluster state: the worker registry, load and prefix index that routers read and workers
publish (README, Architecture)."""
