"""End-to-end generation: the reference model, torch.compile of it, and nova_fast.accelerate.

Sizes (latent frames x AR steps x denoising steps, batch 1, classifier-free guidance on):
tiny and mid run on a CPU; the released osp480 configuration (random weights, no download) runs
only where a GPU is. Every implementation gets its own copy of the same weights and the same seed.

Each implementation's callable also reports the per-frame split temporal encoder / spatial encoder /
diffusion head (the shape of the NOVA paper's latency table), timed by ``nova_fast.profiling``'s
hooks on ``video_encoder``, ``image_encoder`` and ``image_decoder``; "other" is what the three do
not cover (sampling bookkeeping, canvas updates, the scheduler outside the head). The ATen ops per
frame get the same split (``ops_per_frame``, counted once in one more call; not for compiled code).

An implementation that cannot run here (compile failed, accelerate missing or failing) is still
listed, as the exception that says why; the runner and the pytest suite report it as unavailable.
"""
from __future__ import annotations

import copy
import importlib
import os
import time

import torch

from nova_fast.bench.case import BenchCase, count_ops_by_stage

try:  # the runner and `nova-fast profile` import this module without needing pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

# config -> generation sizes; osp480 keeps the released AR and denoising steps over 2 latent frames
# (frame 0 carries the text prefix, frame 1 the Scaling-and-Shift layer), so per-frame numbers are real.
GEN_SIZES = {
    "tiny": dict(latent_frames=2, ar_steps=4, diffusion_steps=4),
    "mid": dict(latent_frames=2, ar_steps=16, diffusion_steps=10),
    "osp480": dict(latent_frames=2, ar_steps=64, diffusion_steps=25),
}
GPU_ONLY = {"osp480"}
# torch.compile on a 2-core CPU: a first call slower than this is reported, not hidden
COMPILE_WARN_S = float(os.environ.get("NOVA_BENCH_COMPILE_WARN_S", "300"))


class Unavailable(RuntimeError):
    """An implementation that cannot run here; the message says why."""


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def build_generation(config_name: str, device=None, dtype=None, seed: int = 0):
    """(reference module, config, model, text states) with seeded random weights."""
    ref = importlib.import_module("nova_fast.reference")
    config = ref.NOVAConfig.preset(config_name)
    torch.manual_seed(seed)
    model = ref.build_model(config, device=device, dtype=dtype)
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    text = ref.random_text_states(config, 1, generator)
    text = text.to(device=device, dtype=dtype) if dtype is not None and text.is_floating_point() else text.to(device)
    return ref, config, model, text


def generate(model, text, sizes: dict, seed: int = 0):
    device = text.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        return model.generate_video(text, num_latent_frames=sizes["latent_frames"], num_ar_steps=sizes["ar_steps"],
                                    num_diffusion_steps=sizes["diffusion_steps"], generator=generator)


class GenerationRun:
    """One implementation's generation as a zero-argument callable, with its per-frame stage split."""

    def __init__(self, model, text, sizes: dict, notes: dict | None = None):
        from nova_fast import profiling

        self.model, self.text, self.sizes = model, text, sizes
        self.notes = dict(notes or {})
        self.profiler = profiling.StageProfiler(model).attach()
        self.calls = 0
        self.seconds = 0.0
        self.ops_split = None  # ATen ops per frame by stage, counted once

    def __call__(self):
        sync = torch.cuda.synchronize if self.text.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = generate(self.model, self.text, self.sizes)
        sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def extra_metrics(self) -> dict:
        """Per-frame seconds of each stage, averaged over every call so far, and (once, from one
        more call) the ATen ops each stage dispatches per frame; not for compiled code."""
        frames = self.sizes["latent_frames"] * max(self.calls, 1)
        stages = {k: v / frames for k, v in self.profiler.stage_seconds().items()}
        total = self.seconds / frames
        split = {**stages, "other": max(total - sum(stages.values()), 0.0), "total": total}
        calls = {k: v / max(self.calls, 1) for k, v in self.profiler.stage_calls().items()}
        out = {"per_frame_s": split, "stage_calls_per_generation": calls, **self.notes}
        if "compiled" not in self.notes:
            if self.ops_split is None:
                from nova_fast.profiling import STAGES

                counts = count_ops_by_stage(lambda: generate(self.model, self.text, self.sizes), self.model, STAGES)
                self.ops_split = {k: v / self.sizes["latent_frames"] for k, v in counts.items()}
            out["ops_per_frame"] = self.ops_split
        return out


def _compiled_copy(model, text, sizes):
    """A copy of the model whose encoder blocks and diffusion head run through torch.compile."""
    compiled = copy.deepcopy(model)
    targets = []
    for attr in ("video_encoder", "image_encoder"):
        blocks = getattr(getattr(compiled, attr, None), "blocks", None)
        if blocks is not None:
            targets.extend(blocks)
    head = getattr(compiled, "image_decoder", None)
    if head is not None:
        targets.append(head)
    if not targets:
        raise Unavailable("model has none of video_encoder.blocks, image_encoder.blocks, image_decoder")
    for module in targets:
        # token counts change every AR step: dynamic shapes avoid one compile per step
        module.forward = torch.compile(module.forward, dynamic=True)
    t0 = time.perf_counter()
    generate(compiled, text, sizes)   # compiles every graph
    compile_s = time.perf_counter() - t0
    notes = {"compile_s": round(compile_s, 2), "compiled": f"{len(targets)} modules, dynamic=True"}
    if compile_s > COMPILE_WARN_S:
        notes["compile_warning"] = f"first call took {compile_s:.0f} s (> {COMPILE_WARN_S:.0f} s)"
    return compiled, notes


def accelerate_backends(device: torch.device) -> list[str]:
    """Backends worth timing for nova_fast.accelerate here (the interpreter is a correctness tool)."""
    if device.type != "cuda":
        return ["torch"]
    out = ["triton"]
    try:
        from nova_fast import backends

        backends.load_extension()
        out.append("cuda")
    except Exception:  # noqa: BLE001 -- no extension built: only triton; the doctor says why
        pass
    return out


def _accelerated_copy(model, backend: str):
    import nova_fast

    accelerate = getattr(nova_fast, "accelerate", None)
    if accelerate is None:
        raise Unavailable("nova_fast.accelerate is not importable")
    fast = copy.deepcopy(model)
    result = accelerate(fast, backend=backend)
    return result if isinstance(result, torch.nn.Module) else fast


def generation_setup(config_name: str):
    sizes = GEN_SIZES[config_name]

    def setup() -> dict:
        device, dtype = device_and_dtype()
        if config_name in GPU_ONLY and device.type != "cuda":
            raise Unavailable(f"{config_name} generation runs only on a GPU (CPU would take hours)")
        _, _, model, text = build_generation(config_name, device=device, dtype=dtype)
        # copies are taken before any profiler hook is attached (deepcopy would copy the hooks too)
        models: dict = {"reference": (model, {})}
        if os.environ.get("NOVA_BENCH_COMPILE", "1") == "0":
            models["reference+compile"] = Unavailable("skipped on request (--no-compile / NOVA_BENCH_COMPILE=0)")
        else:
            try:
                models["reference+compile"] = _compiled_copy(model, text, sizes)
            except Exception as exc:  # noqa: BLE001 -- reported as unavailable with the reason
                models["reference+compile"] = Unavailable(
                    f"torch.compile failed: {type(exc).__name__}: {exc}"[:500])
        for backend in accelerate_backends(device):
            label = f"accelerated[{backend}]"
            try:
                fast = _accelerated_copy(model, backend)
                generate(fast, text, sizes)   # first call: kernel compiles, graph captures
                models[label] = (fast, {})
            except Exception as exc:  # noqa: BLE001
                models[label] = Unavailable(f"{type(exc).__name__}: {exc}"[:500])
        impls = {}
        for label, entry in models.items():
            if isinstance(entry, BaseException):
                impls[label] = entry
                continue
            impls[label] = GenerationRun(entry[0], text, sizes, entry[1])
        return impls

    return setup


def _sizes(config_name: str) -> dict:
    device, dtype = device_and_dtype()
    return {"config": config_name, **GEN_SIZES[config_name], "batch": 1, "guidance": True,
            "dtype": str(dtype).replace("torch.", ""), "device": device.type}


CASES: list[BenchCase] = [
    BenchCase(op="generation", name=f"{name} {s['latent_frames']}f x{s['ar_steps']}ar x{s['diffusion_steps']}dn",
              setup=generation_setup(name), baseline="reference", sizes=_sizes(name),
              quick=name not in GPU_ONLY)
    for name, s in GEN_SIZES.items()
]
IMPLS = ("reference", "reference+compile", "accelerated[torch]", "accelerated[triton]", "accelerated[cuda]")

if pytest is not None:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.split()[0])
    def test_generation(run_bench_case, case, impl):
        run_bench_case(case, impl, rounds=3)
