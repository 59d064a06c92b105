"""Helpers of the MediRound Slicer module. Importable outside Slicer: Slicer, MRML and Qt are imported lazily."""
