"""Training both stages: the loop (loop) wires components that each do one job: preflight checks,
the DeepSpeed engine (engine), checkpoints (checkpointer, reshard, state), the non-finite-loss guard
(nan_guard), preemption, metrics, and what each stage builds (builders, samples)."""
