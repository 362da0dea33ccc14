"""Pallas kernels for routing, dispatch, the grouped expert matmul and combine.

No kernel lives here yet: `model.kernels='xla'` is the only backend, and the config
rejects 'pallas'.
"""
