"""The control plane: which versions to serve, and moving the workers to them.

    source     which version directories are complete; the version policy
    registry   the default version, resolution, status, signatures (what the data plane reads)
    sync       one worker: ReloadConfig, GetModelStatus, signatures
    warmup     warm-up requests (the version's file, or synthesized) and their replay
    plan       the rollout policy: drain -> load -> warm -> switch, pure
    rollout    the controller that carries the plan out (a reconcile loop)
"""
