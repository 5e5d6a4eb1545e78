"""cellfluxrl: CellFlux flow matching post-trained with reinforcement learning on biological rewards.

Importing the package is cheap: it imports nothing heavy (no torch, no numba).
"""

__version__ = "0.1.0"
