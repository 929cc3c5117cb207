"""One rank of a small parallel generation, for the tests of ``nova_fast.distributed``.

    python -m nova_fast.testing.distributed_worker --rank R --world W --init FILE --out DIR --plans JSON

Each plan (a dict) names its degrees (cfg, dp, ulysses), the batch, the generation arguments and
optional config changes; rank 0 saves each plan's latents to DIR/<name>.pt. ``build_case`` is shared
with the single-process side of the tests, so both build the same weights, inputs and seed.
``--fail '{"rank": 1, "mode": "raise"|"hang", "after_calls": 3}'`` makes one rank's diffusion head
raise (or sleep) at that call, to check that the other ranks stop with an error.
A failure exits with status 1 after writing DIR/rank<R>.error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

import torch

GEN_DEFAULTS = dict(num_latent_frames=2, num_ar_steps=4, num_diffusion_steps=3)


def build_case(plan: dict):
    """(model, text states, generation kwargs, seed) of one plan, the same on every rank and in the test."""
    from nova_fast.reference import NOVAConfig, build_model, random_text_states

    config = NOVAConfig.preset(plan.get("config", "tiny"))
    if plan.get("config_changes"):
        config = config.replace(**plan["config_changes"])
    torch.manual_seed(plan.get("weight_seed", 0))
    model = build_model(config).eval()
    text = random_text_states(config, plan.get("batch", 1), torch.Generator().manual_seed(1))
    return model, text, {**GEN_DEFAULTS, **plan.get("gen", {})}, plan.get("seed", 0)


def single_process(plan: dict) -> torch.Tensor:
    model, text, kwargs, seed = build_case(plan)
    return model.generate_video(text, generator=torch.Generator().manual_seed(seed), **kwargs)


def _inject_failure(model, fail: dict) -> None:
    original = model.image_decoder.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= fail.get("after_calls", 1):
            if fail["mode"] == "raise":
                raise RuntimeError(f"injected failure on rank {fail['rank']}")
            time.sleep(fail.get("sleep_s", 600))
        return original(*args, **kwargs)
    model.image_decoder.forward = forward


def main(argv=None) -> int:
    import torch.distributed as dist

    from nova_fast.distributed import ParallelConfig, ParallelGeneration

    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init", required=True, help="file for the FileStore rendezvous")
    p.add_argument("--out", required=True)
    p.add_argument("--plans", required=True, help="JSON list of plans")
    p.add_argument("--fail", default=None, help="JSON failure injection")
    p.add_argument("--timeout", type=float, default=60.0, help="rendezvous and default-group timeout")
    p.add_argument("--collective-timeout", type=float, default=None,
                   help="timeout of the parallel groups' collectives (default: --timeout)")
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=args.world,
                                timeout=datetime.timedelta(seconds=args.timeout))
        fail = json.loads(args.fail) if args.fail else None
        for plan in json.loads(args.plans):
            # "rank_offsets": {"weight_seed": k, "seed": k} shifts a seed by k * rank (ranks that disagree)
            offsets = plan.get("rank_offsets", {})
            shifted = {**plan, **{k: plan.get(k, 0) + v * args.rank for k, v in offsets.items()}}
            model, text, kwargs, seed = build_case(shifted)
            if fail and fail["rank"] == args.rank:
                _inject_failure(model, fail)
            try:
                pg = ParallelGeneration(model, ParallelConfig(plan.get("cfg", 1), plan.get("dp", 1),
                                                              plan.get("ulysses", 1)),
                                        timeout_s=args.collective_timeout)
                latents = pg.generate_video(text, generator=torch.Generator().manual_seed(seed), **kwargs)
            except ValueError as exc:   # a plan may expect a refusal (on every rank)
                if "expect_error" not in plan or plan["expect_error"] not in str(exc):
                    raise
                (out / f"{plan['name']}.rank{args.rank}.refused").write_text(str(exc))
                continue
            pg.restore()
            if args.rank == 0:
                torch.save({"latents": latents, "stats": pg.stats.as_dict()}, out / f"{plan['name']}.pt")
        dist.destroy_process_group()
        return 0
    except BaseException as exc:  # noqa: BLE001 -- report every failure, then exit non-zero
        (out / f"rank{args.rank}.error").write_text(f"{type(exc).__name__}: {exc}\n")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())


def serve(rank: int, world: int, init_file: str, plans: dict, conn, timeout_s: float = 120.0) -> None:
    """A long-lived rank for the scale-out benchmark: builds one parallelized model per plan, then
    answers ("run", name) with ("done", {"seconds", "stats"}) until ("stop", None). Errors are sent
    back as ("error", message)."""
    import torch.distributed as dist

    from nova_fast.distributed import ParallelConfig, ParallelGeneration

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        runs = {}
        for name, plan in plans.items():
            model, text, kwargs, seed = build_case(plan)
            pg = ParallelGeneration(model, ParallelConfig(plan.get("cfg", 1), plan.get("dp", 1), plan.get("ulysses", 1)))
            runs[name] = (pg, text, kwargs, seed)
        conn.send(("ready", None))
        while True:
            cmd, name = conn.recv()
            if cmd == "stop":
                break
            pg, text, kwargs, seed = runs[name]
            pg.stats.reset()
            t0 = time.perf_counter()
            pg.generate_video(text, generator=torch.Generator().manual_seed(seed), **kwargs)
            conn.send(("done", {"seconds": time.perf_counter() - t0, "stats": pg.stats.as_dict()}))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 -- the parent reports it
        try:
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001
            pass
