"""Roofline projection: FLOPs of one block against a hand count, the AR schedule, the osp480 shape."""
import json
import math

import pytest

from nova_fast import roofline
from nova_fast.cli import main


def test_block_flops_match_a_hand_count():
    # one osp480 spatial block, second half: batch 2 (guidance), 360 prefix + 1440 tokens, width 1024
    b, n, d = 2, 1800, 1024
    ops = roofline.block_costs(b, n, n, d, e=2)
    # qkv: every token multiplies a 1024-vector by a 1024x3072 matrix: 1024*3072 MACs, 2 FLOPs each
    assert ops["qkv"].flops == 2 * 1024 * 3072 * 1800 * 2 == 22_649_241_600
    # attention: QK^T is 1800x1800 dot products of length 1024 (all heads together), PV the same again
    assert ops["attention"].flops == 2 * (2 * 1800 * 1800 * 1024) * 2 == 26_542_080_000
    # output projection 1024x1024, MLP 1024x4096 and 4096x1024
    assert ops["proj"].flops == 2 * 1024 * 1024 * 1800 * 2
    assert ops["mlp.fc1"].flops + ops["mlp.fc2"].flops == 2 * (2 * 1024 * 4096) * 1800 * 2 == 60_397_977_600
    # bytes of the qkv GEMM in bf16: weight 1024x3072 once, 3600 input rows of 1024, output rows of 3072
    assert ops["qkv"].bytes == 2 * (1024 * 3072 + 3600 * 1024 + 3600 * 3072)
    assert all(c.launches >= 1 for c in ops.values())


def test_temporal_attention_counts_the_kv_cache():
    # frame 3 of osp480: 360 queries against 258 prefix + 4 * 360 keys
    ops = roofline.block_costs(2, 360, 258 + 4 * 360, 1024, kv_cache=True)
    assert ops["attention"].flops == 4 * 2 * 360 * 1698 * 1024
    assert "kv_cache" in ops


def test_ar_schedule_covers_every_token_once():
    schedule = roofline.ar_schedule(1440, 64)
    assert sum(n for _, n in schedule) == 1440
    assert schedule[0][0] == 0                       # the first executed step knows nothing yet
    known = [k for k, _ in schedule]
    assert known == sorted(known) and all(n > 0 for _, n in schedule)
    assert len(schedule) <= 64


def test_osp480_shape_and_projection_are_labelled_and_finite():
    shape, source = roofline.load_shape("osp480")
    assert (shape.spatial_tokens, shape.temporal_tokens, shape.prefix_tokens) == (1440, 360, 258)
    assert (shape.width, shape.heads, shape.temporal_depth, shape.spatial_depth) == (1024, 16, 16, 32)
    assert (shape.head_width, shape.head_depth) == (1280, 3)
    p = roofline.project(shape, roofline.Workload())
    stages = p.stage_totals()
    assert set(stages) == {"temporal", "spatial", "head"}
    for cost in stages.values():
        assert math.isfinite(cost.seconds) and cost.seconds > 0 and cost.flops > 0
    # the spatial encoder dominates the FLOPs (every AR step re-encodes 1800 tokens in its second half)
    assert stages["spatial"].flops > 10 * stages["temporal"].flops
    # head runs K=25 times per step on the predicted tokens only: 1440 tokens x 9 frames x 25 x 2;
    # its MLP is two 1280x1280 GEMMs per block, 3 blocks (the SiLU between adds < 0.1%)
    head_mlp = p.ops[("head", "mlp")]
    assert head_mlp.flops == pytest.approx(2 * (2 * 1280 * 1280) * 3 * 1440 * 9 * 25 * 2, rel=1e-3)
    text = roofline.format_projection(p, source)
    assert "PROJECTED" in text and "11.97" in text and "12.00" in text


def test_cli_roofline_table_and_json(capsys):
    assert main(["roofline", "--config", "osp480"]) == 0
    out = capsys.readouterr().out
    assert "PROJECTED, NOT MEASURED" in out and "spatial" in out and "head" in out
    assert main(["roofline", "--config", "osp480", "--json", "--latent-frames", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["label"].startswith("PROJECTION")
    assert data["workload"]["latent_frames"] == 1
    assert all(math.isfinite(v) for v in data["per_frame_seconds"].values())
    assert data["paper"]["spatial_s"] == 11.97


def test_unknown_config_is_an_error():
    with pytest.raises(ValueError, match="unknown configuration"):
        roofline.load_shape("no-such-model")


# ---------------------------------------------------------------- the accelerated path (projected)
@pytest.fixture(scope="module")
def osp480():
    return roofline.load_shape("osp480")[0]


def test_accelerated_is_never_above_eager_and_never_under_its_floor(osp480):
    data = roofline.compare_paths(osp480)
    assert data["label"].startswith("PROJECTION")
    assert set(data["stages"]) == {"temporal", "spatial", "head", "other"}
    for stage, r in data["stages"].items():
        assert r["accelerated_s"] <= r["eager_s"] + 1e-12, stage
        assert r["accelerated_launches"] <= r["eager_launches"] and r["accelerated_bytes"] <= r["eager_bytes"], stage
        assert r["accelerated_flops"] <= r["eager_flops"], stage
        assert 0 < r["floor_s"] <= r["accelerated_s"], stage
        assert r["fusion_removes_launches"] >= 0 and r["graphs_remove_s"] >= 0, stage
        assert r["eager_s"] - r["fusion_removes_s"] - r["graphs_remove_s"] == pytest.approx(r["accelerated_s"]), stage
    # what fusion removes, stage by stage: the head loses most launches, the spatial encoder most bytes
    st = data["stages"]
    assert st["head"]["fusion_removes_launches"] > st["head"]["eager_launches"] / 2
    assert st["spatial"]["fusion_removes_bytes"] > st["head"]["fusion_removes_bytes"]
    assert st["head"]["graphs_remove_s"] > 0 and st["spatial"]["graphs_remove_s"] == 0   # only the head is captured


def test_fused_residual_and_last_block_counts_follow_the_shapes():
    b, n, d, e = 2, 1800, 1024, 2
    eager, fused = roofline.block_costs(b, n, n, d, e), roofline.accelerated_block_costs(b, n, n, d, e)
    # two (LayerNorm, add) pairs: eager 5 passes each over b*n*d values in 2 launches, fused 3 in 1
    assert eager["norm+residual"].bytes - fused["norm+residual"].bytes == 2 * 2 * b * n * d * e
    assert eager["norm+residual"].launches - fused["norm+residual"].launches == 2
    assert all(fused[op].flops == eager[op].flops for op in eager)
    # last block, 25 tokens read by the head: K and V for all 1800 tokens, Q / proj / MLP for 25
    last = roofline.accelerated_block_costs(b, n, n, d, e, query_rows=25)
    assert last["qkv"].flops == 2 * (b * n) * d * (2 * d) + 2 * (b * 25) * d * d
    assert last["attention"].flops == 4 * b * 25 * n * d
    assert last["mlp.fc1"].flops == 2 * (b * 25) * d * (4 * d)


def test_head_launches_per_step_and_what_graphs_remove(osp480):
    depth = osp480.head_depth
    eager = roofline.head_call_costs(8, osp480, 2)
    fused = roofline.accelerated_head_call_costs(8, osp480, 2)
    # eager: embed 12, per block 11 (SiLU, stats GEMM, 3 for LN*(1+s)+t; 2 GEMMs + SiLU; 3 for LN, gate, add),
    # final 6, guidance + scheduler 10
    assert sum(c.launches for c in eager.values()) == 12 + 11 * depth + 6 + 10
    # fused: patch embed + SiLU(cond + t); one stats GEMM; per block modulate, 2 GEMMs + SiLU, residual_norm;
    # final modulate + GEMM; one step kernel
    assert sum(c.launches for c in fused.values()) == 2 + 1 + 5 * depth + 2 + 1
    wl = roofline.Workload()
    graphs = roofline.GraphModel(node_s=1e-6, replay_s=10e-6)
    data = roofline.compare_paths(osp480, wl, roofline.Ceilings(), graphs)
    steps = len(roofline.ar_schedule(osp480.spatial_tokens, wl.ar_steps)) * wl.latent_frames
    in_loop = sum(c.launches for c in fused.values()) * steps * wl.diffusion_steps
    expected = in_loop * (roofline.Ceilings().launch_s - graphs.node_s) - steps * graphs.replay_s
    assert data["stages"]["head"]["graphs_remove_s"] == pytest.approx(expected, rel=1e-9)


def test_moonshot_line_is_present_labelled_and_priced(osp480, capsys):
    m = roofline.compare_paths(osp480)["moonshot"]
    assert m["label"] == "PROJECTED" and m["target_s"] == 3.0
    assert (m["workload"]["latent_frames"], m["workload"]["ar_steps"], m["workload"]["diffusion_steps"],
            m["workload"]["guidance_batch"]) == (9, 64, 25, 2)
    assert m["compute_floor_s"] == pytest.approx(m["flops"] / roofline.Ceilings().peak_flops)
    assert m["required_fraction_of_peak"] == pytest.approx(m["flops"] / 3.0 / roofline.Ceilings().peak_flops)
    assert m["floor_s"] <= m["accelerated_s"] and len(m["levers"]) >= 3
    assert main(["roofline", "--config", "osp480"]) == 0
    out = capsys.readouterr().out
    assert "ACCELERATED PATH -- PROJECTED, NOT MEASURED" in out and "MOONSHOT (PROJECTED)" in out
    assert "33 frames" in out and "<= 3 s" in out and "what it would take" in out
    assert main(["roofline", "--config", "osp480", "--json", "--graph-node-us", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accelerated"]["graphs"]["node_s"] == pytest.approx(2e-6)
    assert data["accelerated"]["moonshot"]["label"] == "PROJECTED"
    assert main(["roofline", "--config", "osp480", "--eager-only"]) == 0
    assert "MOONSHOT" not in capsys.readouterr().out


def test_unknown_path_is_refused(osp480):
    with pytest.raises(ValueError, match="path must be"):
        roofline.project(osp480, path="fused")
