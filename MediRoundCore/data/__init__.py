"""MR-MedSeg conversation data: the on-disk format, a torch dataset, and the synthetic anatomy and
dialogue generator that writes training and test splits in that same format."""
