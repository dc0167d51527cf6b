"""Runs the stages: locally one after another (``local``), or as Kubernetes Jobs."""
