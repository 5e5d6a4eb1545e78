"""cellfluxrl: CellFlux flow matching post-trained with reinforcement learning on biological rewards.

Importing the package is cheap: it imports nothing heavy (no torch, no numba). The parts and the
direction of their imports are in docs/architecture.md.
"""

__version__ = "0.2.0"
