"""Hyperparameter tuning on Optuna, behind `python -m mnist_jax.sweep`: the search space from the flags (`space`),
the study, its storage, sampler and pruner (`study`), the workers that train its trials (`worker`) and the results
read back from it (`results`)."""
