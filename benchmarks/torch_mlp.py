"""The trainer's model in PyTorch (CPU): the yardstick for ``fastbn train``'s speed.

Same model as ``fastbn.nn.build_mlp`` (``Linear(784, 64) -> ReLU -> BatchNorm1d(64) ->
Linear(64, 32) -> ReLU -> BatchNorm1d(32) -> Linear(32, 10)``, Keras's BatchNorm
conventions: momentum 0.01 in PyTorch's sense, eps 1e-3), same loss (cross-entropy on
logits), same optimizer (Adam, lr 1e-3, eps 1e-7), same data (loaded by
:mod:`fastbn.data`), same batch size and the same per-epoch permutations (drawn from the
same seeded generator as fastbn's trainer). Optionally the same initial weights
(``--same-init``: copied from the fastbn model built with the same seed).

PyTorch is optional: this module imports it inside its functions.

Usage::

    python benchmarks/torch_mlp.py --dataset fashion-mnist --epochs 10 --threads 2 \\
        --json out.json
"""

import argparse
import json
import sys
import time

import numpy as np


def build_torch_mlp(
    num_features=784, num_classes=10, hidden=(64, 32), batch_norm=True, init_from=None
):
    """The PyTorch twin of :func:`fastbn.nn.build_mlp`.

    Parameters
    ----------
    num_features, num_classes : int
    hidden : sequence of int
    batch_norm : bool
    init_from : fastbn.nn.Sequential, optional
        Copy its initial Dense weights (transposed to PyTorch's ``(out, in)`` layout).

    Returns
    -------
    torch.nn.Sequential

    Examples
    --------
    >>> model = build_torch_mlp(hidden=(8,))     # doctest: +SKIP
    """
    import torch
    from torch import nn

    layers, width = [], num_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if batch_norm:
            layers.append(nn.BatchNorm1d(h, eps=1e-3, momentum=0.01))
        width = h
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    if init_from is not None:
        from fastbn.nn import Dense

        dense = [layer for layer in init_from.layers if isinstance(layer, Dense)]
        linear = [layer for layer in model if isinstance(layer, nn.Linear)]
        with torch.no_grad():
            for src, dst in zip(dense, linear):
                dst.weight.copy_(torch.from_numpy(np.ascontiguousarray(src.weight.T)))
                dst.bias.copy_(torch.from_numpy(np.array(src.bias)))
    return model


def train(
    dataset="fashion-mnist",
    data_dir=None,
    epochs=1,
    batch_size=128,
    lr=1e-3,
    hidden=(64, 32),
    batch_norm=True,
    threads=None,
    seed=0,
    same_init=False,
    log=print,
):
    """Train the PyTorch model; per-epoch metrics and times like ``fastbn.nn.fit``.

    Parameters
    ----------
    dataset : str
    data_dir : str, optional
    epochs, batch_size : int
    lr : float
    hidden : sequence of int
    batch_norm : bool
    threads : int, optional
        ``torch.set_num_threads``.
    seed : int
        Same meaning as in ``fastbn.nn.fit``: shuffles (and, with ``same_init``, weights).
    same_init : bool
        Start from the fastbn model's initial weights.
    log : callable or None

    Returns
    -------
    dict
        ``{"config": ..., "epochs": [...]}``.
    """
    import torch
    import torch.nn.functional as F

    from fastbn.data import load_dataset
    from fastbn.nn import build_mlp

    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    ds = load_dataset(dataset, data_dir, seed=seed)
    init_seed, shuffle_seed = np.random.SeedSequence(seed).spawn(2)
    init_from = (
        build_mlp(
            ds.num_features,
            ds.num_classes,
            hidden,
            batch_norm=batch_norm,
            rng=np.random.default_rng(init_seed),
        )
        if same_init
        else None
    )
    model = build_torch_mlp(ds.num_features, ds.num_classes, hidden, batch_norm, init_from)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-7, fused=True)
        adam_impl = "fused"
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-7)
        adam_impl = "default"
    rng = np.random.default_rng(shuffle_seed)
    x_train, y_train = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_test, y_test = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    n = x_train.shape[0]
    records = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        t0 = time.perf_counter()
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x_train.index_select(0, idx), y_train.index_select(0, idx)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum += loss.detach().double() * idx.shape[0]
                correct += (logits.argmax(1) == yb).sum()
        t1 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            logits = model(x_test)
            test_loss = float(F.cross_entropy(logits, y_test))
            test_acc = float((logits.argmax(1) == y_test).double().mean())
        record = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / n,
            "train_acc": float(correct) / n,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": t1 - t0,
            "samples_per_s": n / (t1 - t0),
        }
        records.append(record)
        if log is not None:
            log(
                f"torch epoch {epoch:3d}/{epochs}  loss {record['train_loss']:.4f}  "
                f"acc {record['train_acc']:.4f}  test_acc {test_acc:.4f}  {t1 - t0:6.2f}s"
            )
    config = {
        "dataset": dataset,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "hidden": list(hidden),
        "batch_norm": batch_norm,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "adam": adam_impl,
        "same_init": same_init,
    }
    return {"config": config, "epochs": records}


def main(argv=None):
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", default="64,32")
    parser.add_argument("--no-bn", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--same-init", action="store_true")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch_mlp.py needs PyTorch: pip install torch (CPU build)", file=sys.stderr)
        return 2
    result = train(
        args.dataset,
        args.data,
        args.epochs,
        args.batch_size,
        args.lr,
        [int(h) for h in args.hidden.split(",") if h],
        not args.no_bn,
        args.threads,
        args.seed,
        args.same_init,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
