"""Evaluation: caption metrics, VQA accuracy (RSVQA protocols), class-mention accuracy, bootstrap
intervals (paired for the image-grounding control, rsmoe.eval.grounding), reports.

See docs/evaluation.md for the metric definitions, answer normalisation and protocols.
"""

from .bootstrap import (
    bootstrap_bleu_ci,
    bootstrap_ci,
    bootstrap_cider_ci,
    bootstrap_mean_ci,
    caption_intervals,
    paired_caption_intervals,
    paired_cluster_intervals,
    rsvqa_average_ci,
    vqa_intervals,
)
from .caption_metrics import (
    CaptionScores,
    java_status,
    score_captions,
    simple_ptb_tokenize,
    spice_status,
)
from .class_mention import class_mention, first_class_mentioned
from .report import caption_section, vqa_section, write_report
from .vqa_metrics import (
    canonical_type,
    count_bucket,
    normalize_answer,
    rsvqa_protocol,
    vqa_accuracy,
)

__all__ = [
    "CaptionScores",
    "bootstrap_bleu_ci",
    "bootstrap_ci",
    "bootstrap_cider_ci",
    "bootstrap_mean_ci",
    "canonical_type",
    "caption_intervals",
    "caption_section",
    "class_mention",
    "count_bucket",
    "first_class_mentioned",
    "java_status",
    "normalize_answer",
    "paired_caption_intervals",
    "paired_cluster_intervals",
    "rsvqa_average_ci",
    "rsvqa_protocol",
    "score_captions",
    "simple_ptb_tokenize",
    "spice_status",
    "vqa_accuracy",
    "vqa_intervals",
    "vqa_section",
    "write_report",
]
