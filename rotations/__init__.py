"""Rotations: Hadamard construction, norm folding and fusion of R1/R2 into the weights."""
