"""Triton kernels of aimnet_fast, installed as ``aimnet_fast.kernels`` (see pyproject.toml).

One operation = one kernel module (Triton code, no policy) + its autograd wrapper (no math):

- ``radial``    radial AEV fused with the contraction over neighbor features
- ``angular``   angular AEV fused with the contraction over pair features
- ``mlp``       linear + bias + ELU layers with the activation in the matmul epilogue
- ``neighbors`` tiled per-molecule neighbor search and the angular triplets

The reference for each is in ``aimnet_fast.aev`` / ``aimnet_fast.neighbors`` / ``torch.nn``; the
model reaches these modules only through ``aimnet_fast.ops``, which imports them. Importing this
package imports nothing, so each module loads (and fails) on its own.
"""
