"""Benchmark of the CPU thread policy: training steps/s of one variant under several thread settings,
alone and beside a competing CPU-bound process (`python -c 'while True: pass'`).

    python -m lab.threadbench                       # quickstart's baseline ViT, 30 timed steps each
    python -m lab.threadbench --spec experiments/quickstart.yaml --variant resnet2_graft --steps 40

Each setting runs in a fresh Python process, because OpenMP reads OMP_WAIT_POLICY only once, when
torch loads it. Settings: 2 threads with spinning OpenMP threads (OMP_WAIT_POLICY=ACTIVE), 2 threads
passive, 1 thread passive, and lab's policy (lab/threads.py). A training step is forward + backward +
AdamW on a random batch of the spec's batch size and image size; the figure is the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
SETTINGS = [
    ("2 threads, spinning (ACTIVE)", "2", "ACTIVE"),
    ("2 threads, passive", "2", "PASSIVE"),
    ("1 thread, passive", "1", "PASSIVE"),
    ("lab policy", "policy", ""),
]


def _child(args: argparse.Namespace) -> None:
    from lab import spec as S
    from lab import threads as T

    choice = T.decide(None if args.threads == "policy" else int(args.threads))
    import torch

    import grafts

    T.apply(choice.threads)
    spec = S.load_spec(args.spec)
    variants = {v.key: v for v in S.expand(spec)}
    v = variants[args.variant] if args.variant else next(iter(variants.values()))
    model = grafts.build(v.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(v.data.batch_size, 3, *v.img_hw)
    y = torch.randint(0, v.model_cfg.num_classes, (v.data.batch_size,))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "variant": v.key,
                "threads": choice.threads,
                "wait": os.environ.get("OMP_WAIT_POLICY", ""),
                "reason": choice.reason,
                "step_ms": med * 1000,
                "steps_per_s": 1.0 / med,
                "p90_ms": statistics.quantiles(times, n=10)[-1] * 1000,
            }
        )
    )


def _run(args: argparse.Namespace, threads: str, wait: str) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [
        sys.executable,
        "-m",
        "lab.threadbench",
        "--child",
        "--threads",
        threads,
        "--spec",
        args.spec,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ] + (["--variant", args.variant] if args.variant else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.threadbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="experiments/quickstart.yaml")
    p.add_argument("--variant", help="default: the spec's first variant")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--alone-only", action="store_true", help="skip the runs beside a competing process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="policy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    print(f"{'setting':<30} {'load':<22} {'threads':>7} {'step ms':>8} {'p90 ms':>8} {'steps/s':>8}", flush=True)
    for loaded in [False] if args.alone_only else [False, True]:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
        try:
            if hog:
                time.sleep(1.0)
            for label, threads, wait in SETTINGS:
                r = _run(args, threads, wait)
                where = "+1 busy process" if loaded else "alone"
                print(
                    f"{label:<30} {where:<22} {r['threads']:>7} {r['step_ms']:>8.1f} {r['p90_ms']:>8.1f} "
                    f"{r['steps_per_s']:>8.2f}",
                    flush=True,
                )
        finally:
            if hog:
                hog.terminate()
                hog.wait()
    print(f"(machine: {os.cpu_count()} CPUs; load average now {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
