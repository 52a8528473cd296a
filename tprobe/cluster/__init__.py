"""Scaling out: SLURM arrays and one-node worker pools over the same shard contract."""
