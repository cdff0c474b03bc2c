"""Several processes, one run: joining a `jax.distributed` run (`cluster`) and the workdir's exclusive lock
(`runlock`), which every training run takes, on one process or many."""
