"""Trainers: stage 1 (teacher forcing, CE + BCE + Dice) and stage 2 (JCM on the frozen model)."""
