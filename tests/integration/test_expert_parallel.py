"""Expert parallelism (Stage II, ep > 1) is exactly one process holding all experts.

Each layout runs through the real launcher (gloo, fp32) and is compared with a plain-torch,
single-process reference that holds every expert and replays the same data: per DP shard d the
loader of rank d, the instruction RNG of (step, micro, d); loss = mean over DP replicas of each
replica's per-expert token mean, gradient accumulation 2, global-norm clipping (clip_grad small
enough that every step clips), torch AdamW + the same LR schedule. Compared: per-expert losses and
the logged (pre-clip) grad norm at every step, and the final adapters (relative tolerance 1e-5).

Adam runs with eps=1e-2 (lr=0.1) here. At eps=1e-8 Adam divides each gradient entry by its own size,
so entries that are ~0 become full lr-sized steps whose sign is float-rounding noise: perturbing the
reference's gradients alone by 1e-7 x max|g| moves its final adapters by 7e-3 (relative), so no two
runs that batch rows differently can agree to 1e-5, and per-entry normalisation also hides the clip
scale. With eps=1e-2 the same perturbation moves them by 1.5e-6 and the update is ~linear in the
gradient, so a wrong clip (each rank clipping by its own experts' norm) changes the adapters by >100%.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft.utils import load_peft_weights
from safetensors.torch import load_file

from rsmoe.config import load_config
from rsmoe.distributed.layout import ParallelLayout
from tests.helpers import REPO, free_port, launch

RTOL = 1e-5
CLIP = 0.05  # the tiny model's first-step grad norms are ~2: every step clips
TWO = ["theme", "objects"]
THREE = ["theme", "objects", "relations"]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def stage1(sample_shards, tmp_path_factory) -> Path:
    """A finished Stage I run (single process, in-process), shared by every layout below."""
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.training.loop import train

    run = tmp_path_factory.mktemp("ep") / "stage1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASTER_PORT", str(free_port()))
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            mp.delenv(k, raising=False)
        try:
            train(load_config("tiny", [f"data.train_shards={sample_shards['train']}", f"run_dir={run}",
                                       f"deepspeed_config={REPO}/ds_configs/zero2.json",
                                       "train.steps=2", "train.num_eval_samples=0"]))
        finally:
            shutdown_distributed()
    return run


def stage2_overrides(sample_shards, stage1: Path, experts: list[str], steps: int) -> list[str]:
    return [f"data.train_shards={sample_shards['train']}", f"data.val_shards={sample_shards['val']}",
            "stage=2", f"init_from={stage1}", f"model.experts=[{','.join(experts)}]", f"train.steps={steps}",
            "train.grad_accum=2", f"optim.clip_grad={CLIP}", "optim.eps=1e-2", "optim.lr=0.1",
            "train.log_every=1", "train.num_eval_samples=0"]


def launch_stage2(overrides: list[str], run_dir: Path, ds_json: str, nproc: int, ep: int):
    cli = ["--config", "tiny", "--deepspeed", ds_json, "--run-dir", str(run_dir), f"distributed.ep={ep}",
           *[o for o in overrides if not o.startswith(("stage=", "init_from="))]]
    init = next(o.split("=", 1)[1] for o in overrides if o.startswith("init_from="))
    return launch(["--stage", "2", "--init-from", init, *cli], nproc=nproc, timeout=600)


def reference(overrides: list[str], dp: int, clip_blocks: list[list[int]] | None = None) -> dict:
    """One process holding every expert, replaying dp data shards. `clip_blocks`: clip each block of
    experts by its own norm instead of the global one (what a rank-local clip would do)."""
    from rsmoe.training.builders import build_stage_model, build_train_loader
    from rsmoe.training.engine import build_optimizer

    args = load_config("tiny", overrides)
    n = len(args.model.experts)
    model, processor, ids = build_stage_model(args, ParallelLayout(n, 1, 1, 0))
    assert ids == list(range(n))
    layers = list(model.experts.lora_layers.values())
    params = [p for p in model.parameters() if p.requires_grad]  # the adapters (+ the learned router)
    opt, sched = build_optimizer(params, args)
    loaders = [iter(build_train_loader(args, ParallelLayout(n, 1, dp, d))) for d in range(dp)]
    gas = args.train.grad_accum
    losses, norms, routes = [], [], []
    for step in range(args.train.steps):
        loss_sum, tokens = torch.zeros(n), torch.zeros(n)
        route = torch.zeros(2, dtype=torch.float64)  # learned router: sum of CE x questions, questions
        for micro in range(gas):
            for d in range(dp):
                rng = random.Random(f"{args.seed}/{step}/{micro}/{d}")
                out = model(**processor.stage2_inputs(next(loaders[d]), rng, ids, args.data.vqa_prob))
                (out["loss"] / (gas * dp)).backward()
                loss_sum += out["expert_loss_sum"].detach()
                tokens += out["expert_tokens"]
                if "route_loss" in out:
                    route += torch.tensor([float(out["route_loss"]) * float(out["route_questions"]), float(out["route_questions"])],
                                          dtype=torch.float64)
        losses.append(loss_sum / tokens)  # what is logged: the token-weighted mean of the step (log_every=1)
        routes.append(float(route[0] / route[1]) if route[1] else None)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        if clip_blocks is None:
            torch.nn.utils.clip_grad_norm_(params, args.optim.clip_grad)  # the global norm, as one process
        else:
            with torch.no_grad():
                for block in clip_blocks:
                    sq = sum(float(l.lora_A.grad[block].pow(2).sum() + l.lora_B.grad[block].pow(2).sum()) for l in layers)
                    coef = min(1.0, args.optim.clip_grad / (sq**0.5 + 1e-6))
                    for l in layers:
                        l.lora_A.grad[block] *= coef
                        l.lora_B.grad[block] *= coef
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
    adapters = {args.model.experts[s]: model.experts.adapter_state(s) for s in range(n)}
    router = {args.model.experts[s]: model.router.slot_state(s) for s in range(n)} if model.router is not None else None
    return {"losses": losses, "norms": norms, "adapters": adapters, "names": list(args.model.experts), "routes": routes,
            "router": router}


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def assert_matches(run_dir: Path, ref: dict) -> float:
    """Per-expert losses + grad norm at every step, and the final adapters; returns the worst adapter error."""
    rows = metrics(run_dir)
    assert sorted(rows) == list(range(1, len(ref["losses"]) + 1))
    for step, (want, norm) in enumerate(zip(ref["losses"], ref["norms"]), start=1):
        assert norm > CLIP, "clipping must be active for this test to mean anything"
        # An expert with no target token in the step has no logged loss (not a 0); the reference gives NaN.
        got = torch.tensor([rows[step].get(f"loss/{e}", float("nan")) for e in ref["names"]])
        present = ~torch.isnan(want)
        assert torch.equal(~torch.isnan(got), present), (step, got, want)
        assert torch.allclose(got[present], want[present], rtol=RTOL, atol=0), (step, got, want)
        assert rows[step]["optim/grad_norm"] == pytest.approx(norm, rel=RTOL), step  # the global norm
    loss_err = max(rel_err(torch.tensor([rows[s + 1][f"loss/{e}"] for e in ref["names"] if f"loss/{e}" in rows[s + 1]]),
                           want[~torch.isnan(want)]) for s, want in enumerate(ref["losses"]))
    worst = 0.0
    for e, want in ref["adapters"].items():
        # peft's saved names (base_model.model.<path>.lora_A.weight) -> ExpertLM.adapter_state's (<path>.lora_A)
        saved = load_peft_weights(str(run_dir / "final" / "adapters" / e), device="cpu")
        got = {k.removeprefix("base_model.model.").removesuffix(".weight"): v for k, v in saved.items()}
        assert got.keys() == want.keys()
        for k in want:
            worst = max(worst, rel_err(got[k], want[k]))
    if ref["router"] is not None:  # the learned router: route loss at every step, each expert's router at the end
        assert any(r is not None for r in ref["routes"]), "no question rows: the route head was not exercised"
        for step, want in enumerate(ref["routes"], start=1):
            if want is not None:
                assert rows[step]["route/loss"] == pytest.approx(want, rel=RTOL), step
        for e, want in ref["router"].items():
            got = load_file(run_dir / "final" / "router" / f"{e}.safetensors")
            assert got.keys() == want.keys()
            assert want["w_route"].abs().sum() > 0, f"{e}: the route head did not train"
            for k in want:
                worst = max(worst, rel_err(got[k], want[k]))
    print(f"{run_dir.name}: {len(rows)} steps, max rel. error per-expert loss {loss_err:.1e}, final adapters {worst:.1e}")
    assert worst <= RTOL, worst
    return worst


def ds_json(tmp_path: Path, stage: int, **zero) -> str:
    cfg = json.loads(Path(REPO, "ds_configs", f"zero{stage}.json").read_text())
    cfg["zero_optimization"].update(zero)
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# ---------------------------------------------------------------- layouts vs one process


def test_ep2_dp1_zero3_equals_one_process_and_generates(sample_shards, stage1, tmp_path):
    """2 ranks, one expert each, ZeRO-3; sample generations mid-run and at the end (must not hang)."""
    ov = stage2_overrides(sample_shards, stage1, TWO, steps=3)
    run = tmp_path / "ep2"
    out = launch_stage2(ov + ["train.num_eval_samples=2", "train.eval_every=2"], run, "ds_configs/zero3.json", 2, 2)
    assert "stage 2 done: 3 steps" in out.stderr
    ref = reference(ov, dp=1)
    worst = assert_matches(run, ref)
    # A rank-local clip (each rank's own experts' norm) lands far outside the tolerance: the test has teeth.
    local = reference(ov, dp=1, clip_blocks=[[0], [1]])
    far = max(rel_err(local["adapters"][e][k], ref["adapters"][e][k]) for e in TWO for k in ref["adapters"][e])
    assert far > 100 * max(worst, RTOL), far
    # The generations saw every expert: the composed sample is logged by rank 0 with both experts' text.
    assert "step 2 sample:" in out.stderr and "step 3 sample:" in out.stderr


def test_ep2_dp1_zero2_resumed_equals_one_process_and_loads_in_one_process(sample_shards, stage1, tmp_path):
    """Stopped after 2 of 4 steps and resumed with ep=2: every step (and the end) equals one uninterrupted
    process. The experts, each written by the rank holding it, load into one single-process model."""
    from rsmoe.config import GenerationArgs
    from rsmoe.data.processor import Processor
    from rsmoe.inference.generate import caption
    from rsmoe.io.model_dir import load_finished_stage
    from rsmoe.models.build import build_model

    ov = stage2_overrides(sample_shards, stage1, TWO, steps=4)
    run = tmp_path / "ep2"
    launch_stage2(ov + ["train.stop_after_steps=2"], run, "ds_configs/zero2.json", 2, 2)
    tag = run / "checkpoints" / "step00000002"
    assert sorted(p.name for p in tag.glob("experts-*")) == ["experts-objects", "experts-theme"]
    for block in ("experts-objects", "experts-theme"):  # one DeepSpeed state per expert block
        assert (tag / block / "state" / "mp_rank_00_model_states.pt").exists()
    launch_stage2(ov, run, "ds_configs/zero2.json", 2, 2)
    ref = reference(ov, dp=1)
    assert_matches(run, ref)

    args = load_config("tiny", ov)
    model, llm_tok, q_tok = build_model(args.model, seed=args.seed)
    load_finished_stage(run / "final", model, load_config("tiny", ov + ["stage=2"]))
    for slot, e in enumerate(TWO):
        for k, v in model.experts.adapter_state(slot).items():
            assert rel_err(v, ref["adapters"][e][k]) <= RTOL, (e, k)
    assert model.expert_names == TWO
    proc = Processor(llm_tok, q_tok, TWO, args.model.max_prompt_len, args.model.max_target_len,
                     args.model.qformer.max_instruction_len)
    res = caption(model, proc, torch.zeros(1, 3, 64, 64), gen=GenerationArgs(max_new_tokens=4))
    assert set(res[0]["experts"]) == set(TWO)


def test_ep2_dp2_zero3_partitioned_equals_one_process_over_two_shards(sample_shards, stage1, tmp_path):
    """4 ranks: 2 experts x 2 data-parallel replicas; ZeRO-3 with nothing persistent, so every weight is
    really partitioned within its expert-DP group. Generations at the end run under ZeRO-3 too."""
    ov = stage2_overrides(sample_shards, stage1, TWO, steps=3)
    run = tmp_path / "ep2dp2"
    z3 = ds_json(tmp_path, 3, stage3_param_persistence_threshold=0)
    out = launch_stage2(ov + ["train.num_eval_samples=2"], run, z3, 4, 2)
    assert "world 4 = ep 2 x dp 2" in out.stderr
    assert_matches(run, reference(ov, dp=2))


def test_ep3_three_experts_three_ranks(sample_shards, stage1, tmp_path):
    """3 ranks, one expert each; batch 2 over 3 EP ranks exercises the padded visual slice, and question
    rows (vqa_prob) prefixes that share their image with a caption prefix."""
    ov = stage2_overrides(sample_shards, stage1, THREE, steps=3) + ["data.vqa_prob=0.5"]
    run = tmp_path / "ep3"
    launch_stage2(ov, run, "ds_configs/zero2.json", 3, 3)
    assert_matches(run, reference(ov, dp=1))


def test_ep2_dp2_zero3_learned_router_equals_one_process(sample_shards, stage1, tmp_path):
    """The learned router under expert parallelism: each EP rank trains its experts' routers, the route head's
    targets and logits are gathered over the EP group; 2 experts x 2 DP replicas, ZeRO-3 with nothing
    persistent (the routers really partitioned in their expert-DP group). Same per-expert and route losses,
    grad norms, adapters and routers as one process."""
    ov = stage2_overrides(sample_shards, stage1, TWO, steps=3) + ["model.router=learned", "data.vqa_prob=0.6"]
    run = tmp_path / "ep2dp2-learned"
    z3 = ds_json(tmp_path, 3, stage3_param_persistence_threshold=0)
    out = launch_stage2(ov, run, z3, 4, 2)
    assert "world 4 = ep 2 x dp 2" in out.stderr
    assert_matches(run, reference(ov, dp=2))


# ---------------------------------------------------------------- errors, before any heavy work


