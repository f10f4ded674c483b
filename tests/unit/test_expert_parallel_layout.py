"""Expert parallelism without a launcher: the layout's checks, refusals, and the sliced visual prefix
(the multi-rank equivalence runs are in tests/integration/test_expert_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from rsmoe.config import ConfigError, load_config
from rsmoe.distributed.layout import ParallelLayout
from tests.helpers import REPO


def test_layout_errors_are_clear():
    with pytest.raises(ConfigError, match="3 experts cannot be split over ep=2"):
        ParallelLayout(n_experts=3, ep=2, world_size=2, rank=0)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of ep=2"):
        ParallelLayout(n_experts=2, ep=2, world_size=3, rank=0)
    lay = ParallelLayout(n_experts=4, ep=2, world_size=4, rank=3)
    assert (lay.ep_rank, lay.dp_rank, lay.local_expert_ids(2)) == (1, 1, [2, 3])
    assert lay.expert_dp_ranks(1) == [1, 3] and lay.ep_group_ranks(1) == [2, 3]
    with pytest.raises(ConfigError, match="cannot be split over ep=2"):
        load_config("tiny", ["stage=2", "distributed.ep=2"])  # 3 experts by default


def test_train_qformer_with_ep_is_refused():
    from rsmoe.distributed.expert_parallel import ExpertParallel

    args = load_config("tiny", ["stage=2", "distributed.ep=2", "model.experts=[theme,objects]",
                                "model.train_qformer_stage2=true"])
    with pytest.raises(ConfigError, match="train_qformer_stage2=true cannot be combined with distributed.ep=2"):
        ExpertParallel(args, ParallelLayout(2, 2, 2, 0))


def test_resume_with_another_expert_layout_is_refused(tmp_path):
    from rsmoe.distributed.expert_parallel import ExpertParallel

    tag = tmp_path / "step00000002"
    (tag / "experts-theme").mkdir(parents=True)
    (tag / "experts-objects").mkdir()
    two = ["stage=2", "model.experts=[theme,objects]"]
    ExpertParallel(load_config("tiny", two + ["distributed.ep=2"]), ParallelLayout(2, 2, 2, 1)).check_checkpoint(tag)
    with pytest.raises(ConfigError, match=r"written with expert blocks .* this run has distributed.ep=1"):
        ExpertParallel(load_config("tiny", two), ParallelLayout(2, 1, 2, 0)).check_checkpoint(tag)
    plain = tmp_path / "step00000004"
    plain.mkdir()
    with pytest.raises(ConfigError, match=r"written with replicated experts \(ep=1\)"):
        ExpertParallel(load_config("tiny", two + ["distributed.ep=2"]), ParallelLayout(2, 2, 2, 0)).check_checkpoint(plain)


def test_world_not_a_multiple_of_ep_fails_in_one_line(tiny_runs, tmp_path, dist_env, capsys):
    from rsmoe import cli

    assert cli.main(["train", "--config", "tiny", "--stage", "2", "--run-dir", str(tmp_path / "s2"), "--init-from",
                     str(tiny_runs["stage1"]), "--deepspeed", f"{REPO}/ds_configs/zero2.json", "distributed.ep=2",
                     "model.experts=[theme,objects]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsmoe train: error:") and "world size 1 is not a multiple of ep=2" in err and err.count("\n") == 1


@pytest.mark.parametrize("batch,ep,shared", [(4, 2, False), (5, 2, False), (2, 3, False), (5, 2, True), (4, 3, True)])
def test_sliced_visual_prefix_runs_each_sample_once_per_ep_group(monkeypatch, batch, ep, shared):
    """Each EP rank's visual forward sees only its slice (ceil(P/ep) prefixes; the last rank's padding
    repeats a prefix), and the gathered prefix is the full-batch prefix. With `shared`, prefixes read
    images through prefix_image (a question prefix beside the caption prefix of its image): a rank
    encodes each image its slice needs once. The all-gather is simulated: rank r's peers run the same
    code on their slices."""
    from rsmoe.distributed import collectives
    from rsmoe.distributed.expert_parallel import SlicedVisualPrefix

    torch.manual_seed(0)
    proj = torch.nn.Linear(3, 4)
    seen: list[int] = []

    def visual(pixels, ids, mask, image_index=None):
        seen.append(pixels.shape[0])
        emb = pixels.mean(dim=(2, 3))
        emb = emb if image_index is None else emb[image_index]
        return proj(emb)[:, None, :] + ids[:, :1, None] * mask[:, :1, None]

    images = batch - 2 if shared else batch
    prefix_image = torch.tensor(sorted(list(range(images)) + [0, images - 1])) if shared else None
    pixels, ids, mask = torch.randn(images, 3, 2, 2), torch.randint(0, 5, (batch, 6)), torch.ones(batch, 6)
    full = visual(pixels, ids, mask, prefix_image)
    seen.clear()
    for rank in range(ep):
        def fake_gather(part, group=None, rank=rank):
            return torch.cat([part if r == rank else SlicedVisualPrefix(None, ep, r)._local(visual, pixels, ids, mask, prefix_image)
                              for r in range(ep)])

        monkeypatch.setattr(collectives, "all_gather_cat", fake_gather)
        got = SlicedVisualPrefix(None, ep, rank)(visual, pixels, ids, mask, prefix_image)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
    per = -(-batch // ep)
    img_of = prefix_image if shared else torch.arange(batch)
    expected = [len(set(img_of[torch.arange(r * per, (r + 1) * per).clamp(max=batch - 1)].tolist())) for r in range(ep)]
    # Every call (own slice or a simulated peer's) encodes the distinct images of its ceil(P/ep) prefixes.
    assert seen == [expected[r] for rank in range(ep) for r in [rank] + [q for q in range(ep) if q != rank]]
    if not shared and batch % ep == 0:
        assert expected == [per] * ep
