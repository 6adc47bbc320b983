"""The BatchNorm-variants table of docs/trainer.md: accuracy and epoch time per variant.

Trains the default model (``fastbn train``: Dense(64, relu) -> BatchNorm -> Dense(32,
relu) -> BatchNorm -> Dense(10), Adam 1e-3, batch 128) on Fashion-MNIST for 10 epochs
with seeds 0-3, one fresh process per run (``python -m fastbn train ... --metrics-out``),
for each variant:

==================  ===============================================================
``plain``           the trainer's default (Keras conventions, momentum 0.9)
``renorm``          ``--renorm`` (batch renormalization)
``ghost32``         ``--virtual-batch-size 32`` (ghost batches of 32)
``precise``         ``--precise-bn`` (exact statistics after each epoch)
``keras``           ``--bn-momentum 0.99``: every Keras default
``keras_precise``   ``--bn-momentum 0.99 --precise-bn``
==================  ===============================================================

A variant whose flag this checkout's ``fastbn train`` does not have is skipped (and said
so). Results are merged into ``benchmarks/results/bn_variants_<machine>.json`` (a rerun of
some variants keeps the others), and the Markdown table is printed.

``--variance-gap`` measures instead what fvcore's ``update_bn_stats`` and
``torch.optim.swa_utils.update_bn`` (which average per-batch variances) give on the same
trained models, against :func:`fastbn.nn.update_bn_stats`: it trains the default model
in this process for each seed, copies it into PyTorch, runs ``swa_utils.update_bn`` over
the training set in shuffled batches of 128, and compares the variances and the test
accuracies (needs PyTorch).

Usage::

    python benchmarks/bn_variants.py --data DIR [--variants plain,precise] [--threads 1]
    python benchmarks/bn_variants.py --data DIR --variance-gap
    python benchmarks/bn_variants.py --table      # print the table from the JSON only
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
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = {
    "plain": ("default (Keras conventions, momentum 0.9)", []),
    "renorm": ("batch renormalization (`--renorm`)", ["--renorm"]),
    "ghost32": (
        "ghost batches, k = 32 (`--virtual-batch-size 32`)",
        ["--virtual-batch-size", "32"],
    ),
    "precise": ("precise statistics (`--precise-bn`)", ["--precise-bn"]),
    "keras": ("every Keras default (`--bn-momentum 0.99`)", ["--bn-momentum", "0.99"]),
    "keras_precise": (
        "every Keras default + precise statistics",
        ["--bn-momentum", "0.99", "--precise-bn"],
    ),
}


def _environment(threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _flags_in_help():
    """The option strings of ``fastbn train --help`` (run in a child process)."""
    import re

    text = subprocess.run(
        [sys.executable, "-m", "fastbn", "train", "--help"],
        env=_environment(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"--[a-z][a-z-]*", text))


def _run(variant, seed, args, workdir):
    """One training run in a fresh process; returns its metrics record."""
    out = os.path.join(workdir, f"{variant}_{seed}.json")
    cmd = [sys.executable, "-m", "fastbn", "train", "--epochs", str(args.epochs)]
    cmd += ["--seed", str(seed), "--threads", str(args.threads), "--quiet"]
    cmd += ["--metrics-out", out, *VARIANTS[variant][1]]
    if args.data:
        cmd += ["--data", args.data, "--no-download"]
    t0 = time.perf_counter()
    result = subprocess.run(
        cmd, env=_environment(args.threads), cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}")
    with open(out) as f:
        record = json.load(f)
    record["process_seconds"] = time.perf_counter() - t0
    record["command"] = cmd[1:]
    return record


def _summary(runs):
    """Accuracy mean, spread (sample standard deviation), range and epoch times."""
    acc = [run["epochs"][-1]["test_acc"] for run in runs]
    seconds = [r["seconds"] for run in runs for r in run["epochs"]]
    precise = [
        r["precise_bn_seconds"] for run in runs for r in run["epochs"] if "precise_bn_seconds" in r
    ]
    return {
        "test_acc": acc,
        "test_acc_mean": statistics.fmean(acc),
        "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "test_acc_min": min(acc),
        "test_acc_max": max(acc),
        "epoch_seconds_median": statistics.median(seconds),
        "epoch_seconds_min": min(seconds),
        "precise_bn_seconds_median": statistics.median(precise) if precise else None,
    }


def _machine():
    from benchmarks import machine

    return {
        "cpu": machine.cpu_model(),
        "cores": os.cpu_count(),
        "node": platform.node(),
        "load_average": os.getloadavg(),
    }


def _load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"benchmark": "BatchNorm variants, docs/trainer.md", "variants": {}}


def _save(path, report):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def table(report):
    """The Markdown table of docs/trainer.md from a results report."""
    lines = [
        "| variant | test accuracy, mean ± std (min–max) | s/epoch, median (best) "
        "| precise pass (s) | load average |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (label, _) in VARIANTS.items():
        entry = report["variants"].get(name)
        if entry is None:
            continue
        s = _summary(entry["runs"])
        precise = s["precise_bn_seconds_median"]
        load = entry["machine"]["load_average"][0]
        lines.append(
            f"| {label} | {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} "
            f"({s['test_acc_min']:.4f}–{s['test_acc_max']:.4f}) | "
            f"{s['epoch_seconds_median']:.2f} ({s['epoch_seconds_min']:.2f}) | "
            f"{'—' if precise is None else f'{precise:.2f}'} | {load:.0f} |"
        )
    return "\n".join(lines)


def variance_gap(args):
    """fvcore / swa_utils-style statistics against exact ones on the trained models."""
    import numpy as np
    import torch
    from torch.optim import swa_utils

    from fastbn import nn
    from fastbn.data import load_dataset

    ds = load_dataset("fashion-mnist", args.data, download=not args.data)
    loss = nn.SoftmaxCrossEntropy()
    results = []
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        history = nn.fit(ds, epochs=args.epochs, seed=seed, threads=args.threads, log=None)
        model = history.model
        state = model.state_dict()
        acc_running = nn.evaluate(model, loss, ds.x_test, ds.y_test)[1]
        nn.update_bn_stats(model, (ds.x_train[i : i + 2048] for i in range(0, 60000, 2048)))
        exact = {k: v for k, v in model.state_dict().items() if "running" in k}
        acc_exact = nn.evaluate(model, loss, ds.x_test, ds.y_test)[1]

        # The same network in PyTorch (eps 1e-3 as the Keras-convention layers use).
        modules = []
        for layer in model.layers:
            if isinstance(layer, nn.Dense):
                linear = torch.nn.Linear(layer.in_features, layer.out_features)
                with torch.no_grad():
                    linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer.weight.T)))
                    linear.bias.copy_(torch.from_numpy(layer.bias))
                modules.append(linear)
                if layer.activation == "relu":
                    modules.append(torch.nn.ReLU())
            else:
                bn = torch.nn.BatchNorm1d(layer.num_features, eps=layer.bn.eps)
                with torch.no_grad():
                    bn.weight.copy_(torch.from_numpy(layer.gamma))
                    bn.bias.copy_(torch.from_numpy(layer.beta))
                modules.append(bn)
        net = torch.nn.Sequential(*modules)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.from_numpy(ds.x_train)),
            batch_size=128,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        swa_utils.update_bn(loader, net)
        torch_bns = [m for m in net if isinstance(m, torch.nn.BatchNorm1d)]
        bn_indices = [i for i, layer in enumerate(model.layers) if isinstance(layer, nn.BatchNorm)]
        swa_state = dict(state)
        layers = []
        for i, tbn in zip(bn_indices, torch_bns):
            mean_t = tbn.running_mean.numpy().astype(np.float64)
            var_t = tbn.running_var.numpy().astype(np.float64)
            mean_e = exact[f"layers.{i}.running_mean"].astype(np.float64)
            var_e = exact[f"layers.{i}.running_var"].astype(np.float64)
            swa_state[f"layers.{i}.running_mean"] = mean_t.astype(np.float32)
            swa_state[f"layers.{i}.running_var"] = var_t.astype(np.float32)
            live = var_e > 0  # a ReLU unit that never fires has a constant input
            rel = (var_t[live] - var_e[live]) / var_e[live]
            layers.append(
                {
                    "layer": i,
                    "constant_channels": int((~live).sum()),
                    "var_rel_diff_mean": float(rel.mean()),
                    "var_rel_diff_mean_abs": float(np.abs(rel).mean()),
                    "var_rel_diff_min": float(rel.min()),
                    "var_rel_diff_max": float(rel.max()),
                    "mean_abs_diff_over_std_max": float(
                        (np.abs(mean_t - mean_e)[live] / np.sqrt(var_e[live])).max()
                    ),
                }
            )
        model.load_state_dict(swa_state)
        acc_swa = nn.evaluate(model, loss, ds.x_test, ds.y_test)[1]
        results.append(
            {
                "seed": seed,
                "test_acc_running": acc_running,
                "test_acc_exact": acc_exact,
                "test_acc_swa_utils": acc_swa,
                "layers": layers,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None):
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="directory of the Fashion-MNIST files")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default="amd-epyc-2core")
    parser.add_argument("--out", default=None)
    parser.add_argument("--variance-gap", action="store_true")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or os.path.join(HERE, "results", f"bn_variants_{args.machine}.json")
    report = _load(out)
    if args.table:
        print(table(report))
        return 0
    if args.variance_gap:
        report["variance_gap"] = {
            "machine": _machine(),
            "epochs": args.epochs,
            "seeds": args.seeds,
            "method": "torch.optim.swa_utils.update_bn, shuffled batches of 128, vs "
            "fastbn.nn.update_bn_stats (exact, Keras convention: biased)",
            "runs": variance_gap(args),
        }
        _save(out, report)
        return 0
    flags = _flags_in_help()
    with tempfile.TemporaryDirectory() as workdir:
        for variant in args.variants.split(","):
            needed = [f for f in VARIANTS[variant][1] if f.startswith("--")]
            missing = [f for f in needed if f not in flags]
            if missing:
                print(f"{variant}: skipped, fastbn train has no {', '.join(missing)}", flush=True)
                continue
            runs = []
            for seed in args.seeds:
                runs.append(_run(variant, seed, args, workdir))
                print(
                    f"{variant} seed {seed}: test_acc {runs[-1]['epochs'][-1]['test_acc']:.4f}",
                    flush=True,
                )
            report["variants"][variant] = {
                "flags": VARIANTS[variant][1],
                "epochs": args.epochs,
                "seeds": args.seeds,
                "threads": args.threads,
                "machine": _machine(),
                "summary": _summary(runs),
                "runs": runs,
            }
            _save(out, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
