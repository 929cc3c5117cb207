"""nova_fast.group_causal_attention: parity with SDPA on the dense boolean mask of the rule
``k_group[j] <= q_group[i]``, forward and gradients, torch backend and Triton (interpreter on CPU),
plus layouts, bad input, torch.compile, the work counter and AOT compilation.

The reference is ``F.scaled_dot_product_attention`` with the boolean mask built from the rule, in
float64, with rows that see no key set to 0 (the op's documented result). bf16: the torch backend
is tested directly; the Triton kernels in bf16 only by AOT compilation, because ``tl.dot`` on bf16
operands is wrong in triton 3.9's interpreter (fp16/fp32 are right).
"""
import pytest
import torch
import torch.nn.functional as F

import nova_fast
import nova_fast.ops.group_causal_attention as gca
from conftest import HAS_GPU, assert_close
from nova_fast import backends
from nova_fast.ops.group_causal_attention import attention_work, frame_groups, group_causal_attention, \
    random_set_groups


def reference(q, k, v, q_groups, k_groups, scale=None):
    """SDPA over the dense boolean mask of the rule (float64); rows without a visible key -> 0."""
    qg = q_groups if q_groups.dim() == 2 else q_groups.expand(q.shape[0], -1)
    kg = k_groups if k_groups.dim() == 2 else k_groups.expand(q.shape[0], -1)
    mask = (kg[:, None, :] <= qg[:, :, None])[:, None]                      # (B, 1, Nq, Nk)
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask | ~has_key,
                                         scale=scale)
    return torch.where(has_key, out, torch.zeros((), dtype=out.dtype))


def run_case(backend, q_groups, k_groups, B, H, Nq, Nk, D, dtype, device, seed=0, scale=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(device, dtype) for n in (Nq, Nk, Nk))
    grad = torch.randn(B, H, Nq, D, generator=gen).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with nova_fast.use_backend(backend, op="group_causal_attention"):
        out = group_causal_attention(*leaves, q_groups.to(device),
                                     None if k_groups is None else k_groups.to(device), scale=scale)
        assert backends.last_used()["group_causal_attention"][0] == backend
        out.backward(grad)  # inside the block: the backward op resolves the backend when it runs
    assert backends.last_used()["group_causal_attention"][0] == backend
    kg = q_groups if k_groups is None else k_groups
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves, q_groups.to(device), kg.to(device), scale)
    ref.backward(grad.double())
    assert out.dtype == dtype and out.shape == (B, H, Nq, D)
    assert_close(out, ref, dtype, "out")
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, dtype, f"d{name}")
    return leaves, out


def layouts(Nq, Nk, gen):
    """name -> (q_groups, k_groups or None) covering the issue's layouts, ragged lengths included."""
    if Nk == Nq:
        return {
            "frames+prefix": (frame_groups(3, (Nq - 5) // 3, 5 + (Nq - 5) % 3), None),
            "random sets": (random_set_groups(Nq, 7, gen), None),
            "random sets+prefix": (random_set_groups(Nq - 9, [5, 3, Nq - 9 - 8], gen, prefix_len=9), None),
            "one group": (torch.zeros(Nq, dtype=torch.int32), None),
            "own group each": (torch.randperm(Nq, generator=gen).to(torch.int32), None),
        }
    # KV cache, keys [cache..., current]: cache frames 0..1, the current frame's queries are frame 2
    cache = frame_groups(2, (Nk - Nq) // 2, (Nk - Nq) % 2)
    current = torch.full((Nq,), 2, dtype=torch.int32)
    cases = {
        "kv cache": (current, torch.cat([cache, current])),
        # -1: a query that sees no key at all; unsorted on both sides
        "kv cache unsorted, empty rows": (torch.randint(-1, 3, (Nq,), generator=gen).to(torch.int32),
                                          torch.cat([current, cache])),
        "random sets both sides": (random_set_groups(Nq, 4, gen), torch.randint(0, 5, (Nk,), generator=gen).int()),
    }
    return cases


TORCH_SHAPES = [(2, 3, 61, 61), (1, 2, 37, 100)]


@pytest.mark.parametrize("chunk", [1, 12, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_backend_parity(shape, dtype, chunk, torch_device, monkeypatch):
    # chunk: queries per work item (1: one call per group; 12: chunks of small groups merged through
    # their log-sum-exps with prefix calls; 256: the whole test sequence is one masked chunk)
    monkeypatch.setattr(gca, "CHUNK_QUERIES", chunk)
    B, H, Nq, Nk = shape
    for name, (qg, kg) in layouts(Nq, Nk, torch.Generator().manual_seed(Nq)).items():
        for D in (64, 128):
            try:
                run_case("torch", qg, kg, B, H, Nq, Nk, D, dtype, torch_device, seed=D)
            except AssertionError as exc:
                raise AssertionError(f"layout {name}, D={D}: {exc}") from exc


def test_per_batch_groups_and_empty_rows(torch_device):
    gen = torch.Generator().manual_seed(3)
    qg = torch.stack([random_set_groups(40, 5, gen), frame_groups(4, 10)])       # (B, N), different per row
    kg = torch.stack([torch.randint(1, 6, (40,), generator=gen), frame_groups(4, 10) + 1]).to(torch.int32)
    (q, k, v), out = run_case("torch", qg, kg, 2, 2, 40, 40, 64, torch.float32, torch_device)
    empty = (kg[:, None, :] <= qg[:, :, None]).any(-1).logical_not().to(torch_device)  # (B, Nq)
    assert empty.any(), "the case must hold rows that see no key"
    assert (out.detach()[empty[:, None, :].expand(-1, 2, -1)] == 0).all()
    assert (q.grad[empty[:, None, :].expand(-1, 2, -1)] == 0).all()


def test_custom_scale_and_strided_inputs(torch_device):
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 50, 3, 2, 64, generator=gen).to(torch_device)  # (B, N, 3, H, D): NOVA's fused qkv
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # strided (B, H, N, D) views
    g = frame_groups(5, 10)
    out = group_causal_attention(q, k, v, g.to(torch_device), scale=0.3)
    assert_close(out, reference(q, k, v, g.to(torch_device), g.to(torch_device), 0.3), torch.float32, "out")


def test_no_groups_is_dense_attention(torch_device):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 7, 64, generator=gen).to(torch_device)
    kv = torch.randn(2, 1, 2, 19, 64, generator=gen).to(torch_device)  # KV cache: Nk > Nq
    out = group_causal_attention(q, kv[0], kv[1])
    assert_close(out, F.scaled_dot_product_attention(q, kv[0], kv[1]), torch.float32, "dense")
    assert "no groups" in backends.last_used()["group_causal_attention"][1]


def test_helpers():
    g = frame_groups(3, 4, prefix_len=2)
    assert g.dtype == torch.int32 and g.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    a = random_set_groups(20, [3, 7, 10], torch.Generator().manual_seed(0), prefix_len=4)
    b = random_set_groups(20, [3, 7, 10], torch.Generator().manual_seed(0), prefix_len=4)
    assert a.dtype == torch.int32 and torch.equal(a, b) and a[:4].tolist() == [0] * 4
    assert torch.bincount(a[4:]).tolist() == [3, 7, 10]
    assert torch.bincount(random_set_groups(10, 3)).tolist() == [4, 3, 3]
    with pytest.raises(ValueError, match="set_sizes"):
        random_set_groups(10, [3, 3])


def test_attention_work():
    g = frame_groups(4, 32)                                      # 128 tokens, 4 frames of 32
    w = attention_work(g, block_m=32, block_n=32)
    assert (w["tiles_visited"], w["tiles_total"]) == (10, 16)    # lower block triangle of 4 x 4 tiles
    assert w["pairs_visible"] == 32 * 32 * 10 and w["pair_fraction"] == pytest.approx(10 / 16)
    assert (w["tiles_full"], w["tiles_partial"], w["useful_fraction"]) == (10, 0, 1.0)   # frame edges on tile edges
    w = attention_work(g, block_m=64, block_n=16)        # 2 query tiles: frames 0-1, 2-3
    assert (w["tiles_visited"], w["tiles_full"], w["tiles_partial"]) == (4 + 8, 2 + 6, 2 + 2)
    assert attention_work(torch.zeros(100, dtype=torch.int32))["tile_fraction"] == 1.0
    shuffled = g[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    assert attention_work(shuffled, block_m=32, block_n=32)["tiles_visited"] == 10   # sorted first, like the op
    t = attention_work(frame_groups(9, 360, 258))
    assert t["tile_fraction"] < 0.6 and t["pair_fraction"] < 0.56


@pytest.mark.parametrize("bad, error, match", [
    (dict(q=torch.randn(1, 2, 8, 64), k=torch.randn(1, 3, 8, 64)), ValueError, "k has shape"),
    (dict(v=torch.randn(1, 2, 9, 64)), ValueError, "v has shape"),
    (dict(q=torch.randn(1, 2, 8, 48), k=torch.randn(1, 2, 8, 48), v=torch.randn(1, 2, 8, 48)), ValueError,
     "head dim D = 48"),
    (dict(q_groups=torch.zeros(8)), TypeError, "q_groups must hold integer"),
    (dict(q_groups=torch.zeros(7, dtype=torch.int32)), ValueError, "q_groups has length 7"),
    (dict(q_groups=torch.zeros(3, 8, dtype=torch.int32)), ValueError, r"q_groups must have shape \(N,\) or \(B, N\)"),
    (dict(k=torch.randn(1, 2, 10, 64), v=torch.randn(1, 2, 10, 64)), ValueError, "k_groups is required"),
    (dict(k_groups=torch.zeros(5, dtype=torch.int32)), ValueError, "k_groups has length 5"),
    (dict(k=torch.randn(1, 2, 8, 64, dtype=torch.float16)), TypeError, "mixed dtypes"),
    (dict(q=torch.randn(1, 2, 8, 64).int()), TypeError, "q must have dtype"),
    (dict(q=torch.randn(2, 8, 64)), ValueError, "q must have 4 dimensions"),
])
def test_bad_input(bad, error, match):
    args = dict(q=torch.randn(1, 2, 8, 64), k=torch.randn(1, 2, 8, 64), v=torch.randn(1, 2, 8, 64),
                q_groups=torch.zeros(8, dtype=torch.int32), k_groups=None)
    args.update(bad)
    with pytest.raises(error, match=match):
        group_causal_attention(**args)


def test_torch_compile():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 24, 64, generator=gen).requires_grad_() for _ in range(3))
    g = frame_groups(3, 8)
    fn = torch.compile(lambda q, k, v: group_causal_attention(q, k, v, g), backend="aot_eager")
    out = fn(q, k, v)
    out.sum().backward()
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = reference(*ref, g, g)
    expected.sum().backward()
    assert_close(out, expected, torch.float32, "compiled out")
    assert_close(q.grad, ref[0].grad, torch.float32, "compiled dq")


# ---------------------------------------------------------------- Triton (interpreter on CPU)
TRITON_SHAPES = [(1, 2, 45, 45), (2, 1, 29, 77)]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty hands out NaN-filled float buffers: an output element a kernel does not write fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_parity(shape, dtype, triton_device, poisoned_empty):
    # 16 x 16 tiles: several query and key tiles per sequence, so full, partial and skipped tiles,
    # ragged last tiles and the heaviest-first order all occur
    from nova_fast.kernels.group_causal_attention import blocks

    B, H, Nq, Nk = shape
    cases = layouts(Nq, Nk, torch.Generator().manual_seed(Nq))
    with blocks(16, 16) if not HAS_GPU else blocks(64, 64):
        for name, (qg, kg) in cases.items():
            try:
                run_case("triton", qg, kg, B, H, Nq, Nk, 64, dtype, triton_device, seed=1)
            except AssertionError as exc:
                raise AssertionError(f"layout {name}: {exc}") from exc


@pytest.mark.triton
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_fp32_production_tiles(head_dim, triton_device, poisoned_empty):
    """fp32 runs its own (small) production tiles: small enough for the interpreter, so the exact
    configuration a GPU launches is checked here too."""
    gen = torch.Generator().manual_seed(head_dim)
    qg = random_set_groups(60, 5, gen, prefix_len=11)
    run_case("triton", qg, None, 1, 1, 71, 71, head_dim, torch.float32, triton_device)
    kv = (torch.full((40,), 2, dtype=torch.int32), torch.cat([frame_groups(2, 20, 3), torch.full((40,), 2).int()]))
    run_case("triton", *kv, 1, 1, 40, 83, head_dim, torch.float32, triton_device)


@pytest.mark.triton
def test_triton_head_dim_128_and_batch_groups(triton_device, poisoned_empty):
    from nova_fast.kernels.group_causal_attention import blocks

    gen = torch.Generator().manual_seed(8)
    qg = torch.stack([random_set_groups(33, 4, gen), torch.randint(-1, 3, (33,), generator=gen).int()])
    with blocks(16, 32):
        run_case("triton", qg, None, 2, 1, 33, 33, 128, torch.float32, triton_device)
    # q groups shared by the batch, k groups per batch row (the plan expands the shared side)
    kg = torch.stack([torch.randint(0, 4, (40,), generator=gen), torch.randint(1, 3, (40,), generator=gen)]).int()
    with blocks(16, 16):
        run_case("triton", frame_groups(3, 10, 3), kg, 2, 1, 33, 40, 64, torch.float16, triton_device)


@pytest.mark.triton
def test_triton_skips_tiles_it_cannot_see(triton_device):
    """Keys the rule hides are never read: poisoning them (NaN) must not change the output."""
    from nova_fast.kernels import group_causal_attention as kernels

    g = frame_groups(4, 16)  # 64 tokens: with 16 x 16 tiles, query tile t sees key tiles 0..t
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 1, 64, 64, generator=gen).to(triton_device) for _ in range(3))
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, 48:] = float("nan")  # frame 3: visible only to frame 3's queries
    v_poisoned[:, :, 48:] = float("nan")
    plan = gca.MaskPlan(g[:48].to(triton_device), g.to(triton_device))
    with kernels.blocks(16, 16):
        out, _ = kernels.forward(q[:, :, :48], k_poisoned, v_poisoned, plan.q_order, plan.k_order, plan.k_visible,
                                 0.125)
        ref, _ = kernels.forward(q[:, :, :48], k, v, plan.q_order, plan.k_order, plan.k_visible, 0.125)
    assert torch.isfinite(out).all() and torch.equal(out, ref)
    assert attention_work(g, block_m=16, block_n=16)["tiles_visited"] == 10


# ---------------------------------------------------------------- AOT
# dynamic shared memory one block may use: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.aot
@pytest.mark.slow
def test_aot_production_configs_compile_without_spills_within_shared_memory():
    pytest.importorskip("triton")
    from nova_fast.kernels import group_causal_attention as kernels
    from nova_fast.testing import triton_aot

    # the specs are the configurations the launchers pick (each architecture's first table entry),
    # every dtype (fp32 included) and head dim, the TMA forward on sm_90
    launched = set()
    for arch, capability in ((80, (8, 0)), (90, (9, 0))):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
            for dtype, dt in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                for d in (64, 128):
                    kinds = ("fwd", "dkdv", "dq") + (("fwd_tma",) if arch == 90 and dt != "fp32" else ())
                    for kind in kinds:
                        cfg = kernels.config(kind, d, dtype, torch.device("cuda"))
                        launched.add((kernels.kernel_signature(kind, dt)[0], dt, d, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                      cfg["num_warps"], cfg["num_stages"], kernels.precision(dtype)))
    compiled = {(s.kernel, s.signature["q_ptr" if "q_ptr" in s.signature else "o_ptr"][1:], s.constexprs["HEAD_DIM"],
                 s.constexprs["BLOCK_M"], s.constexprs.get("BLOCK_N"), s.num_warps, s.num_stages,
                 s.constexprs.get("PRECISION")) for s in kernels.AOT_SPECS if s.kernel != "gca_bwd_delta_kernel"}
    assert launched == compiled
    assert ("fp32", "ieee") in {(k[1], k[7]) for k in compiled}

    results = triton_aot.compile_in_subprocess("nova_fast.kernels.group_causal_attention")
    # every spec for each of its targets (the TMA forward: sm_90 only)
    assert len(results) == sum(len(s.archs or (80, 90)) for s in kernels.AOT_SPECS)
    assert triton_aot.problems(results) == []
    over = [f"{r.spec} sm_{r.arch}: {r.shared_bytes} B" for r in results if r.shared_bytes > SHARED_LIMIT[r.arch]]
    assert over == [], f"shared memory over the architecture's limit: {over}"
    assert all(r.hgmma > 0 for r in results if r.arch == 90 and r.tensor_cores)
    assert all(r.hmma == 0 and r.hgmma == 0 for r in results if "fp32" in r.spec)  # exact fp32: FMA, not TF32
    assert all(r.tma > 0 for r in results if r.spec.startswith("fwd_tma"))
