"""The ``nova-fast`` command: bench, profile, roofline, doctor."""
from __future__ import annotations

import argparse
import sys


def doctor_table(info: dict) -> str:
    """backend_info() as a readable two-column table."""
    rows = [("python", info["python"]), ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
            ("GPU", ", ".join(info["devices"]) or "none visible"),
            ("triton", info["triton"] or "not installed"),
            ("triton interpreter", "on" if info["triton_interpret"] else "off"),
            ("flash-attn", info["flash_attn"] or "not installed (optional GPU extra)"),
            ("nova_fast._C", info["extension"]),
            ("CPU kernels", info["cpu_kernels"]),
            ("requested backend", _requested(info["requested"]))]
    for op, used in sorted(info["last_used"].items()):
        path = f" [{used['path']}]" if "path" in used else ""
        path += f" [backward: {used['backward_path']}]" if "backward_path" in used else ""
        rows.append((f"last {op}", f"{used['backend']}: {used['why']}{path}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _requested(req: dict) -> str:
    parts = [f"global={req['global']}" if req["global"] else None, f"env={req['env']}" if req["env"] else None,
             ", ".join(f"{op}={b}" for op, b in req["per_op"].items()) or None]
    return "; ".join(p for p in parts if p) or "auto"


def cmd_doctor(args) -> int:
    from nova_fast import cpu_kernels
    from nova_fast.backends import backend_info

    cpu_kernels.load()  # builds them on a first run (about 10 s), so the report says whether they can
    print(doctor_table(backend_info()))
    return 0


def _csv(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def cmd_bench(args) -> int:
    from nova_fast.bench import report, runner

    import os

    if args.no_compile:
        os.environ["NOVA_BENCH_COMPILE"] = "0"   # read by the generation suite's setup
    quick = True if args.quick else (False if args.full else None)
    if args.gen_sizes:
        shorten_generation(args.gen_sizes, _csv(args.configs))
    results = runner.run(ops=_csv(args.ops), quick=quick, configs=_csv(args.configs), budget_s=args.budget,
                         min_runs=args.min_runs, count_ops=not args.no_ops_count)
    print(report.console(results))
    paths = runner.write_results(results, args.out, stem=args.name, latest=not args.no_latest)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    failed = [c["id"] for c in results["cases"] if c.get("error")]
    return 1 if failed and args.strict else 0


def shorten_generation(text: str, configs: list[str] | None) -> list[str]:
    """Run the generation suite's cases (those of ``configs``, default all) at FRAMESxARxSTEPS instead of
    their own sizes; each case's name and sizes say so (``shortened_from``). Returns the case ids."""
    from nova_fast.bench import test_generation_bench as generation
    from nova_fast.testing.gpu_check import parse_gen_sizes

    new = parse_gen_sizes(text)
    sizes = {"latent_frames": new["frames"], "ar_steps": new["ar"], "diffusion_steps": new["dn"]}
    changed = []
    for case in generation.CASES:
        config = case.sizes.get("config")
        if configs and config not in configs:
            continue
        own = generation.GEN_SIZES[config]
        original = f"{own['latent_frames']}x{own['ar_steps']}x{own['diffusion_steps']}"
        own.update(sizes)          # the very dict the case's setup reads when it runs
        case.sizes.update(sizes, shortened_from=original)
        case.name = f"{config} {new['frames']}f x{new['ar']}ar x{new['dn']}dn (shortened)"
        changed.append(case.id)
    return changed


def _generation_sizes(args) -> dict:
    from nova_fast.bench.test_generation_bench import GEN_SIZES

    sizes = dict(GEN_SIZES.get(args.config, dict(latent_frames=2, ar_steps=64, diffusion_steps=25)))
    for key in ("latent_frames", "ar_steps", "diffusion_steps"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    return sizes


def cmd_profile(args) -> int:
    import time
    from pathlib import Path

    import torch

    from nova_fast import profiling
    if args.ncu_regex:
        print(profiling.ncu_kernel_regex())
        return 0
    from nova_fast.bench.test_generation_bench import build_generation, device_and_dtype, generate

    device, dtype = device_and_dtype()
    sizes = _generation_sizes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"nova-fast profile: {args.config}, {sizes['latent_frames']} latent frames x {sizes['ar_steps']} AR steps x "
          f"{sizes['diffusion_steps']} denoising steps, batch 1 with guidance, {device.type} {dtype}", file=sys.stderr)
    _, _, model, text = build_generation(args.config, device=device, dtype=dtype)
    if args.accelerate:
        import nova_fast

        nova_fast.accelerate(model, backend=args.accelerate)
    if not args.no_warmup:
        generate(model, text, sizes)     # kernel compiles, allocator and caches settle outside the capture
    per_layer = args.per_layer or device.type != "cuda"
    stem = f"profile-{args.config}"
    if device.type == "cuda":
        # NVTX ranges for nsys / ncu; CUDA events give the per-range table without extra syncs
        with profiling.profiled(model, per_layer=per_layer, nvtx=True, timing="events") as prof:
            with profiling.cuda_profiler_capture():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(model, text, sizes)
                torch.cuda.synchronize()
                total = time.perf_counter() - t0
        table = prof.table(total)
        files = []
    else:
        activities = [torch.profiler.ProfilerActivity.CPU]
        with profiling.profiled(model, per_layer=per_layer, record_function=True) as prof:
            with torch.profiler.profile(activities=activities) as torch_prof:
                t0 = time.perf_counter()
                generate(model, text, sizes)
                total = time.perf_counter() - t0
        trace = out / f"{stem}.trace.json"
        torch_prof.export_chrome_trace(str(trace))
        table = prof.table(total)
        ops_table = torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        files = [trace]
    frames = sizes["latent_frames"]
    stage = prof.stage_seconds()
    split = " / ".join(f"{k} {v / frames * 1e3:.2f} ms" for k, v in stage.items())
    text_out = [f"# nova-fast profile: {args.config} on {device.type}", "",
                f"{frames} latent frames x {sizes['ar_steps']} AR steps x {sizes['diffusion_steps']} denoising steps; "
                f"generation {total:.3f} s ({total / frames * 1e3:.2f} ms per frame; hooks add a little on CPU)", "",
                f"per frame: {split}", "", table]
    if device.type != "cuda":
        text_out += ["", "## torch.profiler: top ATen ops by self CPU time", "", "```", ops_table, "```"]
    report_path = out / f"{stem}.md"
    report_path.write_text("\n".join(text_out) + "\n")
    files.append(report_path)
    print("\n".join(text_out[:6] + [table]))
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_roofline(args) -> int:
    import json

    from nova_fast import roofline

    shape, source = roofline.load_shape(args.config)
    workload = roofline.Workload(latent_frames=args.latent_frames, ar_steps=args.ar_steps,
                                 diffusion_steps=args.diffusion_steps, guidance_batch=1 if args.no_cfg else 2)
    ceilings = roofline.Ceilings(peak_flops=args.tflops * 1e12, hbm_bytes_per_s=args.hbm_tbs * 1e12,
                                 launch_s=args.launch_us * 1e-6)
    projection = roofline.project(shape, workload, ceilings)
    if args.gpus:
        scale = roofline.project_scale_out(shape, workload, ceilings, gpus=args.gpus)
        print(json.dumps({"config_source": source, **scale}, indent=1) if args.json
              else roofline.format_scale_out(scale, source))
        return 0
    accelerated = None if args.eager_only else _roofline_accelerated(args, shape, workload, ceilings)
    if args.json:
        print(json.dumps({"config_source": source, **projection.to_dict(),
                          **({"accelerated": accelerated} if accelerated else {})}, indent=1))
    else:
        print(roofline.format_projection(projection, source))
        if accelerated:
            print(roofline.format_comparison(accelerated))
    return 0


def _roofline_accelerated(args, shape, workload, ceilings) -> dict:
    """Eager against the accelerated path per stage, and the moonshot line (all projected)."""
    from nova_fast import roofline

    graphs = roofline.GraphModel(node_s=args.graph_node_us * 1e-6, replay_s=args.graph_replay_us * 1e-6)
    return roofline.compare_paths(shape, workload, ceilings, graphs)


def cmd_aot_report(args) -> int:
    """Per kernel: resources, CTAs per SM, tensor-core instructions for sm_80 / sm_90, a projected
    fraction of peak, and the measured CPU parity; written beside the bench results."""
    from nova_fast.testing import aot_report

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = aot_report.build_report(
        modules=_csv(args.modules) or aot_report.TRITON_MODULES, sources=_csv(args.cuda) or aot_report.CUDA_SOURCES,
        archs=tuple(int(a) for a in _csv(args.archs)), compat=not args.no_compat, one_dtype=args.one_dtype,
        parity=not args.no_parity, log=log)
    paths = aot_report.write_report(report, args.out, stem=args.name)
    print(aot_report.markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_generate_arguments(p) -> None:
    """The options of ``nova-fast generate`` (nova_fast.distributed.cli_generate runs it)."""
    p.add_argument("--config", default="tiny", help="preset with random weights (default tiny)")
    p.add_argument("--weights", default=None, metavar="DIR", help="a released checkpoint folder instead")
    p.add_argument("--text-states", default=None, metavar="FILE",
                   help="torch.save'd text-encoder states (B, n, text_token_dim); default: random from --seed")
    p.add_argument("--batch", type=int, default=1, help="videos (with random text states)")
    p.add_argument("--latent-frames", type=int, default=2)
    p.add_argument("--ar-steps", type=int, default=64)
    p.add_argument("--diffusion-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0, help="noise (and random text) seed, the same on every rank")
    p.add_argument("--weight-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    p.add_argument("--cfg-parallel", type=int, default=1, metavar="N",
                   help="1 or 2: the conditional and unconditional guidance passes on two ranks")
    p.add_argument("--dp", type=int, default=1, metavar="N", help="data-parallel degree (divides --batch)")
    p.add_argument("--ulysses", type=int, default=1, metavar="N",
                   help="Ulysses sequence-parallel degree in the encoders (divides the head count)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="collective timeout: a failed or stuck rank stops the others after it (default 300)")
    p.add_argument("--out", default=None, metavar="FILE", help="rank 0 saves the latents and figures here (torch.save)")


def cmd_generate(args) -> int:
    from nova_fast.distributed import cli_generate

    return cli_generate(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nova-fast", description="NOVA kernels: benchmarks, profiling, diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="print versions, devices, the extension status and backend choices")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bench", help="time every op and end-to-end generation against the reference")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="only cases marked quick, small budget (default on CPU)")
    mode.add_argument("--full", action="store_true", help="every case (default on GPU)")
    p.add_argument("--ops", help="comma-separated suites, e.g. modulate,generation (default: all)")
    p.add_argument("--configs", help="generation configs, e.g. tiny,mid (default: tiny,mid on CPU, all on GPU)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="timing budget per implementation (default 0.5 quick, 2 full)")
    p.add_argument("--min-runs", type=int, default=None, help="timed runs at least (default 3 quick, 5 full)")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default bench/results)")
    p.add_argument("--name", default=None, help="file stem (default <device>-<date>-<time>)")
    p.add_argument("--no-latest", action="store_true", help="do not also write latest.{json,md,png}")
    p.add_argument("--no-ops-count", action="store_true", help="skip the extra call that counts ATen ops")
    p.add_argument("--no-compile", action="store_true",
                   help="report reference+compile as skipped instead of compiling (saves minutes on a CPU)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a case failed to set up or lacks its baseline")
    p.add_argument("--gen-sizes", default=None, metavar="FxAxK",
                   help="run the generation cases at F latent frames x A AR steps x K denoising steps "
                        "(e.g. 1x16x10: a shortened osp480 run; the report names it shortened)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("profile", help="one representative generation with NVTX ranges (GPU) or a torch.profiler "
                                       "trace and per-layer table (CPU)")
    p.add_argument("--config", default="tiny", help="tiny, mid, osp480, ... (default tiny)")
    p.add_argument("--latent-frames", type=int, default=None)
    p.add_argument("--ar-steps", type=int, default=None)
    p.add_argument("--diffusion-steps", type=int, default=None)
    p.add_argument("--per-layer", action="store_true", help="a range per encoder block (always on CPU)")
    p.add_argument("--accelerate", metavar="BACKEND", default=None,
                   help="profile nova_fast.accelerate(model, backend=BACKEND) instead of the reference")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before the capture")
    p.add_argument("--ncu-regex", action="store_true",
                   help="print the ncu --kernel-name regex matching nova_fast's own kernels and exit")
    p.add_argument("--out", default="nova-fast-profile", metavar="DIR", help="output folder (default ./nova-fast-profile)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("roofline", help="PROJECTED FLOPs, bytes, launches and H100 time per op and per video")
    p.add_argument("--config", default="osp480")
    p.add_argument("--latent-frames", type=int, default=9)
    p.add_argument("--ar-steps", type=int, default=64)
    p.add_argument("--diffusion-steps", type=int, default=25)
    p.add_argument("--no-cfg", action="store_true", help="no classifier-free guidance (batch 1 instead of 2)")
    p.add_argument("--tflops", type=float, default=790.0, help="dense bf16 tensor TFLOP/s (default 790)")
    p.add_argument("--hbm-tbs", type=float, default=3.0, help="HBM TB/s (default 3.0)")
    p.add_argument("--launch-us", type=float, default=4.0, help="cost of one kernel launch in us (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="instead: PROJECTED latency per video on N GPUs for every cfg x dp x ulysses split "
                        "(nova_fast.distributed), with each method's communication over NVLink and PCIe")
    p.add_argument("--eager-only", action="store_true", help="leave out the accelerated path and the moonshot line")
    p.add_argument("--graph-node-us", type=float, default=1.0,
                   help="assumed cost of one kernel inside a replayed CUDA graph, us (default 1)")
    p.add_argument("--graph-replay-us", type=float, default=10.0,
                   help="assumed cost of one CUDA-graph replay, us (default 10)")
    p.set_defaults(func=cmd_roofline)

    p = sub.add_parser("generate", help="one generation, optionally split over torchrun ranks: CFG-parallel, "
                                        "data-parallel, Ulysses (torchrun --nproc-per-node N -m nova_fast.cli generate ...)")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("aot-report", help="per kernel, without a GPU: registers, spills, shared memory, CTAs per "
                                          "SM, HMMA/HGMMA for sm_80/sm_90, projected %% of peak, CPU parity")
    p.add_argument("--modules", help="Triton kernel modules, e.g. adaln,denoise_step (default: all)")
    p.add_argument("--cuda", help="CUDA sources in csrc/, e.g. adaln (default: all)")
    p.add_argument("--archs", default="80,90", help="compute capabilities (default 80,90)")
    p.add_argument("--no-compat", action="store_true", help="skip the GPU machine's triton (3.6) even if installed")
    p.add_argument("--one-dtype", action="store_true", help="one dtype per Triton kernel configuration (bf16)")
    p.add_argument("--no-parity", action="store_true", help="do not run the CPU parity tests")
    p.add_argument("--out", default=None, metavar="DIR", help="results folder (default bench/results)")
    p.add_argument("--name", default=None, help="file stem (default aot-<date>-<time>)")
    p.set_defaults(func=cmd_aot_report)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
