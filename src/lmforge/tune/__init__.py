"""Tuning: search a recipe's settings with Optuna (`lmforge tune`).

The flow, one trial at a time in each worker:

    SPACE.yaml -> space.load_space (checked against the recipe's Schema)      -> {key: Param}
    --storage / --study -> study.open_storage, study.open_study (sampler, pruner, heartbeat)
    study.optimize(objective.TrialObjective):
        trial.suggest_* -> the recipe's config (base YAML < base flags < sampled values; run folder
        OUT/trials/trial_NNNN) -> lmforge.finetune.recipe.finetune / lmforge.pretrain.trainer.pretrain,
        the same code path as the commands, with an `on_eval` hook: every validation reports the metric
        (trial.report) and a rejected trial raises optuna.TrialPruned (recorded PRUNED, with its step)
        -> the trial's value: a validation metric of the run summary (K-fold: the mean over held-out folds)
    report.write_best / write_report / write_plots -> OUT/best.yaml, OUT/report.md, OUT/*.png

Selection never sees a test split: trials are scored on validation, and the test split of the best
configuration is scored once, only when asked (`--final-test`). The engine knows nothing of Optuna: the hook
is a plain callable of `lmforge.train.loop.train_loop`.
"""
