"""Running a trained RS-MoE: load it (load) and generate captions and answers (generate)."""
