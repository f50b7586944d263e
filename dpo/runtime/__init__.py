"""Plumbing: run folders and identity, checkpoints, files and caches, ranks, logging and progress bars."""
