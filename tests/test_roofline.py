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
