"""nova_fast.distributed: parallel generation equals one process's, bad degrees are refused, and a
failing or stuck rank makes the others exit with an error.

Ranks are separate processes (``python -m nova_fast.testing.distributed_worker``) on the gloo backend,
rendezvous through a FileStore in tmp_path; each launch runs several plans in one process group so
that process start-up (most of the cost here) is paid once. Sizes: the tiny config, 2 latent frames
x 4 AR steps x 3 denoising steps (DDPM), guidance on.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from nova_fast.distributed import (ParallelConfig, ParallelGeneration, check_generation,
                                   check_model, seq_split)
from nova_fast.reference import Guidance, build_model, random_text_states
from nova_fast.testing.distributed_worker import build_case, single_process

LAUNCH_WAIT_S = 240   # upper bound for one launch on a loaded 2-core machine (several plans each)

# rows split by guidance pass (truncation in the last two denoising steps: the broadcast path too),
# by batch, and tokens split by Ulysses (with RoPE, so the tables are sliced per rank)
TWO_RANK_PLANS = [
    {"name": "cfg", "cfg": 2, "gen": {"guidance_trunc": 500.0}},
    {"name": "dp", "dp": 2, "batch": 2},
    {"name": "ulysses", "ulysses": 2, "config_changes": {"rotary_pos_embed": True}},
]
# ranks that disagree (other weights; another noise seed) are refused on every rank
REFUSED_PLANS = [
    {"name": "other_weights", "cfg": 2, "rank_offsets": {"weight_seed": 1}, "expect_error": "hold other weights"},
    {"name": "other_seed", "cfg": 2, "rank_offsets": {"seed": 1}, "expect_error": "hold other inputs"},
]
FOUR_RANK_PLANS = [
    {"name": "cfg_x_ulysses", "cfg": 2, "ulysses": 2},
    {"name": "dp_x_ulysses", "dp": 2, "ulysses": 2, "batch": 2},
]


def launch(tmp_path, world: int, plans: list, *, fail: dict | None = None, timeout_s: float = 60.0,
           collective_timeout_s: float | None = None):
    """Start ``world`` ranks; wait for rank 0 (bounded), then for the rest a little; kill leftovers.
    Returns (return codes (None: still running when killed), {rank: error text})."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nova_fast.testing.distributed_worker", "--world", str(world), "--init",
           str(tmp_path / "store"), "--out", str(tmp_path), "--plans", json.dumps(plans), "--timeout", str(timeout_s)]
    if fail:
        cmd += ["--fail", json.dumps(fail)]
    if collective_timeout_s is not None:
        cmd += ["--collective-timeout", str(collective_timeout_s)]
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(world)]
    codes = []
    try:
        deadline = time.monotonic() + LAUNCH_WAIT_S
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
            if fail:   # the other ranks' fate is what the failure tests look at: do not wait for them
                deadline = min(deadline, time.monotonic() + 1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()
    errors = {r: (tmp_path / f"rank{r}.error").read_text() for r in range(world)
              if (tmp_path / f"rank{r}.error").exists()}
    return codes, errors


def _results(tmp_path_factory, world, plans, refused=()):
    out = tmp_path_factory.mktemp(f"world{world}")
    codes, errors = launch(out, world, [*plans, *refused])
    assert codes == [0] * world, f"ranks failed: {codes} {errors}"
    results = {plan["name"]: (plan, torch.load(out / f"{plan['name']}.pt")) for plan in plans}
    for plan in refused:
        results[plan["name"]] = (plan, [(out / f"{plan['name']}.rank{r}.refused").read_text()
                                        if (out / f"{plan['name']}.rank{r}.refused").exists() else None
                                        for r in range(world)])
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _results(tmp_path_factory, 2, TWO_RANK_PLANS, REFUSED_PLANS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _results(tmp_path_factory, 4, FOUR_RANK_PLANS)


def _one_process(plan):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # like each rank; on a busy 2-core machine more threads only contend
    try:
        return single_process(plan)
    finally:
        torch.set_num_threads(threads)


def _assert_equal_to_single_process(plan, got):
    expected = _one_process(plan)
    latents = got["latents"]
    assert latents.shape == expected.shape and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    scale = expected.abs().max()
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5 * float(scale))


@pytest.mark.slow
@pytest.mark.parametrize("name", [p["name"] for p in TWO_RANK_PLANS])
def test_two_ranks_equal_one_process(two_ranks, name):
    plan, got = two_ranks[name]
    _assert_equal_to_single_process(plan, got)
    sent = got["stats"]["bytes"]
    assert sent[name] > 0 and all(v == 0 for k, v in sent.items() if k not in (name, "checks"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [p["name"] for p in REFUSED_PLANS])
def test_ranks_that_disagree_are_refused_on_every_rank(two_ranks, name):
    plan, messages = two_ranks[name]
    assert all(m is not None and "ranks [1] " + plan["expect_error"] in m for m in messages), messages


@pytest.mark.slow
@pytest.mark.parametrize("name", [p["name"] for p in FOUR_RANK_PLANS])
def test_four_ranks_composed_equal_one_process(four_ranks, name):
    plan, got = four_ranks[name]
    _assert_equal_to_single_process(plan, got)
    sent = got["stats"]["bytes"]
    assert sent["ulysses"] > 0 and sent["cfg" if plan.get("cfg", 1) > 1 else "dp"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_failing_rank_makes_the_others_exit_with_an_error(tmp_path, mode):
    """Rank 1's diffusion head raises (its process exits) or hangs at its second call; rank 0 must
    exit with DistributedGenerationError (peer closed / collective timeout), not wait for ever."""
    fail = {"rank": 1, "mode": mode, "after_calls": 2, "sleep_s": 600}
    # start-up and the input checks run on the default group (60 s: process start-up may differ by seconds
    # on a busy machine); the CFG exchange where rank 1 stops runs on its subgroup, 5 s
    codes, errors = launch(tmp_path, 2, [{"name": "cfg", "cfg": 2}], fail=fail, collective_timeout_s=5.0)
    assert codes[0] == 1, f"rank 0 did not exit with an error: {codes} {errors}"
    assert errors[0].startswith("DistributedGenerationError") and "CFG-parallel" in errors[0]
    if mode == "raise":
        assert codes[1] == 1 and "injected failure on rank 1" in errors[1]
    else:
        assert "Timed out" in errors[0] or "timed out" in errors[0].lower()
        assert codes[1] is None   # still asleep when rank 0 had already given up


# ---- refusals (no processes needed) ---------------------------------------------------------------
def test_bad_degrees_refused():
    with pytest.raises(ValueError, match="cfg .* must be 1 or 2"):
        ParallelConfig(cfg=3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="ulysses degree must be an integer >= 1"):
            ParallelConfig(ulysses=bad)
    with pytest.raises(ValueError, match=r"world size 3 does not equal .*cfg 2 x dp 1 x ulysses 2 = 4"):
        ParallelConfig(cfg=2, ulysses=2).check_world_size(3)
    ParallelConfig(cfg=2, dp=3, ulysses=2).check_world_size(12)


def test_ulysses_degree_must_divide_the_heads():
    model = build_model("tiny", device="meta")   # 2 heads in each encoder
    check_model(model, ParallelConfig(ulysses=2))
    with pytest.raises(ValueError, match=r"ulysses degree 3 must divide .*temporal 2 heads, spatial 2 heads"):
        check_model(model, ParallelConfig(ulysses=3))


def test_unsplittable_generations_refused():
    check_generation(ParallelConfig(cfg=2, dp=2), 4, Guidance(5.0))
    with pytest.raises(ValueError, match="batch 3 is not divisible by the data-parallel degree dp=2"):
        check_generation(ParallelConfig(dp=2), 3, Guidance(5.0))
    with pytest.raises(ValueError, match=r"one pass \(guidance_scale=1.0 <= 1\): use cfg=1"):
        check_generation(ParallelConfig(cfg=2), 1, Guidance(1.0))
    with pytest.raises(NotImplementedError, match="image guidance adds a third pass"):
        check_generation(ParallelConfig(cfg=2), 1, Guidance(5.0, image_guidance_scale=2.0))
    check_generation(ParallelConfig(dp=2), 2, Guidance(5.0, image_guidance_scale=2.0))   # cfg=1: 3 passes fine


def test_accelerated_or_foreign_models_refused():
    model = build_model("tiny", device="meta")
    model._nova_fast_acceleration = {"backend": "torch"}
    with pytest.raises(NotImplementedError, match="reference model only.*nova_fast.restore"):
        check_model(model, ParallelConfig())
    with pytest.raises(TypeError, match="has no 'video_encoder'"):
        check_model(torch.nn.Linear(2, 2), ParallelConfig())


def test_seq_split_covers_the_sequence():
    for length in (0, 1, 5, 6, 7, 1800):
        for parts in (1, 2, 3, 4):
            sizes = seq_split(length, parts)
            assert sum(sizes) == length and max(sizes) - min(sizes) <= 1


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_one_rank_guards(world_of_one):
    plan = {"name": "one", "batch": 1}
    model, text, kwargs, seed = build_case(plan)
    with pytest.raises(ValueError, match="world size 1 does not equal"):
        ParallelGeneration(model, ParallelConfig(cfg=2))
    pg = ParallelGeneration(model, ParallelConfig())
    with pytest.raises(ValueError, match="already parallelized"):
        ParallelGeneration(model, ParallelConfig())
    with pytest.raises(ValueError, match="generator= is required"):
        pg.generate_video(text, **kwargs)
    with pytest.raises(RuntimeError, match="generate through ParallelGeneration.generate_video"):
        model.generate_video(text, generator=torch.Generator().manual_seed(seed), **kwargs)
    latents = pg.generate_video(text, generator=torch.Generator().manual_seed(seed), **kwargs)
    pg.restore()
    assert not any(name in vars(model.image_decoder) for name in ("forward",))
    _assert_equal_to_single_process(plan, {"latents": latents})


def test_not_initialized_refused():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        ParallelGeneration(build_model("tiny", device="meta"), ParallelConfig())



# ---- the command line -----------------------------------------------------------------------------
GEN_ARGS = ["generate", "--ar-steps", "4", "--diffusion-steps", "3", "--latent-frames", "2"]


def test_cli_generate_refuses_degrees_without_torchrun(monkeypatch, capsys):
    from nova_fast.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(GEN_ARGS + ["--cfg-parallel", "2", "--ulysses", "2"]) == 2
    assert "needs 4 processes: torchrun --nproc-per-node 4" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_generate_under_torchrun_equals_one_process(tmp_path, monkeypatch):
    """torchrun -m nova_fast.cli generate --cfg-parallel 2: rank 0 writes what one process writes."""
    from nova_fast.cli import main

    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(torchrun + ["-m", "nova_fast.cli"] + GEN_ARGS + ["--cfg-parallel", "2", "--out",
                          str(tmp_path / "two.pt")], env=env, capture_output=True, text=True, timeout=LAUNCH_WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cfg 2 x dp 1 x ulysses 1" in done.stdout
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(GEN_ARGS + ["--out", str(tmp_path / "one.pt")]) == 0
    finally:
        torch.set_num_threads(threads)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    scale = float(one["latents"].abs().max())
    torch.testing.assert_close(two["latents"], one["latents"], rtol=1e-5, atol=1e-5 * scale)
    assert two["comm"]["bytes"]["cfg"] > 0 and two["parallel"] == {"cfg": 2, "dp": 1, "ulysses": 1}


# ---- the scale-out projection (nova-fast roofline --gpus N) ---------------------------------------
def _tiny_workload():
    from nova_fast import roofline

    return roofline.load_shape("tiny")[0], roofline.Workload(latent_frames=2, ar_steps=4, diffusion_steps=3,
                                                             guidance_batch=2, batch=1, dtype_bytes=4)


def test_projection_lists_every_split_and_one_gpu_is_the_roofline():
    from nova_fast import roofline

    shape, _ = roofline.load_shape("osp480")
    one = roofline.project_scale_out(shape, gpus=1)
    assert [(r["cfg"], r["dp"], r["ulysses"]) for r in one["plans"]] == [(1, 1, 1)]
    assert one["plans"][0]["compute_s"] == pytest.approx(roofline.project(shape).total().seconds)
    assert one["label"].startswith("PROJECTION")
    four = roofline.project_scale_out(shape, gpus=4)
    plans = {(r["cfg"], r["dp"], r["ulysses"]) for r in four["plans"]}
    assert plans == {(1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 2, 1), (2, 1, 2)}
    for row in four["plans"]:
        assert row["compute_s"] <= one["single_gpu_s"] + 1e-9
        for link in row["links"].values():
            assert link["latency_s"] == pytest.approx(row["compute_s"] + link["comm_s"])
            assert link["videos_per_s"] == pytest.approx(row["dp"] / link["latency_s"])
    text = roofline.format_scale_out(four)
    assert "PROJECTED, NOT MEASURED" in text and "NVLink" in text and "PCIe" in text


@pytest.mark.slow
def test_projected_communication_matches_what_the_ranks_send(two_ranks):
    """The projection's byte counts are the ones ParallelGeneration.stats measured on the tiny runs
    (rank 0's; Ulysses within 2 %: rank 0 holds the longer slice of odd-length sequences and the
    sequence all-gather pads to it)."""
    from nova_fast import roofline

    shape, workload = _tiny_workload()
    cfg = roofline.scale_out_communication(shape, workload, cfg=2, dp=1, ulysses=1)["cfg"]
    assert cfg["bytes"] == two_ranks["cfg"][1]["stats"]["bytes"]["cfg"]
    assert cfg["collectives"] == two_ranks["cfg"][1]["stats"]["calls"]["cfg"]
    ulysses = roofline.scale_out_communication(shape, workload, cfg=1, dp=1, ulysses=2)["ulysses"]
    measured = two_ranks["ulysses"][1]["stats"]
    assert ulysses["collectives"] == measured["calls"]["ulysses"]
    assert ulysses["bytes"] == pytest.approx(measured["bytes"]["ulysses"], rel=0.02)


def test_lazy_exports():
    import nova_fast
    import nova_fast.distributed as distributed

    assert nova_fast.parallelize is distributed.parallelize
    assert nova_fast.ParallelConfig is ParallelConfig and nova_fast.ParallelGeneration is ParallelGeneration
