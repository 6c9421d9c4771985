"""Evaluation training: a derived network trained from scratch with the DARTS recipe."""
