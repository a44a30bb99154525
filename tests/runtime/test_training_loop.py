"""The training loop users write around ``fxpar.compile``, on 2 real gloo ranks against one process:
clipping and name-based optimizer groups on a sharded plan, checkpoints (full and DCP, resumed on
the same and on another plan), tied weights, evaluation, autocast and bf16 parameters, and ranks
that fail or disagree together."""

from __future__ import annotations

import pytest
import torch

import fxpar

from . import loop_fns as f

NUM_STEPS = 3


def _close(a: dict, b: dict, **tol) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), msg=lambda m, k=k: f"{k}: {m}", **tol)


def test_clipping_and_groups_by_name_on_a_sharded_plan():
    ref_steps, ref_state = f.reference_loop(NUM_STEPS, clip=f.CLIP)
    ranks = fxpar.launch(f.clip_and_groups, 2, NUM_STEPS, f.SHARDED)
    for r in ranks:
        assert r["names"] == r["model_names"]
        assert r["layouts"]["layers.0.weight"] == ("DTensor", ["Shard(dim=0)"])
        assert r["layouts"]["layers.1.weight"] == ("DTensor", ["Shard(dim=1)"])
        assert r["layouts"]["layers.2.bias"] == ("DTensor", ["Replicate()"])
        for (loss, norm), (ref_loss, ref_norm) in zip(r["steps"], ref_steps):
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            assert norm == pytest.approx(ref_norm, rel=1e-5)  # the global norm, not this rank's
        assert min(s[1] for s in ref_steps) > f.CLIP, "the clip must be active for this test to mean anything"
        _close(r["state"], ref_state, atol=1e-5, rtol=1e-4)
    for k in ranks[0]["state"]:  # replicas agree exactly
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k


def test_checkpoint_resume_full_and_dcp(tmp_path):
    ranks = fxpar.launch(f.checkpoint_resume, 2, str(tmp_path / "ckpt"), f.SHARDED, f.OTHER_SHARDED)
    for r in ranks:
        (loss, _), state = r["resumed"]["same"]
        assert loss == r["third"][0]
        for k in state:  # resuming after 2 steps is 3 uninterrupted steps, bit for bit
            assert torch.equal(state[k], r["uninterrupted"][k]), k
        (loss, _), state = r["resumed"]["other"]  # another plan: other reduction orders
        assert loss == pytest.approx(r["third"][0], rel=1e-5)
        _close(state, r["uninterrupted"], atol=1e-5, rtol=1e-4)
        for k in r["full_after_two"]:
            assert torch.equal(r["reloaded_full"][k], r["full_after_two"][k]), k
        assert r["wrapped_keys"] == sorted(f"inner.{k}" for k in r["full_after_two"])


def test_tied_weights_stay_tied_and_appear_under_both_names():
    ref_steps, ref_state = f.tied_reference(NUM_STEPS)
    for r in fxpar.launch(f.tied, 2, NUM_STEPS):
        assert r["still_tied"] and r["loaded_tied"]
        assert {"embed.weight", "head.weight"} <= set(r["names"])
        assert torch.equal(r["state"]["embed.weight"], r["state"]["head.weight"])
        assert [s[0] for s in r["steps"]] == pytest.approx([s[0] for s in ref_steps], rel=1e-5)
        _close(r["state"], ref_state, atol=1e-5, rtol=1e-4)


def test_eval_runs_a_forward_only_graph_in_eval_mode():
    ref = f.eval_reference()
    local_ref = f.local_statistics_reference(2)
    for r in fxpar.launch(f.evaluate, 2):
        assert r["local_stats_loss"] == pytest.approx(local_ref, rel=1e-5)  # batch_norm="local": DDP's semantics
        assert r["eval"] == pytest.approx(ref["eval"], rel=1e-5)  # running statistics, no dropout
        assert r["eval_bigger"] == pytest.approx(ref["eval_bigger"], rel=1e-5)  # another batch size
        assert r["stats_unchanged"]
        assert r["eval_num_grads"] == 0 and r["eval_backward_ops"] == []
        assert r["train_backward_ops"], "the training graph has backward ops: the check above can fail"
        assert r["training_again"]


def test_autocast_and_bf16_parameters():
    ref_amp, ref_amp_state = f.reference_loop(NUM_STEPS, amp=torch.bfloat16)
    ref_bf16, ref_bf16_state = f.reference_loop(NUM_STEPS, dtype=torch.bfloat16)
    ref_bn_loss, ref_bn_stats = f.norm_net_amp_reference()
    for r in fxpar.launch(f.amp_and_bf16, 2, NUM_STEPS):
        bn_loss, bn_stats = r["bn"]
        assert bn_loss == pytest.approx(ref_bn_loss, rel=2e-2)
        torch.testing.assert_close(bn_stats, ref_bn_stats, atol=1e-2, rtol=2e-2)
        amp, bf16 = r["autocast"], r["bf16"]
        assert any(amp["variants"]) and not any(bf16["variants"])
        assert [s[0] for s in amp["steps"]] == pytest.approx([s[0] for s in ref_amp], rel=2e-2)
        _close(amp["state"], ref_amp_state, atol=2e-2, rtol=2e-2)
        assert all(v.dtype == torch.bfloat16 for k, v in bf16["state"].items() if "running" not in k)
        assert [s[0] for s in bf16["steps"]] == pytest.approx([s[0] for s in ref_bf16], rel=2e-2)
        _close(bf16["state"], ref_bf16_state, atol=3e-2, rtol=3e-2)


def test_ranks_fail_together_and_agree_before_they_start():
    ranks = fxpar.launch(f.failures, 2)
    for rank, r in enumerate(ranks):
        kind, message, seconds = r["planning"]
        assert kind == "InfeasiblePlanError" and seconds < 30
        assert ("no plan fits" in message) and (rank == 0 or message.startswith("rank 0 failed planning"))
        kind, message, _ = r["divide"]
        assert kind == "ShardingError", message
        kind, message, _ = r["models"]
        assert kind == "PlanMismatchError"
        assert "parameters.layers.0.weight" in message and "[48, 16]" in message and "[64, 16]" in message
        kind, message, _ = r["plans"]
        assert kind == "PlanMismatchError" and "at plan" in message
        kind, message, _ = r["steps"]
        assert kind == "PlanMismatchError" and "ranks disagree on the captured step: at graph" in message, message
        assert r["afterwards"][0] is None, r["afterwards"]


def test_state_dict_on_one_rank_fails_fast():
    kind, message, seconds = fxpar.launch(f.state_dict_on_rank_zero_only, 2)[0]
    assert kind == "RankFailedError" and seconds < 10
    assert "every rank" in message and "dcp.save" in message


def test_compile_reads_the_plan_cache(tmp_path):
    for r in fxpar.launch(f.compile_with_plan_cache, 2, str(tmp_path / "plans")):
        assert r == {"num_files": 1, "written_is_plan": True, "first_differs": True, "second_is_planted": True}


def test_scaled_and_accumulated_backwards_scale_the_gradients():
    ref = f.scaled_backward_reference()
    for r in fxpar.launch(f.scaled_backward, 2):
        _close(r, ref, atol=1e-6, rtol=1e-5)
