"""Scaffolding for the tests, the benchmarks and the tools; not part of the service (the Bento
ships none of it, bentofile.yaml's include list names the service's packages only).

- tiny: tiny random-weight checkpoints in both layouts (``python -m testing.tiny DIR``, make demo);
- served: a real ``bentoml serve`` of a checkpoint in its own process group, until /readyz answers;
- mediafiles: real video and image files (PyAV, Pillow) whose frames carry their own index.
"""
