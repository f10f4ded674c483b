"""What rsmoe reads and writes on disk: the model directory (model_dir), the peft adapter format
(adapters), the checkpoint directory layout (checkpoints), exports for plain transformers + peft
(export), durable writes (fs) and pickle-free loading of DeepSpeed files (safe_load)."""
