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
            ("requested backend", _requested(info["requested"]))]
    for op, used in sorted(info["last_used"].items()):
        rows.append((f"last {op}", f"{used['backend']}: {used['why']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _requested(req: dict) -> str:
    parts = [f"global={req['global']}" if req["global"] else None, f"env={req['env']}" if req["env"] else None,
             ", ".join(f"{op}={b}" for op, b in req["per_op"].items()) or None]
    return "; ".join(p for p in parts if p) or "auto"


def cmd_doctor(args) -> int:
    from nova_fast.backends import backend_info

    print(doctor_table(backend_info()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nova-fast", description="NOVA kernels: benchmarks, profiling, diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="print versions, devices, the extension status and backend choices")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("bench", help="time every op and end-to-end generation against the reference")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


def cmd_bench(args) -> int:
    # Until the benchmark suites land, bench reports the environment it would run in.
    print("nova-fast bench: environment")
    return cmd_doctor(args)


if __name__ == "__main__":
    sys.exit(main())
