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


def run_case(backend, q_groups, k_groups, B, H, Nq, Nk, D, dtype, device, seed=0, scale=None, deterministic=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(device, dtype) for n in (Nq, Nk, Nk))
    grad = torch.randn(B, H, Nq, D, generator=gen).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with nova_fast.use_backend(backend, op="group_causal_attention"):
        out = group_causal_attention(*leaves, q_groups.to(device),
                                     None if k_groups is None else k_groups.to(device), scale=scale,
                                     deterministic=deterministic)
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
    (dict(deterministic=0), TypeError, "deterministic must be a bool"),
    (dict(deterministic="no"), TypeError, "deterministic must be a bool"),
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
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic dq"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_fp32_production_tiles(head_dim, deterministic, triton_device, poisoned_empty):
    """fp32 runs its own (small) production tiles: small enough for the interpreter, so the exact
    configuration a GPU launches is checked here too (the tiles; warps do not exist in the interpreter)."""
    gen = torch.Generator().manual_seed(head_dim)
    qg = random_set_groups(60, 5, gen, prefix_len=11)
    run_case("triton", qg, None, 1, 1, 71, 71, head_dim, torch.float32, triton_device, deterministic=deterministic)
    kv = (torch.full((40,), 2, dtype=torch.int32), torch.cat([frame_groups(2, 20, 3), torch.full((40,), 2).int()]))
    run_case("triton", *kv, 1, 1, 40, 83, head_dim, torch.float32, triton_device, deterministic=deterministic)


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic dq"])
def test_triton_head_dim_128_and_batch_groups(deterministic, triton_device, poisoned_empty):
    from nova_fast.kernels.group_causal_attention import blocks

    gen = torch.Generator().manual_seed(8)
    qg = torch.stack([random_set_groups(33, 4, gen), torch.randint(-1, 3, (33,), generator=gen).int()])
    with blocks(16, 32):
        run_case("triton", qg, None, 2, 1, 33, 33, 128, torch.float32, triton_device, deterministic=deterministic)
    # q groups shared by the batch, k groups per batch row (the plan expands the shared side)
    kg = torch.stack([torch.randint(0, 4, (40,), generator=gen), torch.randint(1, 3, (40,), generator=gen)]).int()
    with blocks(16, 16):
        run_case("triton", frame_groups(3, 10, 3), kg, 2, 1, 33, 40, 64, torch.float16, triton_device,
                 deterministic=deterministic)


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


# ---------------------------------------------------------------- Triton: the atomic-dq backward
# deterministic=False: dq added by atomics inside the dk/dv kernel. bf16 as above: AOT-compiled only
# (the interpreter's bf16 tl.dot is wrong), fp32 and fp16 run here.
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_atomic_backward_parity(shape, dtype, triton_device, poisoned_empty):
    # the layouts of test_triton_parity: frames with a prefix, random sets, one group, a group per
    # token, KV caches, rows that see no key (their dq rows get no add: the zeroed buffer must show);
    # lengths 45, 29, 77 are ragged on 16-row tiles. poisoned_empty: a dq buffer we forgot to zero is NaN.
    from nova_fast.kernels import group_causal_attention as kernels

    B, H, Nq, Nk = shape
    with kernels.blocks(16, 16) if not HAS_GPU else kernels.blocks(64, 64):
        for name, (qg, kg) in layouts(Nq, Nk, torch.Generator().manual_seed(Nq)).items():
            kernels.last_backward_path = None
            try:
                run_case("triton", qg, kg, B, H, Nq, Nk, 64, dtype, triton_device, seed=2, deterministic=False)
            except AssertionError as exc:
                raise AssertionError(f"layout {name}: {exc}") from exc
            assert kernels.last_backward_path == "atomic"
            info = nova_fast.backend_info()["last_used"]["group_causal_attention"]
            assert info["backward_path"].startswith("triton atomic backward"), info
            assert info["path"].startswith("triton gather forward"), info   # the backward kept it apart


@pytest.mark.triton
def test_triton_atomic_and_deterministic_backwards_agree(triton_device):
    """Per-batch groups (B = 2, each row its own plan), ragged 37 tokens: the two backwards give the
    same gradients within fp32 rounding; dk and dv come from the same code and order in both (under
    the interpreter, bitwise)."""
    from nova_fast.kernels import group_causal_attention as kernels

    gen = torch.Generator().manual_seed(11)
    qg = torch.stack([random_set_groups(37, 6, gen, prefix_len=0), frame_groups(3, 11, 4)])
    grads = {}
    for deterministic in (True, False):
        leaves = [torch.randn(2, 2, 37, 64, generator=torch.Generator().manual_seed(12 + i)).to(triton_device)
                  .requires_grad_() for i in range(3)]
        with nova_fast.use_backend("triton", op="group_causal_attention"), kernels.blocks(16, 16):
            out = group_causal_attention(*leaves, qg.to(triton_device), deterministic=deterministic)
            out.backward(torch.cos(out.detach() * 3))
        assert kernels.last_backward_path == ("deterministic" if deterministic else "atomic")
        grads[deterministic] = [t.grad for t in leaves]
    for name, a, d in zip("qkv", grads[False], grads[True]):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name}: {m}")
    if not HAS_GPU:
        assert torch.equal(grads[False][1], grads[True][1]) and torch.equal(grads[False][2], grads[True][2])


@pytest.mark.triton
# the interpreter warns when the masked keys' p overflows before tl.where drops it: the case itself
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_triton_atomic_backward_masks_keys_past_nk(triton_device):
    """Every score far below zero (about -100): lse ~ -100, so a key past Nk in the ragged last key
    tile (k = 0, score 0) would get p = exp(100) = inf in fp32 unmasked, and ds = inf times k = 0 is
    NaN in dq. 20 tokens in one group: on 16 x 16 tiles the last key tile holds 4 keys and every query
    tile sees it wholly (a "full" tile, no mask): the atomic kernel must run it masked."""
    from nova_fast.kernels import group_causal_attention as kernels

    gen = torch.Generator().manual_seed(13)
    u = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    noise = lambda: 0.3 * torch.randn(1, 1, 20, 64, generator=gen)  # noqa: E731
    q = (-32.0 * u + noise()).to(triton_device).requires_grad_()
    k = (25.0 * u + noise()).to(triton_device).requires_grad_()    # q . k / 8 ~ -100
    v = torch.randn(1, 1, 20, 64, generator=gen).to(triton_device).requires_grad_()
    g = torch.zeros(20, dtype=torch.int32, device=triton_device)
    with nova_fast.use_backend("triton", op="group_causal_attention"), kernels.blocks(16, 16):
        out = group_causal_attention(q, k, v, g, deterministic=False)
        out.backward(torch.ones_like(out))
    assert kernels.last_backward_path == "atomic"
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scores = (ref[0] @ ref[1].transpose(-1, -2)) / 8
    assert scores.max() < -90, "the case needs every score below about -88 (fp32 exp overflow)"
    reference(*ref, g, g).backward(torch.ones_like(out, dtype=torch.float64))
    assert torch.isfinite(q.grad).all(), "NaN/inf in dq: keys past Nk reached the atomic adds"
    # scores of magnitude 100 carry fp32 rounding of ~1e-5 relative into exp: a looser tolerance
    for name, t, r in zip("qkv", (q, k, v), ref):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_torch_backend_deterministic_false_runs_its_one_backward(torch_device):
    """The torch backend has one backward, deterministic: deterministic=False (a permission) runs it,
    bit for bit, and backend_info's backward_path says so rather than ignoring the flag silently."""
    gen = torch.Generator().manual_seed(14)
    qg = random_set_groups(30, 4, gen)
    grads = {}
    for deterministic in (True, False):
        (q, k, v), _ = run_case("torch", qg, None, 1, 2, 30, 30, 64, torch.float32, torch_device, seed=3,
                                deterministic=deterministic)
        grads[deterministic] = (q.grad, k.grad, v.grad)
        path = nova_fast.backend_info()["last_used"]["group_causal_attention"]["backward_path"]
        assert path.startswith(gca.TORCH_BACKWARD_PATH)
        assert ("no atomic-dq variant" in path) == (not deterministic)
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def test_backward_tile_gemm_counts():
    """The module docstring's count, from the kernels' source: per visited (query tile, key tile)
    pair the deterministic backward runs 7 tile GEMMs (the dk/dv tile's 4, the dq tile's 3), the
    atomic one 5 (the dk/dv tile's 4 and ds @ k under DQ_ATOMIC); the kernels and the dk/dv program
    call tl.dot only through these tile helpers."""
    import ast
    import inspect

    from nova_fast.kernels import group_causal_attention as kernels

    tree = ast.parse(inspect.getsource(kernels))
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def dots(node):
        return sum(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "dot"
                   and isinstance(n.func.value, ast.Name) and n.func.value.id == "tl" for n in ast.walk(node))
    atomic = [n for n in ast.walk(funcs["_dkdv_tile"]) if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
              and n.test.id == "DQ_ATOMIC"]
    assert len(atomic) == 1
    shared, dq_atomic, dq_tile = dots(funcs["_dkdv_tile"]) - dots(atomic[0]), dots(atomic[0]), dots(funcs["_dq_tile"])
    assert (shared, dq_atomic, dq_tile) == (4, 1, 3)
    assert all(dots(funcs[f]) == 0 for f in ("_dkdv_program", "gca_bwd_dkdv_kernel", "gca_bwd_dkdv_dq_atomic_kernel",
                                             "gca_bwd_dq_kernel"))
    assert f"{shared + dq_tile} tile GEMMs" in kernels.__doc__ and f"{shared + dq_atomic} tile GEMMs" in kernels.__doc__


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
                    kinds = ("fwd", "dkdv", "dkdv_atomic", "dq") + (("fwd_tma", "fwd_tma_ws")
                                                                    if arch == 90 and dt != "fp32" else ())
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
    # every spec for each of its targets (the TMA forwards: sm_90 only)
    assert len(results) == sum(len(s.archs or (80, 90)) for s in kernels.AOT_SPECS)
    assert triton_aot.problems(results) == []   # no compile error, no spill, tensor cores where expected
    over = [f"{r.spec} sm_{r.arch}: {r.shared_bytes} B" for r in results if r.shared_bytes > SHARED_LIMIT[r.arch]]
    assert over == [], f"shared memory over the architecture's limit: {over}"
    assert all(r.hgmma > 0 for r in results if r.arch == 90 and r.tensor_cores)
    assert all(r.hmma == 0 and r.hgmma == 0 for r in results if "fp32" in r.spec)  # exact fp32: FMA, not TF32
    assert all(r.tma > 0 for r in results if r.spec.startswith("fwd_tma"))
    assert all(r.setmaxnreg > 0 for r in results if r.spec.startswith("fwd_tma_ws"))
