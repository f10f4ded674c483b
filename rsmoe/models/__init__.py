"""RS-MoE as nn.Modules (nothing here imports DeepSpeed or touches files other than weights to load).

- model.py        VisualPrefix (vision encoder -> Q-Former -> projection) and RSMoE (prefix + experts)
- experts.py      ExpertLM: one frozen base LM, one LoRA per expert, batched forward and generate
- multi_lora.py   MultiLoRALinear: several adapters on one linear layer, chosen per batch row
- router.py       the Instruction Router (prompts per expert, VQA routing)
- compose.py      sub-captions -> one caption
- efficientnet.py a small frozen CNN encoder for offline CPU configurations
- hf_weights.py   loading real weights (InstructBLIP visual side, causal LMs, BERT -> Q-Former)
- build.py        build_model(config): the whole model from its config
"""
