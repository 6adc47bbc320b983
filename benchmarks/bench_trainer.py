"""Time an epoch of fastbn's trainer and of the same model in PyTorch, side by side.

Both run the same model (``Dense(64, relu) -> BatchNorm -> Dense(32, relu) -> BatchNorm
-> Dense(10)``), optimizer (Adam, lr 1e-3), data, batch size, per-epoch permutations and
thread count, each in its own process (so that their thread pools never compete), with
``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``NUMBA_NUM_THREADS`` set to the thread count, plus ``--threads`` for each trainer
(``numba.set_num_threads`` + the BLAS pool for fastbn, ``torch.set_num_threads`` for
PyTorch). The providers alternate (fastbn, torch, fastbn, torch, ...) for ``--repeats``
rounds so that a change in the machine's load hits both alike.

The first epoch of a process includes one-time costs (Numba loading or compiling its
kernels, PyTorch's warm-up) and is reported apart; ``seconds_per_epoch`` is the median
of the other epochs over all rounds. Results go to
``benchmarks/results/trainer_<machine>.json``.

Usage::

    python benchmarks/bench_trainer.py --epochs 4 --repeats 2 --threads 2
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _machine_info():
    """CPU model, core count and library versions of this machine."""
    info = {
        "node": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    import numpy

    info["numpy"], info["numba"] = numpy.__version__, numba.__version__
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def _run(provider, args, workdir):
    """Train ``args.epochs`` epochs with one provider in a fresh process; return its records."""
    out = os.path.join(workdir, f"{provider}.json")
    if provider == "fastbn":
        cmd = [
            sys.executable,
            "-m",
            "fastbn",
            "train",
            "--dataset",
            args.dataset,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
            "--quiet",
            "--metrics-out",
            out,
        ]
        if args.data:
            cmd += ["--data", args.data]
    else:
        cmd = [
            sys.executable,
            os.path.join(HERE, "torch_mlp.py"),
            "--dataset",
            args.dataset,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
            "--json",
            out,
        ]
        if args.data:
            cmd += ["--data", args.data]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{provider} run failed ({result.returncode}):\n{result.stderr}")
    with open(out) as f:
        return json.load(f)["epochs"], wall


def main(argv=None):
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--machine", default=None, help="name in the output file (default: the host name)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output JSON (default benchmarks/results/trainer_<machine>.json)",
    )
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is reported apart)")
    providers = ["fastbn"]
    if not args.skip_torch:
        try:
            import torch  # noqa: F401

            providers.append("torch")
        except ImportError:
            print("PyTorch not installed: timing fastbn only", file=sys.stderr)
    machine = args.machine or platform.node().split(".")[0] or "unknown"
    out_path = args.out or os.path.join(HERE, "results", f"trainer_{machine}.json")

    runs = {p: [] for p in providers}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.repeats):
            for provider in providers:
                records, wall = _run(provider, args, workdir)
                runs[provider].append({"epochs": records, "process_seconds": wall})
                steady = [r["seconds"] for r in records[1:]]
                print(
                    f"round {round_ + 1}/{args.repeats}  {provider:7s}  first epoch "
                    f"{records[0]['seconds']:6.2f}s  then median "
                    f"{statistics.median(steady):6.3f}s/epoch  test_acc "
                    f"{records[-1]['test_acc']:.4f}",
                    flush=True,
                )

    results = {}
    for provider, provider_runs in runs.items():
        steady = [r["seconds"] for run in provider_runs for r in run["epochs"][1:]]
        first = [run["epochs"][0]["seconds"] for run in provider_runs]
        results[provider] = {
            "seconds_per_epoch": statistics.median(steady),
            "best_seconds_per_epoch": min(steady),
            "samples_per_s": provider_runs[0]["epochs"][0]["samples_per_s"]
            * provider_runs[0]["epochs"][0]["seconds"]
            / statistics.median(steady),
            "first_epoch_seconds": statistics.median(first),
            "steady_epoch_seconds": steady,
            "final_test_acc": [run["epochs"][-1]["test_acc"] for run in provider_runs],
            "runs": provider_runs,
        }
    report = {
        "benchmark": "trainer epoch time, fastbn vs PyTorch CPU",
        "machine": _machine_info(),
        "config": {
            "dataset": args.dataset,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "seed": args.seed,
            "model": "Dense(64,relu)-BN-Dense(32,relu)-BN-Dense(10)",
            "optimizer": "Adam lr 1e-3",
        },
        "results": results,
    }
    if "torch" in results:
        report["speedup_vs_torch"] = (
            results["torch"]["seconds_per_epoch"] / results["fastbn"]["seconds_per_epoch"]
        )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"\n{'provider':8s} {'s/epoch (median)':>17s} {'best':>7s} {'first epoch':>12s}")
    for provider, r in results.items():
        print(
            f"{provider:8s} {r['seconds_per_epoch']:17.3f} {r['best_seconds_per_epoch']:7.3f} "
            f"{r['first_epoch_seconds']:12.2f}"
        )
    if "speedup_vs_torch" in report:
        print(
            f"fastbn is {report['speedup_vs_torch']:.2f}x faster per epoch than PyTorch "
            f"({args.threads} threads, batch {args.batch_size})"
        )
    print(f"written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
