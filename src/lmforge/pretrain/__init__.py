"""The pretraining recipe: `pretrain(config)` (trainer.py) with one object per objective (objectives.py),
its data (data.py) and its config (config.py), on the shared engine in `lmforge.train`."""
