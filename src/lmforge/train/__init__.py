"""The training engine every recipe shares: the loop (loop.py) and its `Objective` protocol (objective.py),
checkpoints, optimizers and schedules, distributed helpers, logging and progress, the config parser, the
run tokenizer and resumable batch iteration. Recipes live in `lmforge.pretrain`, `lmforge.finetune`, ..."""
