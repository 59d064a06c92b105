"""MediRound core: multi-round entity-level reasoning segmentation (no Slicer, Qt or VTK imports)."""

__version__ = "0.1.0"
