"""Checkpoint loaders: ours (safetensors folders), LLaVA-Med v1.5, MedSAM, and the official MediRound one."""
