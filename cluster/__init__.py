"""Cluster submission, kept apart from the training loop it launches: `python -m cluster.submit` (Slurm
through submitit, or submitit's local executor) and `cluster/train.sbatch` (plain sbatch)."""
