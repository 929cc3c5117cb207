"""denoise_tokens: parity with the full-canvas denoise loop at the predicted tokens, launch count,
bucket padding, bad input, torch.compile of the fused step.

The oracle below is the loop as docs/nova.md states it: every step patch-embeds the whole canvas
(guidance-expanded), gathers the predicted tokens, recomputes the time and condition embeddings,
runs the head, combines guidance, scatters the result back into a canvas and steps the scheduler
over the full canvas with the scheduler's own ``step`` (DDPM: one canvas-shaped draw per step with
t > 0). Its head uses the released parameter names, which is all denoise_tokens reads. The
schedulers are nova_fast.reference's (checked by hand in test_reference_schedulers.py); every
option they accept is run through both loops here.
"""
import math

import pytest
import torch
from torch import nn

import nova_fast
from conftest import HAS_GPU, assert_close
from nova_fast.bench.case import count_dispatched_ops
from nova_fast.ops import denoise_step as step_op
from nova_fast.ops import denoise_tokens as op
from nova_fast.reference import DDPMScheduler, FlowMatchEulerScheduler

F = nn.functional


# ---------------------------------------------------------------- the oracle (spec sections 2-3)
class Projector(nn.Module):
    def __init__(self, dim_in, hidden, dim_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, hidden), nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class TimeCondEmbed(nn.Module):
    def __init__(self, cond_dim, width, freq_dim=256):
        super().__init__()
        self.timestep_proj = Projector(freq_dim, width, width)
        self.condition_proj = Projector(cond_dim, width, width)
        self.freq_dim = freq_dim

    def get_freq_embed(self, timestep, dtype):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timestep.device) / half)
        angles = timestep.float()[:, None] * freqs
        return torch.cat([angles.cos(), angles.sin()], -1).to(dtype)

    def forward(self, timestep, z):
        temb = self.timestep_proj(self.get_freq_embed(timestep, self.timestep_proj.fc1.weight.dtype))
        return temb.unsqueeze(1) + self.condition_proj(z)


class AdaLNZero(nn.Module):
    def __init__(self, dim, num_stats, eps=1e-6):
        super().__init__()
        self.proj, self.eps, self.num_stats = nn.Linear(dim, num_stats * dim), eps, num_stats

    def forward(self, x, cond):
        stats = self.proj(F.silu(cond)).chunk(self.num_stats, -1)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + stats[0]) + stats[1], stats[2:]


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.proj, self.norm2 = AdaLNZero(dim, 3), Projector(dim, dim, dim), nn.LayerNorm(dim)

    def forward(self, x, cond):
        h, (gate,) = self.norm1(x, cond)
        return x + gate * self.norm2(self.proj(h))


class PatchEmbed(nn.Module):
    def __init__(self, channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)


class Head(nn.Module):
    """DiffusionMLP: forward(x canvas, timestep (B,), z (B, n, D), pred_ids (B, n)) -> (B, n, p*p*C)."""

    def __init__(self, depth, width, cond_dim, channels=4, patch=2):
        super().__init__()
        self.patch_embed = PatchEmbed(channels, width, patch)
        self.time_cond_embed = TimeCondEmbed(cond_dim, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = AdaLNZero(width, 2)
        self.head = nn.Linear(width, patch * patch * channels)
        self.patch = patch

    def forward(self, x, timestep, z, pred_ids):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = x.gather(1, pred_ids.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        cond = self.time_cond_embed(timestep, z)
        for blk in self.blocks:
            x = blk(x, cond)
        return self.head(self.norm(x, cond)[0])


def to_tokens(canvas, p):
    B, C, H, W = canvas.shape
    return canvas.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)


def to_canvas(tokens, p, shape):
    B, C, H, W = shape
    return tokens.view(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(shape)


class Guidance:
    def __init__(self, scale=5.0, trunc=0.0, renorm=1.0, image=0.0, stg=0.0):
        self.guidance_scale, self.guidance_trunc, self.guidance_renorm = scale, trunc, renorm
        self.image_guidance_scale, self.spatiotemporal_guidance_scale = image, stg

    @property
    def passes(self):
        return 1 if self.guidance_scale <= 1 else (3 if self.image_guidance_scale + self.spatiotemporal_guidance_scale else 2)


def combine(g, out, scale):
    if scale <= 1:
        return out

    def renorm(x, cond):
        if g.guidance_renorm >= 1:
            return x
        dims = tuple(range(1, x.dim()))
        return x * (cond.norm(dim=dims, keepdim=True) / x.norm(dim=dims, keepdim=True)).clamp(g.guidance_renorm, 1)

    if g.image_guidance_scale:
        c, u, ic = out.chunk(3)
        return renorm(u + (c - ic) * scale, c) + (ic - u) * g.image_guidance_scale
    if g.spatiotemporal_guidance_scale:
        c, u, pert = out.chunk(3)
        return renorm(u + (c - u) * scale, c) + (c - pert) * g.spatiotemporal_guidance_scale
    c, u = out.chunk(2)
    return renorm(u + (c - u) * scale, c)


def oracle_loop(head, z, canvas, scheduler, guidance, generator=None, pred_ids=None):
    """The full-canvas loop; returns the final canvas as tokens (B, L, P)."""
    p, shape = head.patch, canvas.shape
    B = shape[0]
    scale, m, x = guidance.guidance_scale, guidance.passes, canvas
    for i, t in enumerate(scheduler.timesteps):
        if m > 1 and guidance.guidance_trunc and float(t) < guidance.guidance_trunc:
            scale, m, z, pred_ids = 1.0, 1, z[:B], pred_ids[:B]  # truncation drops the other passes
        timestep = torch.as_tensor(t, device=x.device).expand(z.shape[0])
        out = combine(guidance, head(torch.cat([x] * m), timestep, z, pred_ids), scale)
        tokens = torch.zeros_like(to_tokens(x, p))
        tokens = tokens.scatter(1, pred_ids[:B].unsqueeze(-1).expand(-1, -1, tokens.size(-1)), out)
        x = scheduler.step(to_canvas(tokens, p, shape), i, x, generator=generator)
    return to_tokens(x, p)


# ---------------------------------------------------------------- cases
def make_head(depth, width, cond_dim, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    head = Head(depth, width, cond_dim)
    with torch.no_grad():
        for prm in head.parameters():  # zero-init gates would hide the blocks: randomize everything
            prm.normal_(0, 1.0 / math.sqrt(prm.shape[-1] if prm.dim() > 1 else 64))
    return head.to(dtype).eval()


_HEADS = {}


def head_for(name, dtype=torch.float32):
    key = (name, dtype)
    if key not in _HEADS:
        depth, width, cond = {"tiny": (2, 64, 48), "d3w1280": (3, 1280, 1024)}[name]
        _HEADS[key] = make_head(depth, width, cond, dtype)
    return _HEADS[key]


def make_inputs(head, n, guidance, B=2, canvas_hw=(24, 32), dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    H, W = canvas_hw
    L = (H // head.patch) * (W // head.patch)
    ids = torch.stack([torch.randperm(L, generator=g)[:n] for _ in range(B)])
    m = guidance.passes
    z = torch.randn(m * B, n, head.time_cond_embed.condition_proj.fc1.in_features, generator=g).to(dtype)
    canvas = torch.randn(B, 4, H, W, generator=g).to(dtype)
    return z, canvas, ids, ids.repeat(m, 1)


# the DDPM of the released video model's config; tests vary one option at a time from it
DDPM_BASE = dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", variance_type="fixed_small",
                 timestep_spacing="leading", steps_offset=0, clip_sample=False)


def make_scheduler(kind, K=25, **options):
    if kind == "flow":
        s = FlowMatchEulerScheduler(**{"shift": 3.0, **options})
    else:
        s = DDPMScheduler(**{**DDPM_BASE, **{"ddpm": {}, "ddpm_v": dict(prediction_type="v_prediction"),
                                             "ddpm_large": dict(variance_type="fixed_large")}[kind], **options})
    s.set_timesteps(K)
    return s


GUIDANCE = {
    "none": lambda: Guidance(1.0),
    "cfg": lambda: Guidance(5.0),
    "renorm": lambda: Guidance(5.0, renorm=0.5),
    "trunc": lambda: Guidance(5.0, trunc=500.0),
    "image": lambda: Guidance(4.0, renorm=0.7, image=1.5),
    "stg": lambda: Guidance(4.0, stg=1.2),
}
# the other combinations of the guidance fields (each variant's parity is in EXTRA_GUIDANCE's test)
EXTRA_GUIDANCE = {
    "image-plain": lambda: Guidance(3.0, image=2.0),
    "stg-renorm": lambda: Guidance(4.0, renorm=0.6, stg=0.8),
    "trunc-renorm": lambda: Guidance(5.0, trunc=400.0, renorm=0.5),
    "trunc-image": lambda: Guidance(4.0, trunc=600.0, image=1.5),
    "trunc-stg": lambda: Guidance(4.0, trunc=300.0, stg=1.0, renorm=0.8),
    "trunc-above-all": lambda: Guidance(5.0, trunc=2000.0),  # every step below the threshold: one pass
    "scale-one": lambda: Guidance(1.0, renorm=0.5, image=1.0),  # scale <= 1: one pass, the rest ignored
}
GUIDANCE_ALL = {**GUIDANCE, **EXTRA_GUIDANCE}


def run_both(head, kind, n, guide_name, dtype=torch.float32, B=2, scheduler=None, **kw):
    guidance = GUIDANCE_ALL[guide_name]()
    scheduler = make_scheduler(kind) if scheduler is None else scheduler
    z, canvas, ids, ids_g = make_inputs(head, n, guidance, B=B, dtype=dtype)
    with torch.no_grad():
        want = oracle_loop(head, z, canvas, scheduler, guidance, torch.Generator().manual_seed(7), ids_g)
        want = want.gather(1, ids.unsqueeze(-1).expand(-1, -1, want.size(-1)))
        got = op.denoise_tokens(head, z, canvas, scheduler, guidance, generator=torch.Generator().manual_seed(7),
                                pred_ids=ids_g, **kw)
    return got, want


def assert_tokens_close(got, want, dtype, what):
    # DDPM's first steps divide by sqrt(alpha_bar) ~ 0.06: compare relative to the output's size
    scale = want.float().abs().max().clamp(min=1.0)
    assert_close(got.float() / scale, want.float() / scale, dtype, what)


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("guide_name", list(GUIDANCE))
@pytest.mark.parametrize("n", [1, 7, 22, 180])
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_tiny_head_matches_full_canvas_loop(kind, n, guide_name):
    got, want = run_both(head_for("tiny"), kind, n, guide_name)
    assert got.shape == want.shape
    assert_tokens_close(got, want, torch.float32, f"tiny {kind} n={n} {guide_name}")


@pytest.mark.parametrize("kind", ["ddpm_v", "ddpm_large"])
def test_ddpm_variants(kind):
    got, want = run_both(head_for("tiny"), kind, 7, "cfg")
    assert_tokens_close(got, want, torch.float32, kind)


@pytest.mark.parametrize("guide_name", list(EXTRA_GUIDANCE))
@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_every_guidance_combination(kind, guide_name):
    got, want = run_both(head_for("tiny"), kind, 7, guide_name, scheduler=make_scheduler(kind, K=10))
    assert_tokens_close(got, want, torch.float32, f"{kind} {guide_name}")


# every option the reference schedulers accept, one at a time (DDPM from the released config)
SCHEDULER_OPTIONS = [
    ("ddpm", dict(clip_sample=True)),  # the official step never clips: neither loop may
    ("ddpm", dict(clip_sample=True, clip_sample_range=0.1, thresholding=True, sample_max_value=0.1)),
    ("ddpm", dict(prediction_type="sample")),
    ("ddpm", dict(prediction_type="v_prediction", variance_type="fixed_small_log")),
    ("ddpm", dict(variance_type="fixed_small_log")),
    ("ddpm", dict(timestep_spacing="linspace")),
    ("ddpm", dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("ddpm", dict(steps_offset=1)),
    ("ddpm", dict(beta_schedule="linear")),
    ("ddpm", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("ddpm", dict(beta_schedule="sigmoid")),
    ("ddpm", dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist())),
    ("ddpm", dict(rescale_betas_zero_snr=True, beta_schedule="linear")),
    ("flow", dict(shift=1.0)),
    ("flow", dict(shift=5.0, num_train_timesteps=500)),
    ("flow", "set_shift"),
]


@pytest.mark.parametrize("kind,options", SCHEDULER_OPTIONS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={'...' if isinstance(x, list) else x}" for k, x in v.items()))
def test_every_scheduler_option(kind, options):
    if options == "set_shift":  # the caller's flow_shift on top of the configured shift
        scheduler = FlowMatchEulerScheduler(shift=3.0)
        scheduler.set_shift(7.0)
        scheduler.set_timesteps(10)
    else:
        scheduler = make_scheduler(kind, K=10, **options)
    got, want = run_both(head_for("tiny"), kind, 7, "renorm", scheduler=scheduler)
    assert torch.isfinite(want).all()
    assert_tokens_close(got, want, torch.float32, f"{kind} {options}")


def test_clip_sample_default_is_not_clipped():
    """The case that drifted once: a DDPM built with clip_sample=True and large head outputs (x0 far
    outside [-1, 1]); the fast path and the reference must agree, and neither clips."""
    head = make_head(2, 64, 48, seed=3)
    with torch.no_grad():
        head.head.weight.mul_(20.0)  # large predicted x0
    clipped, plain = make_scheduler("ddpm", K=6, clip_sample=True), make_scheduler("ddpm", K=6)
    got, want = run_both(head, "ddpm", 7, "cfg", scheduler=clipped)
    same, _ = run_both(head, "ddpm", 7, "cfg", scheduler=plain)
    assert want.abs().max() > 2  # clipping would have mattered
    assert_tokens_close(got, want, torch.float32, "clip_sample=True")
    assert torch.equal(got, same)


def test_foreign_schedulers_are_refused_by_name():
    class DuckFlow:  # the old duck-typed interface: sigmas and timesteps, no kind / step table
        sigmas, timesteps = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1000.0, 500.0])

    with pytest.raises(TypeError, match="DuckFlow"):
        _bad(lambda a: {"scheduler": DuckFlow()})


@pytest.mark.slow
@pytest.mark.parametrize("kind,n,guide_name", [("flow", 22, "cfg"), ("ddpm", 180, "renorm"), ("ddpm", 7, "trunc")])
def test_osp480_head_matches_full_canvas_loop(kind, n, guide_name):
    got, want = run_both(head_for("d3w1280"), kind, n, guide_name, B=1)
    assert_tokens_close(got, want, torch.float32, f"d3w1280 {kind} n={n} {guide_name}")


@pytest.mark.parametrize("kind,guide_name", [("flow", "cfg"), ("flow", "renorm"), ("ddpm", "stg")])
def test_fp16_loose(kind, guide_name):
    head = head_for("tiny", torch.float16)
    got, want = run_both(head, kind, 22, guide_name, dtype=torch.float16)
    assert got.dtype == torch.float16
    # fp16 rounds every intermediate differently in the two loops; 25 steps compound it
    scale = want.float().abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=3e-2, atol=3e-2)


@pytest.mark.triton
@pytest.mark.parametrize("kind,guide_name", [("ddpm", "renorm"), ("flow", "image"), ("ddpm", "trunc")])
def test_triton_step_inside_the_loop(triton_device, kind, guide_name):
    head = head_for("tiny")
    if triton_device.type != "cpu":
        pytest.skip("the GPU run of this check is test_cuda_graph_replay_matches_eager")
    with nova_fast.use_backend("triton", op=op.OP):
        got, want = run_both(head, kind, 7, guide_name)
    assert nova_fast.backend_info()["last_used"][op.OP]["backend"] == "triton"
    assert_tokens_close(got, want, torch.float32, f"triton step {kind} {guide_name}")


def test_noise_as_tokens_with_canvas_shape():
    head, guidance, scheduler = head_for("tiny"), GUIDANCE["cfg"](), make_scheduler("ddpm")
    z, canvas, ids, ids_g = make_inputs(head, 9, guidance)
    tokens = to_tokens(canvas, 2).gather(1, ids.unsqueeze(-1).expand(-1, -1, 16))
    given, canvas_given = tokens.clone(), canvas.clone()
    with torch.no_grad():
        a = op.denoise_tokens(head, z, canvas, scheduler, guidance, generator=torch.Generator().manual_seed(3),
                              pred_ids=ids_g)
        b = op.denoise_tokens(head, z, tokens, scheduler, guidance, generator=torch.Generator().manual_seed(3),
                              pred_ids=ids.unsqueeze(-1), canvas_shape=canvas.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the loop updates its sample in place: never the caller's noise (tokens or canvas)
    assert torch.equal(tokens, given) and torch.equal(canvas, canvas_given)


def test_public_name():
    assert nova_fast.denoise_tokens is op.denoise_tokens


# ---------------------------------------------------------------- buckets, graphs
def test_bucket_sizes():
    assert [op.bucket_size(n) for n in (1, 8, 9, 22, 33, 64, 65, 180, 256, 257, 600)] == \
        [8, 8, 16, 32, 64, 64, 128, 256, 256, 512, 768]
    counts = [round(math.cos(math.pi / 2 * j / 64) * 1440) for j in range(65)]
    steps = [a - b for a, b in zip(counts, counts[1:]) if a - b > 0]
    assert len({op.bucket_size(n) for n in steps}) <= 4  # an osp480 frame's 63 AR steps: 4 graphs


@pytest.mark.parametrize("kind,n,guide_name", [("ddpm", 22, "renorm"), ("flow", 5, "image"), ("ddpm", 9, "trunc")])
def test_bucket_padding_does_not_change_results(kind, n, guide_name):
    head = head_for("tiny")
    padded, want = run_both(head, kind, n, guide_name, pad_to_bucket=True)
    plain, _ = run_both(head, kind, n, guide_name, pad_to_bucket=False)
    assert padded.shape == plain.shape == want.shape
    assert_tokens_close(padded, plain, torch.float32, "padded vs unpadded")
    assert_tokens_close(padded, want, torch.float32, "padded vs oracle")


def test_graph_cache_is_a_small_lru(monkeypatch):
    from nova_fast.ops import cuda_graph_cache as graphs

    made = []

    class FakeLoop:
        def __init__(self, body, inputs, keep_alive=None):
            made.append(tuple(inputs[0].shape))

        def replay(self, inputs):
            return inputs[0]

    monkeypatch.setattr(graphs, "CapturedLoop", FakeLoop)
    graphs.clear()
    w = op.head_weights(head_for("tiny"))
    plan = op.LoopPlan(25, op.GUIDE_CFG, False, None, 16, 16)
    for rows in [8, 16, 8, 32, 8] + list(range(40, 40 + graphs.GRAPH_CACHE_SIZE)):
        x, z_rows, noise = torch.zeros(1, rows, 16), torch.zeros(2, rows, 48), [None] * 25
        graphs.run_captured(op.graph_key(w, plan, x, z_rows, noise, "triton"), None, (x, z_rows))
    assert made[:3] == [(1, 8, 16), (1, 16, 16), (1, 32, 16)]  # 8 reused while cached
    assert len(graphs.cached_keys()) == graphs.GRAPH_CACHE_SIZE
    graphs.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind,guide_name", [("ddpm", "renorm"), ("flow", "trunc"), ("ddpm", "stg")])
def test_cuda_graph_replay_matches_eager(kind, guide_name):
    head = head_for("tiny").cuda()
    guidance, scheduler = GUIDANCE[guide_name](), make_scheduler(kind)
    for n in (22, 19, 22):  # same bucket: the second and third calls replay the first capture
        z, canvas, ids, ids_g = make_inputs(head, n, guidance)
        z, canvas, ids_g = z.cuda(), canvas.cuda(), ids_g.cuda()
        with torch.no_grad():
            got = op.denoise_tokens(head, z, canvas, scheduler, guidance, pred_ids=ids_g,
                                    generator=torch.Generator("cuda").manual_seed(5))
            eager = op.denoise_tokens(head, z, canvas, scheduler, guidance, pred_ids=ids_g, cuda_graphs=False,
                                      generator=torch.Generator("cuda").manual_seed(5))
        assert_tokens_close(got, eager, torch.float32, f"graph {kind} {guide_name} n={n}")


# ---------------------------------------------------------------- launch count
def count_launches(fn, monkeypatch):
    """Dispatched ATen ops, with each fused op (modulate, residual_norm, the guidance+scheduler
    step) counted as the one kernel launch it is on the GPU backends, not as its CPU math."""
    from torch.utils._python_dispatch import _disable_current_modes

    from nova_fast.ops import modulate as modulate_mod
    from nova_fast.ops import residual_norm as residual_mod

    fused = [0]

    def one_launch(fn_):
        def wrapped(*args, **kwargs):
            fused[0] += 1
            with _disable_current_modes():
                return fn_(*args, **kwargs)
        return wrapped

    monkeypatch.setitem(modulate_mod.FORWARD, "torch", one_launch(modulate_mod.FORWARD["torch"]))
    monkeypatch.setitem(residual_mod.FORWARD, "torch", one_launch(residual_mod.FORWARD["torch"]))
    monkeypatch.setattr(step_op, "guided_step_torch", one_launch(step_op.guided_step_torch))
    return count_dispatched_ops(fn) + fused[0]


@pytest.mark.parametrize("kind,guide_name", [("ddpm", "cfg"), ("flow", "renorm"), ("ddpm", "trunc")])
def test_launches_at_most_a_quarter_of_the_loop(kind, guide_name, monkeypatch):
    head, guidance, scheduler = head_for("tiny"), GUIDANCE[guide_name](), make_scheduler(kind)
    z, canvas, ids, ids_g = make_inputs(head, 22, guidance)
    with torch.no_grad():
        ref_ops = count_dispatched_ops(
            lambda: oracle_loop(head, z, canvas, scheduler, guidance, torch.Generator().manual_seed(7), ids_g))
        ours = count_launches(lambda: op.denoise_tokens(head, z, canvas, scheduler, guidance, pred_ids=ids_g,
                                                        generator=torch.Generator().manual_seed(7)), monkeypatch)
    print(f"\n{kind} {guide_name}: full-canvas loop {ref_ops} ops, denoise_tokens {ours} launches "
          f"({ref_ops / ours:.1f}x fewer)")
    assert ours * 4 <= ref_ops


# ---------------------------------------------------------------- bad input
def _bad(changes):
    head, guidance, scheduler = head_for("tiny"), GUIDANCE["cfg"](), make_scheduler("ddpm")
    z, canvas, ids, ids_g = make_inputs(head, 6, guidance)
    args = dict(head=head, z=z, noise=canvas, scheduler=scheduler, guidance=guidance, pred_ids=ids_g,
                generator=torch.Generator().manual_seed(0))
    args.update(changes(args))
    with torch.no_grad():
        return op.denoise_tokens(args.pop("head"), args.pop("z"), args.pop("noise"), args.pop("scheduler"),
                                 args.pop("guidance"), **args)


@pytest.mark.parametrize("changes,error,match", [
    (lambda a: {"z": a["z"][:3]}, ValueError, "multiple of 2"),
    (lambda a: {"z": a["z"][:, :5]}, ValueError, "pred_ids has shape"),
    (lambda a: {"pred_ids": a["pred_ids"][:, :4]}, ValueError, "pred_ids has shape"),
    (lambda a: {"noise": torch.randn(2, 5, 16), "canvas_shape": (2, 4, 24, 32)}, ValueError, "noise has shape"),
    (lambda a: {"noise": torch.randn(2, 6, 16)}, ValueError, "canvas_shape"),
    (lambda a: {"pred_ids": None}, ValueError, "pred_ids"),
    (lambda a: {"z": a["z"].half()}, TypeError, "dtype"),
    (lambda a: {"z": a["z"][..., :40]}, ValueError, "width"),
    (lambda a: {"pred_ids": a["pred_ids"].float()}, TypeError, "pred_ids"),
    (lambda a: {"scheduler": DDPMScheduler()}, ValueError, "set_timesteps"),
    (lambda a: {"scheduler": object()}, TypeError, "scheduler"),
])
def test_bad_input_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _bad(changes)


# ---------------------------------------------------------------- torch.compile
def test_fused_step_under_torch_compile():
    out, x = torch.randn(2 * 5 * 64), torch.randn(5 * 64)
    coef = torch.randn(3, op.COEF_COLUMNS)
    coef[:, 2] = 1.0
    scales = torch.tensor([3.0, 0.0, 0.5])

    def step(o, s):
        return op.guided_step(o, s, None, coef, scales, 1, guide=op.GUIDE_CFG, renorm=True, group_len=64)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(out, x), step(out, x), rtol=0, atol=0)


# ---------------------------------------------------------------- the scheduler's step table
def test_the_loop_reads_the_schedulers_own_step_table(monkeypatch):
    """denoise_tokens takes every coefficient from scheduler.step_table: a table with its step
    sizes doubled (and nothing else changed) must change the result accordingly."""
    head, scheduler = head_for("tiny"), make_scheduler("flow", K=5)
    got, want = run_both(head, "flow", 7, "cfg", scheduler=scheduler)
    assert_tokens_close(got, want, torch.float32, "plain")
    table = scheduler.step_table("cpu")
    doubled = table.coef.clone()
    doubled[:, 3] *= 2
    doubled[:, 6] = doubled[:, 0] * doubled[:, 3] / doubled[:, 2] + doubled[:, 4]
    doubled[:, 7] = doubled[:, 1] * doubled[:, 3] / doubled[:, 2]
    monkeypatch.setattr(type(scheduler), "step_table", lambda self, device: type(table)(
        doubled, table.timesteps, table.draws, table.host_timesteps))
    got2, _ = run_both(head, "flow", 7, "cfg", scheduler=scheduler)
    assert not torch.allclose(got2, got)


def test_runs_under_inference_mode():
    """Inference tensors have no version counter: the caches must not need one."""
    head = head_for("tiny")
    guidance = GUIDANCE["cfg"]()
    scheduler = make_scheduler("ddpm", K=4)
    z, canvas, ids, ids_g = make_inputs(head, 5, guidance)
    with torch.no_grad():
        want = op.denoise_tokens(head, z, canvas, scheduler, guidance, generator=torch.Generator().manual_seed(1),
                                 pred_ids=ids_g)
    with torch.inference_mode():
        scheduler = make_scheduler("ddpm", K=4)  # its tensors are inference tensors now
        got = op.denoise_tokens(head, z, canvas, scheduler, guidance, generator=torch.Generator().manual_seed(1),
                                pred_ids=ids_g)
    assert torch.equal(got, want)


def test_cached_time_embedding_and_scales_follow_weights_and_schedule():
    """The time embedding is kept across AR steps (same timesteps tensor); it must be recomputed
    when the head's weights change in place or the schedule changes, and the guidance-scale
    tensor shared between calls must not leak one call's values into another."""
    head = make_head(2, 64, 48, seed=5)
    got, want = run_both(head, "flow", 7, "cfg")
    assert_tokens_close(got, want, torch.float32, "first call")
    with torch.no_grad():
        head.time_cond_embed.timestep_proj.fc1.weight.mul_(1.7)  # in place: same tensor, new version
    got, want = run_both(head, "flow", 7, "cfg")
    assert_tokens_close(got, want, torch.float32, "after an in-place weight edit")
    got, want = run_both(head, "ddpm", 7, "stg")  # another schedule and other guidance scales
    assert_tokens_close(got, want, torch.float32, "other schedule and scales")
    got, want = run_both(head, "flow", 7, "cfg")
    assert_tokens_close(got, want, torch.float32, "back to the first")
