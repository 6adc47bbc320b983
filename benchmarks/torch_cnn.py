"""fastbn.torch against torch.nn.BatchNorm2d inside a small CNN, in paired rounds.

The CNN (:func:`make_cnn`) puts a (32, 64, 56, 56) activation through two BatchNorm2d
layers: conv 3->64, BN, ReLU, conv 64->64, BN, ReLU, global average pool, linear 64->10.
Measured, each with ``torch.nn.BatchNorm2d`` and with ``fastbn.torch.BatchNorm2d``
(:func:`fastbn.torch.convert` of the same model), in interleaved rounds as
:mod:`benchmarks.interleaved` does (the machine's drift stays out of the ratio):

- ``bn-layers``: the two BatchNorm layers alone, forward and backward through autograd
  (``y = bn(x); y.backward(dy)`` on each layer's input, in training mode);
- ``train-step``: a whole SGD step of the CNN (forward, cross-entropy, backward, step);
- ``small-call``: one BatchNorm2d forward and backward through autograd on a (2, 8, 4, 4)
  input, where the per-call overhead dominates; ``overhead`` is fastbn.torch's time there
  minus that of the same two kernels called directly on NumPy arrays
  (``fastbn.batch_norm_forward`` + ``fastbn.batch_norm_backward``): what autograd and the
  tensor round trip cost per call.

Run ``python -m benchmarks.torch_cnn`` (``--rounds``, ``--threads``; default 2 threads);
``benchmarks/test_torch_cnn.py`` times the same calls with pytest-benchmark.
``--layers`` breaks the training step down instead (:func:`step_layers`): each layer's
forward and backward inside the step, both models in paired rounds; ``--faults`` the
same in page faults (medians).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np

ACTIVATION = (32, 64, 56, 56)
SMALL = (2, 8, 4, 4)
OPS = ("bn-layers", "train-step", "small-call")


def make_cnn(torch, channels=ACTIVATION[1], seed=0):
    """The benchmark's CNN with ``torch.nn.BatchNorm2d`` layers (float32, training mode)."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def make_calls(op, shape=ACTIVATION):
    """``{"torch": call, "fastbn": call}`` for ``op`` (see the module docstring).

    Parameters
    ----------
    op : str
        One of :data:`OPS`.
    shape : tuple of int
        The activation the BatchNorm layers see (``(N, C, H, W)``); ``small-call`` uses
        :data:`SMALL`.

    Returns
    -------
    dict of callable
    """
    import torch

    import fastbn.torch as fbt

    N, C, H, W = shape
    torch_model = make_cnn(torch, C)
    models = {"torch": torch_model, "fastbn": fbt.convert(copy.deepcopy(torch_model))}
    gen = torch.Generator().manual_seed(1)
    if op == "train-step":
        x = torch.randn(N, 3, H, W, generator=gen)
        target = torch.randint(0, 10, (N,), generator=gen)

        def step(model, optimizer):
            def call():
                optimizer.zero_grad(set_to_none=False)
                loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                optimizer.step()

            return call

        return {
            name: step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
            for name, model in models.items()
        }
    if op == "bn-layers":
        xs = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(2)]
        dy = torch.randn(shape, generator=gen)

        def layers(model):
            bns = [m for m in model if isinstance(m, torch.nn.BatchNorm2d)]

            def call():
                for bn, x in zip(bns, xs):
                    x.grad = None
                    bn(x).backward(dy)

            call.inputs = xs  # for the smoke test: the gradients land on them
            return call

        return {name: layers(model) for name, model in models.items()}
    if op == "small-call":
        x = torch.randn(SMALL, generator=gen).requires_grad_()
        dy = torch.randn(SMALL, generator=gen)
        bns = {"torch": torch.nn.BatchNorm2d(SMALL[1]), "fastbn": fbt.BatchNorm2d(SMALL[1])}

        def small(bn):
            def call():
                x.grad = None
                bn(x).backward(dy)

            return call

        return {name: small(bn) for name, bn in bns.items()}
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def page_faults():
    """The process's minor page faults so far (``getrusage``): a clock for
    :func:`step_layers` that counts the pages each layer faults in."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_layers(model, x, target, clock=time.perf_counter):
    """One training step of ``model`` (forward, cross-entropy, backward; no optimizer)
    timed layer by layer: ``{"<i> <Layer> forward": s, "<i> <Layer> backward": s, ...}``.
    ``clock``: what is read around each layer (:func:`page_faults` counts faults instead).

    Each layer's forward is timed around its call; its backward is the time between
    the gradient of its output and that of its input becoming available (tensor hooks,
    run by the autograd engine as it goes; the first layer's input needs no gradient:
    its backward ends with ``backward()``). ``loss`` is the cross-entropy, forward and
    backward. The hooks' own cost (~µs) is in the times.

    Examples
    --------
    >>> import torch
    >>> model = make_cnn(torch, channels=4)
    >>> times = step_layers(model, torch.randn(2, 3, 5, 5), torch.tensor([1, 2]))
    >>> sorted(times)[:2]
    ['0 Conv2d backward', '0 Conv2d forward']
    """
    import torch

    now = clock
    stamps = {}  # layer index -> when the gradient of its output was ready
    times = {}
    h = x
    for i, layer in enumerate(model):
        start = now()
        h = layer(h)
        times[f"{i} {type(layer).__name__} forward"] = now() - start
        h.register_hook(lambda grad, i=i: stamps.__setitem__(i, now()))
    start = now()
    loss = torch.nn.functional.cross_entropy(h, target)
    times["loss forward"] = now() - start
    start = now()
    loss.backward()
    end = now()
    last = len(model) - 1
    times["loss backward"] = stamps[last] - start
    for i in range(last, -1, -1):
        done = stamps[i - 1] if i else end
        times[f"{i} {type(model[i]).__name__} backward"] = done - stamps[i]
    return times


def measure_layers(rounds=10, threads=2, shape=ACTIVATION, clock=time.perf_counter):
    """:func:`step_layers` of the CNN with each provider's BatchNorm2d, in paired rounds
    (the order alternating); the step's gradients are zeroed, never applied. ``clock``:
    see :func:`step_layers`.

    Returns
    -------
    dict
        ``{"threads", "rounds", "layers": {name: {"torch": s, "fastbn": s}}}``: medians
        over the rounds.
    """
    import numba
    import torch

    import fastbn.torch as fbt

    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    N, C, H, W = shape
    torch_model = make_cnn(torch, C)
    models = {"torch": torch_model, "fastbn": fbt.convert(copy.deepcopy(torch_model))}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, H, W, generator=gen)
    target = torch.randint(0, 10, (N,), generator=gen)
    names = list(models)
    samples = {name: [] for name in names}
    for r in range(rounds + 1):  # the first round compiles and faults in: not kept
        for name in names if r % 2 == 0 else names[::-1]:
            models[name].zero_grad(set_to_none=False)
            times = step_layers(models[name], x, target, clock)
            if r:
                samples[name].append(times)
    layers = {
        key: {name: statistics.median(t[key] for t in samples[name]) for name in names}
        for key in samples["torch"][0]
    }
    return {"threads": threads, "rounds": rounds, "layers": layers}


def direct_small_call():
    """The kernels of ``small-call`` called directly on NumPy arrays (no autograd)."""
    import fastbn

    rng = np.random.default_rng(1)
    x = rng.standard_normal(SMALL, dtype=np.float32)
    dy = rng.standard_normal(SMALL, dtype=np.float32)
    gamma, beta = np.ones(SMALL[1], np.float32), np.zeros(SMALL[1], np.float32)

    def forward_backward():
        y, mean, invstd = fastbn.batch_norm_forward(x, gamma, beta)
        fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)

    return forward_backward


def paired(calls, rounds, iterations=1):
    """Time every call of ``calls`` in interleaved rounds (the order alternating).

    Returns
    -------
    dict
        ``{name: median seconds per call}``, ``"best"``: ``{name: the fastest round's
        seconds per call}`` (on a machine busy with other work, the cost of a small call
        without the waits for a core), and ``"speedup"``: the median over rounds of
        torch's time over fastbn's (when both are in ``calls``).

    Examples
    --------
    >>> r = paired({"torch": lambda: None, "fastbn": lambda: None}, rounds=3)
    >>> sorted(r)
    ['best', 'fastbn', 'speedup', 'torch']
    """
    names = list(calls)
    for call in calls.values():  # compile, fault outputs in
        call()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(iterations):
                calls[name]()
            times[name].append((time.perf_counter() - start) / iterations)
    result = {name: statistics.median(t) for name, t in times.items()}
    result["best"] = {name: min(t) for name, t in times.items()}
    if "torch" in times and "fastbn" in times:
        ratios = [t / max(f, 1e-12) for f, t in zip(times["fastbn"], times["torch"])]
        result["speedup"] = statistics.median(ratios)
    return result


#: ``(rounds, iterations)`` per op.
ROUNDS = {"bn-layers": (30, 1), "train-step": (10, 1), "small-call": (100, 20)}


def measure(ops=OPS, rounds=None, threads=2, progress=print):
    """Every op of ``ops`` in paired rounds; the small call's autograd overhead.

    Returns
    -------
    dict
        ``{"threads", "activation", "ops": {op: {"torch", "fastbn", "speedup"}},
        "overhead_s"}`` (seconds per call; the overhead from the fastest rounds).
    """
    import numba
    import torch

    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    result = {"threads": threads, "activation": list(ACTIVATION), "ops": {}}
    for op in ops:
        n, iterations = ROUNDS[op] if rounds is None else (rounds, ROUNDS[op][1])
        calls = make_calls(op)
        if op == "small-call":
            calls["direct"] = direct_small_call()
        result["ops"][op] = paired(calls, n, iterations)
        if progress:
            progress(f"{op}: {json.dumps(result['ops'][op])}")
    small = result["ops"].get("small-call")
    if small:  # the fastest rounds: the call's own cost, not the machine's waits
        result["overhead_s"] = small["best"]["fastbn"] - small["best"]["direct"]
    return result


def main(argv=None):
    """``python -m benchmarks.torch_cnn``: print the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    parser.add_argument("--layers", action="store_true", help="the step layer by layer")
    parser.add_argument("--faults", action="store_true", help="--layers in page faults")
    args = parser.parse_args(argv)
    if args.layers or args.faults:
        clock, scale, unit, digits = (
            (page_faults, 1, "faults", 0) if args.faults else (time.perf_counter, 1e3, "ms", 2)
        )
        result = measure_layers(args.rounds or 10, args.threads, clock=clock)
        for key, t in result["layers"].items():
            print(
                f"{key:28s} torch {t['torch'] * scale:8.{digits}f} {unit}  "
                f"fastbn {t['fastbn'] * scale:8.{digits}f} {unit}"
            )
        return
    print(json.dumps(measure(args.ops, args.rounds, args.threads), indent=2))


if __name__ == "__main__":
    main()
