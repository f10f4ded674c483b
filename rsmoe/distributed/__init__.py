"""Distributed execution: the job's environment (env), the one owner of process groups (layout), the
one module that runs collectives (collectives), and Stage II's expert parallelism (expert_parallel)."""
