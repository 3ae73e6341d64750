"""Cluster launch of the pre-training (Submitit): see slurm/submit.py."""
