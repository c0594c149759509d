"""Pretraining: the recipe (trainer.py), its config, and the mechanics it calls (optimizers and schedules,
checkpoints, logging, distributed)."""
