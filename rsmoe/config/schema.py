"""The typed configuration: every knob, documented where it is defined.

`TrainArgs` (training, both stages) is what presets and dotted overrides fill
(rsmoe.config.loading); `GenerationArgs` is the decoding setting shared by training-time samples,
`rsmoe caption/ask/eval` and serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionArgs:
    type: str = "vit"
    """'vit' (InstructBLIP EVA-ViT layout; random init or from `path`), 'efficientnet' (frozen CNN grid encoder)."""
    path: str = ""
    """Local InstructBLIP checkpoint dir for 'vit', weights file (or 'asset:efficientnet-lite0') for 'efficientnet'. Empty = random init."""
    image_size: int = 224
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 14
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    token_norm: bool = False
    """Normalise each encoder token (parameter-free LayerNorm) before the Q-Former reads it. For encoders
    whose output is not already layer-normed (EfficientNet); InstructBLIP's ViT ends in a LayerNorm."""


@dataclass
class QFormerArgs:
    num_query_tokens: int = 32
    path: str = ""
    """Local InstructBLIP checkpoint dir to load the Q-Former (+ query tokens, projection if shapes fit). Empty = random."""
    bert_init: str = ""
    """Local BERT dir (or 'asset:minilm-l6') to initialise the Q-Former's text/self-attention weights, as InstructBLIP did."""
    tokenizer: str = ""
    """Tokenizer for the instruction fed to the Q-Former (BERT vocab). Empty = the `path`/`bert_init` dir's tokenizer."""
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    max_instruction_len: int = 32


@dataclass
class LLMArgs:
    path: str = ""
    """Local causal-LM directory (Llama/Vicuna layout) or 'asset:smollm2-135m-instruct'. Empty = random tiny Llama from the sizes below."""
    tokenizer: str = ""
    """Tokenizer dir when `path` is empty (random base), e.g. 'asset:tiny-tokenizer'."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    init_std: float = 0.02
    """Init std of a random base. Tiny presets use a larger one: at 0.02 a 64-wide frozen LM head caps logits near +-1."""
    attn_implementation: str = "sdpa"
    """'sdpa' or 'flash_attention_2' (used only when flash-attn is installed; otherwise sdpa with a warning)."""


@dataclass
class LoRAArgs:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps runs bit-reproducible across layouts."""
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    """Linear layers of the expert base that get adapters (the paper's FFN placement by default)."""


@dataclass
class LearnedRouterArgs:
    """The learned Instruction Router (`model.router=learned`, docs/router.md). Per expert: a small MLP
    over [mean visual prefix | mean instruction embedding] that writes `soft_tokens` prompt vectors in the
    LLM's embedding space (after the visual prefix, before the template prompt) and one VQA route logit."""

    soft_tokens: int = 4
    """Soft-prompt vectors per expert (0 = no soft prompts: only the VQA route head is learned)."""
    hidden: int = 64
    """Width of each expert's router MLP."""
    route_loss_weight: float = 1.0
    """Weight of the VQA route head's cross-entropy (target: the expert with the lowest answer loss) in the Stage II loss."""


@dataclass
class ModelArgs:
    vision: VisionArgs = field(default_factory=VisionArgs)
    qformer: QFormerArgs = field(default_factory=QFormerArgs)
    llm: LLMArgs = field(default_factory=LLMArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    experts: list[str] = field(default_factory=lambda: ["theme", "objects", "relations"])
    """Expert names, in caption-composition order. The template router knows theme/objects/relations."""
    expert_parts: dict[str, list[str]] = field(default_factory=dict)
    """Which caption parts (theme, objects, relations) each expert's Stage II target joins, in order, e.g.
    {theme: [theme], content: [objects, relations]} for 2 experts. Empty: each expert reads the part of its own name."""
    router: str = "template"
    """Instruction Router: 'none' (every expert gets the user's instruction; VQA goes to the first expert),
    'template' (fixed per-expert prompts; VQA routed by question type, else keywords) or 'learned'
    (template prompts + trained soft prompts and a trained VQA route head; docs/router.md)."""
    learned_router: LearnedRouterArgs = field(default_factory=LearnedRouterArgs)
    prefix_norm: bool = False
    """RMS-normalise each visual prefix token (after the projection) to the mean RMS of the LLM's word
    embeddings (a constant of the frozen base): the prefix enters the LLM at the scale of its tokens."""
    max_prompt_len: int = 48
    max_target_len: int = 96
    train_qformer_stage2: bool = False
    """Also train Q-Former + projection in Stage II (off by default, as in the paper)."""
    gradient_checkpointing: bool = False


@dataclass
class DataArgs:
    train_shards: str = "data/shards/sample/train-*.tar"
    """Webdataset shard pattern(s) (brace/glob, or a directory of shards). Several patterns separated by ' :: '."""
    val_shards: str = "data/shards/sample/val-*.tar"
    num_workers: int = 0
    shuffle_buffer: int = 200
    caption_source: str = "caption"
    """'caption': train on each sample's caption; 'references': on one of its human references, drawn per
    step (UCM/Sydney/RSICD have 5 per image: 5x the caption text; Stage II splits the one drawn)."""
    vqa_prob: float = 0.0
    """Probability that a sample with QA trains one question: Stage I instead of its caption; Stage II
    in addition to its sub-captions, on the expert the router picks (keeps the experts answering)."""
    vqa_sampling: str = "question"
    """Which of a sample's questions a VQA row trains: 'question' (uniform over its questions, so a type
    trains as often as it is asked: the bundled RSVQA-LR images have one rural/urban question each among ~100
    presence, count and comparison ones) or 'type' (one of the sample's question types uniformly, then one
    question of that type)."""
    feature_cache: str | bool = "off"
    """Keep what the frozen visual side computed, so later epochs skip it: 'off', 'memory' (this process's
    host RAM) or a directory (shared by the ranks and runs that point at it; use node-local disk, e.g.
    '$SLURM_TMPDIR/rsmoe-cache'). Stage I caches the vision encoder's tokens per image, Stage II the visual
    prefix per (image, instruction); keys cover the weights, preprocessing and instruction (rsmoe.io.feature_cache).
    YAML's `off`/`false` mean 'off'. Off by default: it pays only from the second pass over an image, and it costs memory or disk that
    the user must size (RS-MoE-1B, bf16: 0.69 MiB per image for the ViT-g tokens, 0.125 MiB per prefix)."""
    feature_cache_gb: float = 16.0
    """Size limit of the feature cache in GiB: per process for 'memory', for the whole directory otherwise.
    When reached, new entries are not stored (no eviction); the run goes on computing them."""


@dataclass
class OptimArgs:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0 = off)."""
    visual_lr_scale: float = 1.0
    """Learning rate of the visual side (Q-Former, queries, projection) = lr x this; the adapters use lr.
    A Q-Former initialised from a text BERT and a fresh projection start far from where they must go."""
    adapter_delay_steps: int = 0
    """The adapters' learning rate is 0 for this many first steps (then their own warmup and cosine over
    the rest); the visual side trains from step 0. With the LLM still frozen, the loss falls only through
    the visual prefix, so the Q-Former must carry the image before LoRA can learn the captions' language
    prior (BLIP-2's frozen-LLM alignment, as a warm-up). Needs a trainable visual side (Stage I)."""


@dataclass
class TrainLoopArgs:
    steps: int = 100
    """Optimizer steps in this stage."""
    micro_batch_size: int = 2
    """Samples per rank per micro-step (Stage II: each sample becomes one row per expert)."""
    grad_accum: int = 1
    precision: str = "auto"
    """'fp32', 'bf16', or 'auto' (bf16 on GPU, fp32 on CPU)."""
    log_every: int = 5
    eval_every: int = 50
    """Write sample generations to TensorBoard every N steps (0 = only at the end)."""
    num_eval_samples: int = 4
    max_new_tokens: int = 48
    loss_normalisation: str = "token"
    """'token': each expert's loss is the mean over all its target tokens in the batch (a 200-word caption
    outweighs a 10-word one 20 to 1); 'sample': each sample's mean token loss, then the mean over samples."""
    itc_weight: float = 0.0
    """Stage I: weight of an image-text contrastive term (BLIP-2's ITC, in-batch) between each caption
    row's visual prefix and its caption's word embeddings (RSMoE.itc_loss; no new parameters). 0 = off.
    Logged as loss/itc. It keeps the images' prefixes apart, which the caption loss alone does not do."""
    itc_questions: bool = False
    """Stage I, with itc_weight > 0: the question rows (data.vqa_prob) join the contrastive term too, each
    prefix (built by the Q-Former from the question) paired with its sample's caption, so a question's
    prefix also tells its image apart. Off: only caption rows are contrasted."""
    itc_bank: int = 256
    """Recent caption vectors the contrastive term also contrasts each image with, beyond its micro-batch
    (a micro-batch of 4 gives 3 negatives). Per rank, not saved in checkpoints (refills after a resume)."""
    length_groups: int = 1
    """Run each micro-batch's LLM rows as this many sub-batches of similar length, each padded only to its
    own longest row (1 = one batch padded to the batch's longest row). Same loss (each row's loss is the
    same function of its tokens; float rounding aside), fewer padded positions computed: bench/padding.py
    measures the share on your data (demo sample, CPU: Stage I 1.12-1.34x with 2, Stage II ~1.0-1.1x).
    Capped at the rows every rank is sure to have (Stage I: the micro batch; Stage II: the experts on the
    rank), so every rank makes the same number of LLM calls (ZeRO-3)."""
    nan_tolerance: int = 3
    """Stop after this many consecutive non-finite losses (each is skipped with a warning)."""
    stop_after_steps: int = 0
    """Stop as if preempted (checkpoint, exit) once this many steps are done (0 = off): time-boxed jobs, tests."""


@dataclass
class CheckpointArgs:
    every: int = 50
    """Save every N steps (and always at the end; 0 = only at the end)."""
    keep: int = 2
    """Keep the newest N step checkpoints."""
    resume: bool = True
    """Resume from `<run_dir>/checkpoints/latest` when it exists."""
    lock: bool = True
    """One job per run directory (`<run_dir>/LOCK`): a second job on a directory a live job holds stops at once."""
    lock_stale_s: float = 120.0
    """A lock whose holder is on another host and has not refreshed it for this long is stale (node lost)."""
    lock_wait_s: float = 300.0
    """A requeued SLURM job waits this long for its previous attempt to release the lock."""


@dataclass
class DistributedArgs:
    ep: int = 1
    """Expert-parallel size: world = ep * dp; each EP rank holds n_experts/ep experts (Stage II)."""
    backend: str = "auto"
    """'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    zero_stage: int = -1
    """Override the DeepSpeed config's ZeRO stage (-1 = keep the file's)."""


@dataclass
class TrainArgs:
    stage: int = 1
    """1 = dense (Q-Former + projection + one LoRA), 2 = MoE (experts' LoRA from a Stage I run)."""
    run_dir: str = "runs/default/stage1"
    init_from: str = ""
    """Stage II: the Stage I run directory whose final checkpoint initialises every expert."""
    stage2_init: str = "stage1"
    """Stage II's starting point: 'stage1' (the finished Stage I run in `init_from`) or 'untrained' (no
    Stage I: the model as built from the config; the one-stage ablation arm, usually with
    model.train_qformer_stage2=true)."""
    seed: int = 42
    deepspeed_config: str = "ds_configs/zero2.json"
    """ZeRO/offload/communication JSON; batch sizes, precision and optimizer come from this config."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainLoopArgs = field(default_factory=TrainLoopArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage dotted overrides applied when `stage` matches, e.g. {'2': {'optim.lr': 2e-4}} (YAML presets only)."""


@dataclass
class GenerationArgs:
    """Decoding settings (greedy by default; every expert of a call shares them)."""

    max_new_tokens: int = 48
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    synced_gpus: bool | None = None
    """True: keep stepping until every rank is done (ZeRO-3 shards weights over ranks). None: transformers decides."""
