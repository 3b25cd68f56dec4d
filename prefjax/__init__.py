"""prefjax: scalable preference tuning of language models in JAX.

The architecture, top down: `main` (the entry point) runs `train` (the trainer) or
`quickstart` (the main job). The trainer reads a `batch.Batch` at a time from a batch
source (`data` streams, or any other `train.batch_source.BatchSource`), scores it with
`scoring.score` for each of the `roles` (the trained policy and its reference), and
feeds the registry's `losses`. `models` holds the decoder family (its CPU-only paths in
`models.cpu`), `sampling` decodes, `sharding` maps logical axes to the mesh.
"""

__version__ = "0.1.0"
