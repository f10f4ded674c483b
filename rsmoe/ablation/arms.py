"""The paper's ablation arms (docs/ablation.md): what each one changes relative to the reference model.

Every arm trains and evaluates on the same data, with the same seed and the same evaluation options;
an arm differs from the reference only by the Stage II overrides it lists. Every two-stage arm starts
from the one shared Stage I run: Stage I never depends on the router or the number of experts (it
trains one LLM on whole captions), so sharing it is exactly what running the arms separately would do.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arm:
    name: str
    """Directory name under the ablation folder, and the id used by --arms."""
    title: str
    """The arm in the table."""
    factor: str
    """Which paper claim it tests: 'reference', 'training', 'router' or 'experts'."""
    overrides: tuple[str, ...] = ()
    """Dotted Stage II overrides (on top of the preset and the ablation's own overrides)."""
    two_stage: bool = True
    """False: Stage II starts without Stage I (stage2_init=untrained) and gets Stage I's steps as well."""
    experts: tuple[str, ...] = field(default=("theme", "objects", "relations"))


REFERENCE = "full"

ARMS: tuple[Arm, ...] = (
    Arm(REFERENCE, "two-stage, template router, 3 experts (reference)", "reference"),
    # The paper's one-stage arm trained the MoE directly from natural-image weights. Here: no Stage I,
    # Stage II trains the experts *and* the Q-Former + projection (otherwise a random projection stays
    # frozen), for as many steps as Stage I and Stage II together.
    Arm("one-stage", "one stage (no Stage I; Q-Former trained with the experts)", "training",
        ("stage2_init=untrained", "model.train_qformer_stage2=true"), two_stage=False),
    Arm("router-none", "without router (every expert gets the instruction)", "router", ("model.router=none",)),
    Arm("router-learned", "learned router (soft prompts + learned VQA route)", "router", ("model.router=learned",)),
    # Fewer experts: the caption parts are merged in the processor (model.expert_parts). With two, the
    # image-level part (theme) stays apart from the instance-level ones (objects and their relations
    # both describe the objects and where they are).
    Arm("experts-1", "1 expert (theme + objects + relations)", "experts",
        ("model.experts=[caption]", "model.expert_parts={caption: [theme, objects, relations]}"), experts=("caption",)),
    Arm("experts-2", "2 experts (theme / objects + relations)", "experts",
        ("model.experts=[theme,objects_relations]", "model.expert_parts={objects_relations: [objects, relations]}"),
        experts=("theme", "objects_relations")),
)

BY_NAME = {a.name: a for a in ARMS}


def select(names: list[str] | None) -> list[Arm]:
    """The arms to run, in table order; `names` None = all. The reference is always included."""
    if not names:
        return list(ARMS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise KeyError(f"unknown arm(s) {unknown}; choose from {', '.join(BY_NAME)}")
    wanted = set(names) | {REFERENCE}
    return [a for a in ARMS if a.name in wanted]
