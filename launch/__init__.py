"""prefjax launchers: TPU VM pods, SLURM clusters, local multi-process runs and sweeps.

Run them from the repository root as modules (`python -m launch.tpu_pod ...`); each has a
`--dry_run` that prints the exact commands instead of running them. See launch/README.md.
"""
