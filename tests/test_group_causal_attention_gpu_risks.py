"""group_causal_attention: what only a GPU would show, checked here without one.

- no host synchronisation on the device path (the Triton backend, auto's choice on CUDA): the op
  run under the interpreter with the Tensor methods that copy to the host (``item``, ``tolist``,
  ``cpu``, ``numpy``, ``bool`` / ``int`` / ``float`` of a tensor) and host-built tensors
  (``torch.tensor``) made to fail when nova_fast code calls them; the mask plan built on the
  ``meta`` device (no data: any host read fails); ``torch.compile(fullgraph=True)``;
- the 1-D grid within CUDA's limits for B * H = 100,000 (launches stubbed: the grid is only computed);
- 64-bit offsets: a probe kernel runs the kernels' own offset helpers under the interpreter;
- rows that see no key give exact zeros (and zero gradients) in every backend;
- strided and misaligned inputs are handled, a non-unit last stride is refused by name;
- the mask plan: tile ranges against a brute force over the dense mask, heaviest tiles first,
  the plan cached per mask and shared by the backward;
- a missing flash-attn is looked up once;
- autotuning the atomic-dq backward (deterministic=False) zeroes its dq accumulator between timed runs.
"""
import builtins
import sys

import pytest
import torch

import nova_fast
import nova_fast.ops.group_causal_attention as gca
from conftest import assert_close
from nova_fast.ops.group_causal_attention import MaskPlan, frame_groups, group_causal_attention, random_set_groups
from test_group_causal_attention import poisoned_empty, reference, run_case  # noqa: F401  (a fixture)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from nova_fast.kernels import group_causal_attention as kernels  # noqa: E402  (after the interpreter switch)


# ---------------------------------------------------------------- no host synchronisation
HOST_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def no_host_sync(monkeypatch):
    """Fail when nova_fast code reads a tensor on the host or builds one from host data. Calls from
    elsewhere (the Triton interpreter, which stands in for the GPU here) pass through."""
    def from_nova_fast():
        name = sys._getframe(2).f_globals.get("__name__", "")
        return name.startswith("nova_fast")

    def guard(what, original):
        def wrapper(*args, **kwargs):
            if from_nova_fast():
                raise AssertionError(f"host synchronisation: {what} called from nova_fast code")
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, guard(f"torch.{name}", getattr(torch, name)))


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic dq"])
def test_device_path_makes_no_host_sync(deterministic, triton_device, no_host_sync):
    gen = torch.Generator().manual_seed(1)
    qg = (torch.randperm(33, generator=gen) % 5).int().to(triton_device)         # unsorted, like random sets
    kg = torch.randint(0, 4, (33,), generator=gen).int().to(triton_device)
    q, k, v = (torch.randn(1, 1, 33, 64, generator=gen).to(triton_device).requires_grad_() for _ in range(3))
    with nova_fast.use_backend("triton", op="group_causal_attention"), kernels.blocks(16, 16):
        out = group_causal_attention(q, k, v, qg, kg, deterministic=deterministic)
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            group_causal_attention(q, k, v, qg)
    assert kernels.last_backward_path == ("deterministic" if deterministic else "atomic")


def test_mask_plan_builds_on_a_device_without_reading_it(no_host_sync):
    # meta tensors have no data: reading one on the host raises, so the plan never does
    groups = random_set_groups(300, 7, prefix_len=20, device="meta")
    assert groups.device.type == "meta" and groups.shape == (320,)
    plan = MaskPlan(groups, torch.zeros(100, dtype=torch.int32, device="meta"))
    tensors = [plan.q_order, plan.k_order, plan.k_visible, plan.key_tiles(64, 128), *plan.query_tiles(128, 64)]
    assert all(t.device.type == "meta" for t in tensors)
    assert plan.key_tiles(64, 128).shape == (1, 2, 1) and plan.query_tiles(128, 64)[0].shape == (1, 3)


def test_random_set_groups_built_on_their_device(monkeypatch):
    moved = []
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        if result.device != self.device:
            moved.append((self.device, result.device))
        return result
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("random_set_groups built a host tensor"))
    for sizes in (5, [3, 10, 7]):
        g = random_set_groups(20, sizes, prefix_len=3, device="meta")
        assert g.device.type == "meta" and g.dtype == torch.int32
    assert moved == []


def test_torch_compile_fullgraph():
    """Nothing in a call breaks the graph (an unsorted layout, per-batch groups, a KV cache)."""
    gen = torch.Generator().manual_seed(2)
    qg = torch.stack([random_set_groups(24, 4, gen), torch.randint(-1, 3, (24,), generator=gen).int()])
    kg = torch.randint(0, 3, (30,), generator=gen).int()
    q = torch.randn(2, 2, 24, 64, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 2, 30, 64, generator=gen).requires_grad_() for _ in range(2))
    fn = torch.compile(group_causal_attention, fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, qg, kg)
    out.sum().backward()
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = reference(*ref, qg, kg)
    expected.sum().backward()
    assert_close(out, expected, torch.float32, "compiled out")
    for name, t, r in zip("qkv", (q, k, v), ref):
        assert_close(t.grad, r.grad, torch.float32, f"compiled d{name}")


# ---------------------------------------------------------------- grid and offsets
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


class _RecordGrid:
    """Stands in for a @triton.jit kernel: records the grid of a launch and runs nothing."""

    def __init__(self, grids, name):
        self.grids, self.name = grids, name

    def __getitem__(self, grid):
        self.grids[self.name] = grid
        return lambda *args, **kwargs: None


def test_grid_within_cuda_limits_for_100k_batch_heads(monkeypatch):
    grids = {}
    names = ("gca_fwd_kernel", "gca_bwd_delta_kernel", "gca_bwd_dkdv_kernel", "gca_bwd_dq_kernel",
             "gca_bwd_dkdv_dq_atomic_kernel")
    for name in names:
        monkeypatch.setattr(kernels, name, _RecordGrid(grids, name))
    B, H, N, D = 1000, 100, 3, 64       # B * H = 100,000; stride-0 views: no memory for the inputs
    x = torch.zeros(1, 1, 1, D, dtype=torch.float16).expand(B, H, N, D)
    plan = MaskPlan(torch.arange(N, dtype=torch.int32))
    out, lse = kernels.forward(x, x, x, plan.q_order, plan.k_order, plan.k_visible, 0.125)
    for deterministic in (True, False):
        kernels.backward(x, x, x, x, out, lse, plan.q_order, plan.k_order, plan.k_visible, None, 0.125, deterministic)
    assert set(grids) == set(names)
    for name, grid in grids.items():
        assert 1 <= len(grid) <= 3 and all(0 < g <= limit for g, limit in zip(grid, CUDA_GRID_LIMITS)), (name, grid)
        assert grid[0] % (B * H) == 0, f"{name}: every (b, h) gets the same number of tiles"
    with pytest.raises(ValueError, match="more than a CUDA grid holds"):
        kernels.grid(30_000, 100_000)


@triton.jit
def _offsets_probe(out_ptr, tiles_ptr, tok_ptr, stride, BH, H, n_tiles, N: tl.constexpr):
    # the kernels' own helpers: program -> (tile, b, h, b * H + h) and row offsets
    tile, b, h, bh = kernels._program(BH, H, n_tiles, True)
    tl.static_assert(b.dtype == tl.int64 and h.dtype == tl.int64 and bh.dtype == tl.int64)
    offsets = kernels._row_offsets(tl.load(tok_ptr + tl.arange(0, N)), stride)
    tl.static_assert(offsets.dtype == tl.int64)
    pid = tl.program_id(0)
    tl.store(out_ptr + pid * N + tl.arange(0, N), offsets + b * stride)
    lane = tl.arange(0, 4)
    tl.store(tiles_ptr + pid * 3 + lane, tl.where(lane == 0, tile.to(tl.int64), tl.where(lane == 1, b, h)),
             mask=lane < 3)


@pytest.mark.triton
def test_offsets_are_64_bit_and_heaviest_query_tile_first(triton_device):
    tok = (2**20 + torch.arange(4, dtype=torch.int32)).to(triton_device)   # row 2^20 x stride 2^12 = 2^32
    BH, H, n_tiles = 6, 3, 2
    out = torch.zeros(BH * n_tiles, 4, dtype=torch.int64, device=triton_device)
    tiles = torch.zeros(BH * n_tiles, 3, dtype=torch.int64, device=triton_device)
    _offsets_probe[(BH * n_tiles,)](out, tiles, tok, 2**12, BH, H, n_tiles, N=4)
    b = tiles[:, 1].cpu()
    expected = (2**20 + torch.arange(4, dtype=torch.int64))[None, :] * 2**12 + b[:, None] * 2**12
    assert torch.equal(out.cpu(), expected)
    # rank-major: the first B*H programs take the last (heaviest) query tile of every (b, h)
    assert tiles[:BH, 0].tolist() == [n_tiles - 1] * BH and tiles[BH:, 0].tolist() == [0] * BH
    assert sorted(zip(tiles[:BH, 1].tolist(), tiles[:BH, 2].tolist())) == [(b, h) for b in range(2) for h in range(3)]


# ---------------------------------------------------------------- rows that see no key, layouts
def _blind_case():
    gen = torch.Generator().manual_seed(4)
    # -1 sees nothing (keys are groups 0..2); a whole 16-row tile of blind rows after the sort
    qg = torch.cat([torch.full((18,), -1), torch.randint(0, 3, (12,), generator=gen)]).int()[
        torch.randperm(30, generator=gen)]
    return qg, torch.randint(0, 3, (33,), generator=gen).int()


@pytest.mark.parametrize("path", ["torch chunks", "torch CPU kernel", "triton"])
def test_rows_that_see_no_key_give_zeros(path, request, monkeypatch):
    if path == "triton":
        device = request.getfixturevalue("triton_device")
    else:
        device = torch.device("cpu")
        if path == "torch CPU kernel":
            request.getfixturevalue("cpu_kernels_built")
        else:
            monkeypatch.setattr(gca, "_cpu_kernel_ready", lambda q: False)
    qg, kg = _blind_case()
    backend = "triton" if path == "triton" else "torch"
    with kernels.blocks(16, 16):
        (q, k, v), out = run_case(backend, qg, kg, 1, 2, 30, 33, 64, torch.float32, device, seed=5)
    blind = (qg == -1).to(device)
    assert (out.detach()[:, :, blind] == 0).all() and (q.grad[:, :, blind] == 0).all()
    with torch.no_grad(), nova_fast.use_backend(backend, op="group_causal_attention"), kernels.blocks(16, 16):
        all_blind = group_causal_attention(q, k, v, torch.full((30,), -1, dtype=torch.int32, device=device),
                                           kg.to(device))
    assert torch.equal(all_blind, torch.zeros_like(all_blind))


@pytest.mark.triton
def test_triton_strided_and_misaligned_inputs(triton_device):
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(2, 37, 3, 2, 64, generator=gen).to(triton_device)   # (B, N, 3, H, D): NOVA's fused qkv
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                        # strided (B, H, N, D) views
    g = random_set_groups(37, 5, gen).to(triton_device)
    with nova_fast.use_backend("triton", op="group_causal_attention"), kernels.blocks(16, 16):
        out = group_causal_attention(q, k, v, g)
        buf = torch.randn(2 * 2 * 37 * 64 + 1, generator=gen).to(triton_device)
        shifted = buf[1:].view(2, 2, 37, 64)                                # 4-byte offset: not 16-byte aligned
        out_shifted = group_causal_attention(shifted, k, v, g)
    assert_close(out, reference(q, k, v, g, g), torch.float32, "strided")
    assert_close(out_shifted, reference(shifted, k, v, g, g), torch.float32, "misaligned")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_unit_last_stride_is_refused(backend):
    q = torch.randn(1, 2, 64, 16).transpose(-1, -2)                         # (1, 2, 16, 64), last stride 16
    k = torch.randn(1, 2, 16, 64)
    with nova_fast.use_backend(backend, op="group_causal_attention"), \
            pytest.raises(ValueError, match="q must have unit stride in its last dimension"):
        group_causal_attention(q, k, k, torch.zeros(16, dtype=torch.int32))


# ---------------------------------------------------------------- the mask plan
def _brute_force_tiles(qg, kg, bm, bn):
    """(full, visited) bool (query tiles, key tiles) from the dense mask of the sorted problem."""
    qs, ks = torch.sort(qg).values, torch.sort(kg).values
    vis = ks[None, :] <= qs[:, None]
    tq, tk = -(-len(qs) // bm), -(-len(ks) // bn)
    full = torch.zeros(tq, tk, dtype=torch.bool)
    any_ = torch.zeros(tq, tk, dtype=torch.bool)
    for t in range(tq):
        for n in range(tk):
            block = vis[t * bm:(t + 1) * bm, n * bn:(n + 1) * bn]
            full[t, n] = bool(block.all()) and (n + 1) * bn <= len(ks)
            any_[t, n] = bool(block.any())
    return full, any_


@pytest.mark.parametrize("layout", ["frames", "random sets", "kv cache, blind rows"])
def test_tile_plans_match_the_dense_mask(layout):
    gen = torch.Generator().manual_seed(7)
    qg, kg = {"frames": (frame_groups(5, 23, 9), None),
              "random sets": (random_set_groups(150, 11, gen, prefix_len=7), None),
              "kv cache, blind rows": (torch.randint(-1, 4, (70,), generator=gen).int(),
                                       torch.randint(0, 4, (133,), generator=gen).int())}[layout]
    kg_ = qg if kg is None else kg
    plan = MaskPlan(qg, kg)
    for bm, bn in ((16, 32), (32, 16), (64, 64)):
        full, visited = _brute_force_tiles(qg, kg_, bm, bn)
        n_full, n_end = plan.query_tiles(bm, bn)
        cols = torch.arange(full.shape[1])
        # forward / dq: key tiles [0, n_full) are wholly visible, [n_full, n_end) cover the rest
        assert torch.equal(cols[None, :] < n_full[0, :, None], full), (bm, bn)
        assert torch.equal(cols[None, :] < n_end[0, :, None], visited), (bm, bn)
        # dk / dv: per key tile, query tiles [q_start, q_full) partly, [q_full, end) wholly
        key_tiles = plan.key_tiles(bm, bn)[0]
        rows = torch.arange(full.shape[0])
        seen = rows[:, None] >= key_tiles[0][None, :]
        assert torch.equal(seen, visited), (bm, bn)
        # a ragged last key tile is never "full" in the brute force, but its keys past Nk are never stored
        whole = rows[:, None] >= key_tiles[1][None, :]
        ragged = kg_.numel() % bn != 0
        assert torch.equal(whole[:, :-1] if ragged else whole, full[:, :-1] if ragged else full), (bm, bn)
        if ragged:
            assert not (whole[:, -1] & ~visited[:, -1]).any()


@pytest.mark.triton
def test_mask_plan_is_built_once_and_shared_by_the_backward(triton_device, monkeypatch):
    builds, key_plans = [], []
    original_init, original_key_tiles = MaskPlan.__init__, kernels.key_tile_plan

    def counting_init(self, *args, **kwargs):
        builds.append(1)
        original_init(self, *args, **kwargs)
    monkeypatch.setattr(MaskPlan, "__init__", counting_init)
    monkeypatch.setattr(kernels, "key_tile_plan", lambda *a: key_plans.append(1) or original_key_tiles(*a))
    gen = torch.Generator().manual_seed(8)
    g = random_set_groups(33, 4, gen).to(triton_device)
    x = torch.randn(1, 1, 33, 64, generator=gen).to(triton_device).requires_grad_()
    with nova_fast.use_backend("triton", op="group_causal_attention"), kernels.blocks(16, 16):
        h = x
        for _ in range(2):                       # two "layers" on one mask
            h = group_causal_attention(h, h, h, g)
        h.sum().backward()
        assert len(builds) == 1 and len(key_plans) == 1
        with torch.no_grad():
            plan = MaskPlan(g)
            assert torch.equal(group_causal_attention(x, x, x, plan), group_causal_attention(x, x, x, g))
            g.add_(0)                            # an in-place change: the cached plan is stale
            group_causal_attention(x, x, x, g)
    assert len(builds) == 3 and len(key_plans) == 1


@pytest.mark.triton
def test_atomic_backward_runs_on_its_own_tiles_and_key_tile_plan(triton_device, monkeypatch, poisoned_empty):
    """The atomic-dq backward's table entry ("dkdv_atomic") may have other tiles than the dk/dv
    kernel's: its key-tile plan must be built for its own blocks. Here the two differ in BLOCK_M only
    (32 x 16 for dk/dv, 16 x 16 atomic), so a dk/dv plan would pass the kernel's key-tile count check
    and count query tiles in 32-row units: parity with the reference catches it, and the plans built
    are recorded. fp32, ragged 45 tokens, random sets with a prefix."""
    original_config, original_key_tiles = kernels.config, kernels.key_tile_plan
    tiles = {"dkdv": (32, 16), "dkdv_atomic": (16, 16)}

    def config(kind, head_dim, dtype, device=None):
        cfg = original_config(kind, head_dim, dtype, device)
        if kind in tiles:
            cfg["BLOCK_M"], cfg["BLOCK_N"] = tiles[kind]
        return cfg
    plans = []
    monkeypatch.setattr(kernels, "config", config)
    monkeypatch.setattr(kernels, "key_tile_plan", lambda kvis, nk, bm, bn: plans.append((bm, bn))
                        or original_key_tiles(kvis, nk, bm, bn))
    qg = random_set_groups(38, 5, torch.Generator().manual_seed(21), prefix_len=7)
    for deterministic in (False, True):
        plans.clear()
        run_case("triton", qg, None, 1, 2, 45, 45, 64, torch.float32, triton_device, seed=22,
                 deterministic=deterministic)
        assert kernels.last_backward_path == ("deterministic" if deterministic else "atomic")
        assert plans == [tiles[kernels.backward_kind(deterministic)]]


def test_mask_plan_refuses_other_shapes():
    plan = MaskPlan(frame_groups(2, 8))
    q = torch.randn(1, 1, 16, 64)
    with pytest.raises(ValueError, match="mask plan is for Nq = 16, Nk = 16"):
        group_causal_attention(q, q[:, :, :8], q[:, :, :8], plan)
    with pytest.raises(ValueError, match="k_groups given with a MaskPlan"):
        group_causal_attention(q, q, q, plan, frame_groups(2, 8))
    assert torch.isfinite(group_causal_attention(q, q, q, plan)).all()


# ---------------------------------------------------------------- dense path
def test_missing_flash_attn_is_looked_up_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)     # import flash_attn raises ImportError
    monkeypatch.setattr(gca, "_flash_attn", [])
    attempts = []
    real_import = builtins.__import__

    def counting_import(name, *args, **kwargs):
        if name.split(".")[0] == "flash_attn":
            attempts.append(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", counting_import)
    assert [gca._flash_attn_func() for _ in range(3)] == [None] * 3
    assert attempts == ["flash_attn"]


# ---------------------------------------------------------------- autotuning the atomic-dq backward
def test_atomic_backward_autotune_zeroes_dq_between_timed_runs(monkeypatch):
    """With NOVA_FAST_GCA_AUTOTUNE=1 on a GPU, triton.autotune runs a kernel once per option before
    the real launch: the atomic kernel's dq accumulator must be zeroed before each (reset_to_zero),
    or the timed runs' adds land in the gradient. Its options are its own table entries' (kind
    "dkdv_atomic"), not the dk/dv kernel's; the deterministic kernels need no reset. Launches are
    stubbed: the autotuner's arguments are read."""
    tuned = {}

    def recording_autotune(configs, key, reset_to_zero=None, **kwargs):
        def wrap(kernel):
            tuned[kernel.__name__] = (configs, reset_to_zero, kernel.arg_names)
            return _RecordGrid({}, kernel.__name__)
        return wrap
    monkeypatch.setattr(kernels, "autotuning", lambda device: True)
    monkeypatch.setattr(kernels.triton, "autotune", recording_autotune)
    monkeypatch.setattr(kernels, "_autotuned", {})
    monkeypatch.setattr(kernels, "gca_bwd_delta_kernel", _RecordGrid({}, "gca_bwd_delta_kernel"))
    x = torch.zeros(1, 1, 40, 64, dtype=torch.float16)
    lse = torch.zeros(1, 1, 40)
    plan = MaskPlan(torch.arange(40, dtype=torch.int32))
    for deterministic in (True, False):
        kernels.backward(x, x, x, x, x, lse, plan.q_order, plan.k_order, plan.k_visible, None, 0.125, deterministic)
    assert set(tuned) == {"gca_bwd_dkdv_kernel", "gca_bwd_dq_kernel", "gca_bwd_dkdv_dq_atomic_kernel"}
    configs, reset, arg_names = tuned["gca_bwd_dkdv_dq_atomic_kernel"]
    assert reset == ["dq_acc_ptr"] and "dq_acc_ptr" in arg_names
    options = kernels.runtime_configs("dkdv_atomic", 64, torch.float16)
    assert options and [dict(num_warps=c.num_warps, num_stages=c.num_stages) for c in configs] == options
    assert tuned["gca_bwd_dkdv_kernel"][1] is None and tuned["gca_bwd_dq_kernel"][1] is None
    dkdv_configs = tuned["gca_bwd_dkdv_kernel"][0]
    assert [dict(num_warps=c.num_warps, num_stages=c.num_stages) for c in dkdv_configs] == \
        kernels.runtime_configs("dkdv", 64, torch.float16)
