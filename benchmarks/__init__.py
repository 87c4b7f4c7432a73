"""Benchmarks for `curvature`: HVP cost and eigensolver cost, side by side with peer libraries.

Run ``python -m benchmarks.hvp --help`` and ``python -m benchmarks.eigensolvers --help``; see
``benchmarks/README.md`` for how to install the peers without replacing torch.
"""
