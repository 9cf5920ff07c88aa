"""The control plane: which versions to serve, and moving the workers to them.

It writes what the data plane reads (``router.registry``: defaults,
resolution, signatures) and the workers' states (``router.pool``).

    source     which version directories are complete; the version policy
    sync       one worker: ReloadConfig, GetModelStatus, signatures
    warmup     warm-up requests (the version's file, or synthesized) and their replay
    plan       the rollout policy: drain -> load -> warm -> switch, pure
    rollout    the controller that carries the plan out (a reconcile loop)
"""
