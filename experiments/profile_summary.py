"""Where a jitted step's time goes: the top kernels (GPU/TPU) or XLA ops (CPU) of a profiler
trace, per step (`experiments/benchmark.py --profile_dir`)."""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os

import jax


def device_op_summary(trace_dir: str, steps: int, top: int) -> dict[str, list]:
    """{line kind: [(op or kernel name, ms per step, % of that line's time)]} from the
    perfetto trace that `jax.profiler.trace(create_perfetto_trace=True)` wrote under
    `trace_dir`.

    On GPU/TPU the device process (named like "/device:GPU:0") has one line per stream
    ("kernels") and summary lines such as "XLA Ops" (HLO ops); each kind is summed on its own.
    On CPU the XLA worker threads' events stand in ("host ops")."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        return {}
    with gzip.open(paths[-1]) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if "/device:" in name}

    def line_kind(e) -> str:
        thread = threads.get((e["pid"], e.get("tid")), "")
        if e["pid"] in device_pids:
            return "kernels" if "stream" in thread.lower() else thread
        if device_pids or e["name"].startswith("$") or any(
                w in thread for w in ("codegen", "Compiler", ".py", "python")):
            return ""
        return "host ops"

    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        kind = line_kind(e) if e.get("ph") == "X" else ""
        if kind:
            totals[kind][e["name"]] += float(e.get("dur", 0.0))
    out = {}
    for kind, counter in totals.items():
        whole = sum(counter.values()) or 1.0
        out[kind] = [(name, us / 1e3 / steps, 100.0 * us / whole)
                     for name, us in counter.most_common(top)]
        out[kind].append((f"(all {kind})", whole / 1e3 / steps, 100.0))
    return out


def profile(fn, state, args, steps_per_call: int, trace_dir: str, calls: int,
            top: int) -> dict:
    """`device_op_summary` of `calls` calls of `fn(state, *args) -> (state, out)` (after one
    untraced call, which may compile), traced into `trace_dir`."""
    state, out = fn(state, *args)
    jax.block_until_ready(out)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            state, out = fn(state, *args)
        jax.block_until_ready((state, out))
    return device_op_summary(trace_dir, calls * steps_per_call, top)
