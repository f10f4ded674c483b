"""Stage II with expert parallelism (`distributed.ep > 1`): everything that differs from replicated experts.

Layout (`rsmoe.distributed.layout.ParallelLayout`): world = ep x dp. EP rank e holds the expert block
`layout.expert_block(e)` (only those adapters exist on it); the ep ranks of one EP group read the
same batch; the dp ranks holding one block form its expert-DP group.

- Visual prefix: frozen in Stage II, so each EP rank runs the vision encoder + Q-Former on 1/ep of
  the batch and the EP group all-gathers the result (`SlicedVisualPrefix`): once per sample, not ep times.
- Gradients: the engine's mpu has the expert-DP group as its data-parallel group, so adapter
  gradients are averaged - and ZeRO-2/3 partition - only among replicas of the same experts.
- Clipping: the mpu's model-parallel group is the EP group, so DeepSpeed sums the squared grad norm
  over all experts' adapters and clips with the global norm, as one process holding all experts does.
- Checkpoints: one DeepSpeed directory per expert block, `<tag>/experts-<name>[+<name>...]/state/`,
  written by that block's expert-DP group (each block's DP rank 0 writes the model file).
- Logging and sample generations: per-expert losses and generated sub-captions are gathered over the
  EP group, so rank 0 logs every expert and composes whole captions.
- Learned router (`model.router=learned`): stacked per expert like the adapters, so a rank holds and
  trains only its experts' routers (same groups, same norm). The VQA route head's target needs every
  expert's answer loss on a question: the model gathers the per-expert losses and route logits over the
  EP group (`RSMoE.expert_gather`), and each rank back-propagates its share of the cross-entropy.

Training the Q-Former in Stage II (`model.train_qformer_stage2=true`) with ep > 1 is refused: its
gradient would need a second engine reduced over the whole world (docs/design.md, parallelism); use ep=1 for that.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from rsmoe.config import ConfigError, TrainArgs
from rsmoe.distributed import collectives
from rsmoe.distributed.layout import ParallelLayout
from rsmoe.models.compose import compose_caption

log = logging.getLogger(__name__)

SUBDIR_PREFIX = "experts-"


class SlicedVisualPrefix:
    """prefix_fn for `RSMoE`: this EP rank's slice of the batch through the frozen visual side, then
    an all-gather over the EP group. A batch that does not divide by ep is padded by repeating its
    last sample, so every rank runs the same shapes (ZeRO-3 expects the same module trace everywhere)."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def __call__(self, visual: nn.Module, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor,
                 qformer_attention_mask: torch.Tensor, prefix_image: torch.Tensor | None = None) -> torch.Tensor:
        part = self._local(visual, pixel_values, qformer_input_ids, qformer_attention_mask, prefix_image)
        return collectives.all_gather_cat(part, self.group)[: qformer_input_ids.shape[0]]

    def _local(self, visual: nn.Module, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor,
               qformer_attention_mask: torch.Tensor, prefix_image: torch.Tensor | None) -> torch.Tensor:
        """This rank's prefixes: ceil(P/ep) of them, from rank * ceil(P/ep), the tail padded with prefix P-1;
        the images they read go through the vision encoder once each."""
        p = qformer_input_ids.shape[0]
        per = -(-p // self.size)
        idx = torch.arange(self.rank * per, (self.rank + 1) * per, device=qformer_input_ids.device).clamp(max=p - 1)
        images = idx if prefix_image is None else prefix_image[idx]
        needed, image_index = torch.unique(images, return_inverse=True)
        with torch.no_grad():  # frozen (train_qformer_stage2 with ep > 1 is refused)
            return visual(pixel_values[needed], qformer_input_ids[idx], qformer_attention_mask[idx], image_index).contiguous()


class ExpertParallel:
    """What the training loop asks about the expert layout. With ep == 1 (or Stage I) every method is
    the identity / a no-op, so the loop calls them unconditionally."""

    def __init__(self, args: TrainArgs, layout: ParallelLayout):
        self.layout = layout
        self.all_names = list(args.model.experts)
        self.enabled = args.stage == 2 and layout.ep_enabled
        if self.enabled and args.model.train_qformer_stage2:
            raise ConfigError(
                f"model.train_qformer_stage2=true cannot be combined with distributed.ep={layout.ep}: "
                "expert parallelism keeps the visual side frozen. Use distributed.ep=1 (replicated experts) "
                "to train the Q-Former in Stage II"
            )

    @property
    def local_names(self) -> list[str]:
        return [self.all_names[i] for i in self.layout.local_expert_ids(2)]

    def logged_names(self, model) -> list[str]:
        """Names of the per-expert losses the loop logs (after `all_expert_losses`)."""
        return self.all_names if self.enabled else list(model.expert_names)

    # ------------------------------------------------------------ model
    def attach(self, model) -> None:
        """Install the sliced visual prefix; mark the adapters as the model-parallel part of the model."""
        if not self.enabled:
            return
        per_expert = list(model.experts.lora_parameters())
        if getattr(model, "router", None) is not None:
            # The learned router is stacked per expert like the adapters: each EP rank holds (and trains)
            # its own experts' routers, so the same expert-DP reduction and EP-wide norm apply.
            per_expert += list(model.router.parameters())
            group = self.layout.group("ep")
            model.expert_gather = lambda t: collectives.all_gather_cat(t, group)  # EP rank e = block e: expert order
        mine = {id(p) for p in per_expert}
        others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
        if others:  # their gradient would be averaged over the expert-DP group only, and norm-counted ep times
            raise RuntimeError(f"expert parallelism trains only the experts' adapters and routers, but these also train: {others[:5]}")
        sliced = SlicedVisualPrefix(self.layout.group("ep"), self.layout.ep, self.layout.ep_rank)
        if model.prefix_fn is None:
            model.prefix_fn = sliced
        elif hasattr(model.prefix_fn, "stack_inner"):
            # The feature cache (data.feature_cache) stays outermost: the EP group agrees on its misses,
            # which then go through the sliced prefix (rsmoe.io.feature_cache.FeatureCache).
            model.prefix_fn.stack_inner(sliced, self.layout.group("ep"))
        else:
            raise RuntimeError(f"expert parallelism cannot stack on the model's prefix_fn {model.prefix_fn!r}")
        for p in per_expert:
            # Different on every EP rank: DeepSpeed counts such parameters on every model-parallel rank.
            p.model_parallel = True
        log.info("expert parallel: ep %d x dp %d, this rank holds %s; visual prefix on 1/%d of each batch",
                 self.layout.ep, self.layout.dp, self.local_names, self.layout.ep)

    # ------------------------------------------------------------ checkpoints
    @property
    def ckpt_subdirs(self) -> list[str] | None:
        """Per-engine subdirectory of a checkpoint tag (None = DeepSpeed's files directly in the tag)."""
        return [SUBDIR_PREFIX + "+".join(self.local_names)] if self.enabled else None

    def check_checkpoint(self, tag_dir: Path | None) -> None:
        """A clear error when the checkpoint to resume was written with another expert layout."""
        if tag_dir is None or not tag_dir.exists():
            return
        blocks = sorted(p.name for p in tag_dir.iterdir() if p.is_dir() and p.name.startswith(SUBDIR_PREFIX))
        expected = self.ckpt_subdirs
        ok = (not blocks) if expected is None else (expected[0] in blocks and len(blocks) == self.layout.ep)
        if not ok:
            written = f"expert blocks {blocks}" if blocks else "replicated experts (ep=1)"
            raise ConfigError(
                f"checkpoint {tag_dir} was written with {written}, but this run has distributed.ep={self.layout.ep} "
                f"over {self.layout.world_size} ranks; resume with the layout it was written with, or start a new "
                "run (its experts load from the run's final/ directory once finished)"
            )

    # ------------------------------------------------------------ metrics
    def all_expert_losses(self, local: torch.Tensor) -> torch.Tensor:
        """(n_local,) losses of this rank's experts -> (n_experts,) in expert order (collective)."""
        if not self.enabled:
            return local
        return collectives.all_gather_cat(local, self.layout.group("ep"))  # EP rank e holds block e: expert order

    def sum_over_ep(self, value: torch.Tensor) -> torch.Tensor:
        """A per-rank count (tokens) summed over the EP group (collective)."""
        if not self.enabled:
            return value
        return collectives.all_sum(value, self.layout.group("ep"))

    def merge_generations(self, results: list[dict]) -> list[dict]:
        """caption() results for this rank's experts -> results with every expert (collective)."""
        if not self.enabled:
            return results
        gathered = collectives.all_gather_object([(r["experts"], r["truncated"]) for r in results], self.layout.group("ep"))
        merged = []
        for i in range(len(results)):
            parts, truncated = {}, set()
            for block in gathered:
                parts.update(block[i][0])
                truncated.update(block[i][1])
            parts = {n: parts[n] for n in self.all_names}
            cut = [n for n in self.all_names if n in truncated]
            merged.append({"experts": parts, "caption": compose_caption(parts, self.all_names, cut), "truncated": cut})
        return merged
