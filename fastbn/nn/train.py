"""The training loop: :func:`fit` (what ``fastbn train`` runs) and its building blocks.

The hot loop per batch: gather the batch's rows into a preallocated buffer
(``xp.take(..., out=)``), forward, fused softmax-cross-entropy + gradient, backward
(the first layer skips its input gradient), one fused optimizer kernel over the model's
flat parameter array. Loss and accuracy accumulate on the device; nothing is allocated
per batch except the BatchNorm layers' outputs.

Determinism: weights come from ``SeedSequence(seed)``'s first child, the per-epoch
shuffles from its second child (a :class:`numpy.random.Generator`), and fastbn's kernels
are bitwise reproducible; with the same BLAS and thread count a run is reproducible,
and a run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

import contextlib
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

from .. import _config
from .. import data as _data
from . import _device
from . import checkpoint as _checkpoint
from .fold import fold_batch_norm
from .layers import BatchNorm, Dense, Sequential
from .loss import SoftmaxCrossEntropy
from .optim import SGD, Adam
from .parallel import DataParallel
from .precise import update_bn_stats

__all__ = [
    "fit",
    "build_mlp",
    "train_epoch",
    "evaluate",
    "warm_up",
    "History",
    "set_threads",
    "DEFAULTS",
    "COMPILE_NOTICE",
]

# Said once (on stderr) when the kernels of a run are being compiled, not loaded from the
# JIT cache.
COMPILE_NOTICE = "compiling kernels, first run only…"

# The defaults of fit() (and of `fastbn train`): the design's Keras example.
DEFAULTS = {
    "dataset": "fashion-mnist",
    "hidden": [64, 32],
    "batch_norm": True,
    "bn_position": "after_relu",
    "bn_convention": "keras",
    "bn_momentum": None,
    "bn_renorm": False,
    "bn_virtual_batch_size": None,
    "init": "glorot_uniform",
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 128,
    "seed": 0,
    "dtype": "float32",
    "precise_bn": False,
}
# Rows per forward of evaluate() and of the precise-statistics pass.
_EVAL_BATCH = 2048
# Options that fix the shapes and meaning of a checkpoint's arrays: a resumed run must
# keep them.
_ARCHITECTURE = (
    "hidden",
    "batch_norm",
    "bn_position",
    "bn_convention",
    "bn_renorm",
    "optimizer",
    "dtype",
)


def build_mlp(
    num_features=784,
    num_classes=10,
    hidden=(64, 32),
    *,
    batch_norm=True,
    bn_position="after_relu",
    bn_convention="keras",
    bn_momentum=None,
    init="glorot_uniform",
    dtype=np.float32,
    rng=None,
    device="cpu",
    bn_renorm=False,
    bn_virtual_batch_size=None,
):
    """The MLP of the design's Keras example (or a variant of it).

    Default: ``Dense(64, relu) -> BatchNorm -> Dense(32, relu) -> BatchNorm -> Dense(10)``;
    the softmax of Keras's last ``Dense(10, activation="softmax")`` is fused into
    :class:`~fastbn.nn.SoftmaxCrossEntropy`.

    Parameters
    ----------
    num_features, num_classes : int
    hidden : sequence of int, default (64, 32)
        Widths of the hidden layers.
    batch_norm : bool, default True
        Insert a BatchNorm layer per hidden layer.
    bn_position : {"after_relu", "before_relu"}, default "after_relu"
        ``"after_relu"``: Keras's ``Dense(relu) -> BatchNorm``. ``"before_relu"``:
        ``Dense -> BatchNorm+ReLU`` (the original paper's order, fused in one fastbn kernel).
    bn_convention : {"keras", "torch"}, default "keras"
        Momentum/epsilon conventions of the BatchNorm layers.
    bn_momentum : float, optional
        BatchNorm momentum in the convention's own meaning (Keras: weight of the old
        running value, default 0.99; PyTorch: weight of the new batch, default 0.1).
    init : str, default "glorot_uniform"
        Weight initialization of the Dense layers (see :class:`~fastbn.nn.Dense`).
    dtype : numpy dtype, default float32
    rng : numpy.random.Generator or int, optional
        Source of the initial weights.
    device : {"cpu", "cuda"}, default "cpu"
    bn_renorm : bool, default False
        Batch renormalization in every BatchNorm layer (:class:`fastbn.BatchNorm`'s
        ``renorm``, Keras's default clipping and ``renorm_momentum``).
    bn_virtual_batch_size : int, optional
        Ghost batches of this many samples in every BatchNorm layer.

    Returns
    -------
    Sequential

    Examples
    --------
    >>> model = build_mlp(rng=0)
    >>> [type(layer).__name__ for layer in model.layers]
    ['Dense', 'BatchNorm', 'Dense', 'BatchNorm', 'Dense']
    >>> model.store.size   # 784*64+64 + 2*64 + 64*32+32 + 2*32 + 32*10+10
    52842
    """
    if bn_position not in ("after_relu", "before_relu"):
        raise ValueError(f"bn_position must be 'after_relu' or 'before_relu', got {bn_position!r}")
    hidden = [int(h) for h in hidden]
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be positive, got {hidden}")
    rng = np.random.default_rng(rng)
    layers, width = [], int(num_features)
    variants = dict(renorm=bool(bn_renorm), virtual_batch_size=bn_virtual_batch_size)
    for h in hidden:
        if batch_norm and bn_position == "before_relu":
            layers.append(Dense(width, h, None, init=init, rng=rng, dtype=dtype))
            layers.append(
                BatchNorm(
                    h,
                    convention=bn_convention,
                    momentum=bn_momentum,
                    activation="relu",
                    dtype=dtype,
                    **variants,
                )
            )
        else:
            layers.append(Dense(width, h, "relu", init=init, rng=rng, dtype=dtype))
            if batch_norm:
                layers.append(
                    BatchNorm(
                        h,
                        convention=bn_convention,
                        momentum=bn_momentum,
                        dtype=dtype,
                        **variants,
                    )
                )
        width = h
    layers.append(Dense(width, int(num_classes), None, init=init, rng=rng, dtype=dtype))
    return Sequential(layers, device=device)


class History:
    """Per-epoch metrics of a run, its configuration, and the trained model.

    Attributes
    ----------
    epochs : list of dict
        One record per epoch: ``epoch``, ``train_loss``, ``train_acc``, ``test_loss``,
        ``test_acc``, ``seconds`` (training time of the epoch), ``samples_per_s``,
        ``eval_seconds``, and with ``precise_bn`` ``precise_bn_seconds`` (the time of
        :func:`~fastbn.nn.update_bn_stats` before that epoch's evaluation).
    config : dict
        The resolved options of the run.
    model : Sequential
    optimizer : Adam or SGD
    fold : dict or None
        With ``fit(fold=...)``: the folded inference model's file, layers, test loss and
        accuracy, and its largest logit difference from the trained model on the test set.

    Examples
    --------
    >>> h = History([{"epoch": 1, "test_acc": 0.5}], {"seed": 0})
    >>> h["epochs"][0]["test_acc"], h.to_dict()["config"]
    (0.5, {'seed': 0})
    """

    def __init__(self, epochs, config, model=None, optimizer=None):
        self.epochs = list(epochs)
        self.config = dict(config)
        self.model = model
        self.optimizer = optimizer
        self.fold = None

    def __getitem__(self, key):
        return self.to_dict()[key]

    def __repr__(self):
        last = self.epochs[-1] if self.epochs else {}
        return (
            f"History({len(self.epochs)} epochs, last test_acc="
            f"{last.get('test_acc', float('nan')):.4f})"
        )

    def to_dict(self):
        """``{"config": ..., "epochs": [...]}`` (JSON-serializable), and ``"fold"`` if set."""
        record = {"config": self.config, "epochs": self.epochs}
        if self.fold is not None:
            record["fold"] = self.fold
        return record


def set_threads(threads, blas_threads=None):
    """Use ``threads`` threads for fastbn's Numba kernels and ``blas_threads`` for the BLAS.

    Numba: :func:`numba.set_num_threads` (at most ``NUMBA_NUM_THREADS``, the core count by
    default). BLAS: through ``threadpoolctl`` when it is installed, else through OpenBLAS's
    own ``openblas_set_num_threads`` found in the process (NumPy's wheels bundle
    OpenBLAS); when neither works a warning says to set ``OPENBLAS_NUM_THREADS`` /
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` before starting Python.

    Parameters
    ----------
    threads : int
        Positive thread count for Numba.
    blas_threads : int, optional
        Thread count for the BLAS; defaults to ``threads``.

    Returns
    -------
    dict
        ``{"numba": n, "blas": m, "blas_via": how the BLAS was set, or None}``.

    Raises
    ------
    ValueError
        ``threads`` < 1 or above Numba's maximum, or ``blas_threads`` < 1.

    Examples
    --------
    >>> import numba
    >>> set_threads(1)["numba"]
    1
    >>> set_threads(numba.config.NUMBA_NUM_THREADS)["numba"] >= 1
    True
    """
    import numba

    threads = int(threads)
    limit = numba.config.NUMBA_NUM_THREADS
    if threads < 1 or threads > limit:
        raise ValueError(f"threads must lie in [1, {limit}] (NUMBA_NUM_THREADS), got {threads}")
    blas_threads = threads if blas_threads is None else int(blas_threads)
    if blas_threads < 1:
        raise ValueError(f"blas_threads must be >= 1, got {blas_threads}")
    numba.set_num_threads(threads)
    return {"numba": threads, "blas": blas_threads, "blas_via": _set_blas_threads(blas_threads)}


def _openblas_functions():
    """``(set, get)`` thread-count functions of the OpenBLAS loaded in this process, or None."""
    import ctypes

    names = [
        ("openblas_set_num_threads", "openblas_get_num_threads"),
        ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
        ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
        ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ]
    libraries = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "openblas" in os.path.basename(path).lower():
                    libraries.add(path)
    except OSError:
        return None
    for library in sorted(libraries):
        try:
            lib = ctypes.CDLL(library)
        except OSError:
            continue
        for set_name, get_name in names:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                return setter, getter, f"{os.path.basename(library)}:{set_name}"
    return None


def _set_blas_threads(threads):
    """Set the BLAS thread count; returns how, or None (with a warning) when it could not.

    Parameters
    ----------
    threads : int

    Returns
    -------
    str or None
    """
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
        return "threadpoolctl"
    except ImportError:
        pass
    import ctypes

    functions = _openblas_functions()
    if functions is not None:
        functions[0](ctypes.c_int(threads))
        return functions[2]
    warnings.warn(
        "could not set the BLAS thread count (install threadpoolctl, or set "
        "OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS before "
        "starting Python)",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


class _BlasThreads:
    """Context manager: the BLAS on ``threads`` threads inside, the previous count after.

    ``threads=None`` leaves the BLAS alone.
    """

    def __init__(self, threads):
        self.threads = threads
        self._restore = None

    def __enter__(self):
        if self.threads is None:
            return self
        try:
            import threadpoolctl

            self._restore = threadpoolctl.threadpool_limits(
                limits=int(self.threads), user_api="blas"
            )
            return self
        except ImportError:
            pass
        functions = _openblas_functions()
        if functions is None:
            warnings.warn(
                "could not set the BLAS thread count (install threadpoolctl)",
                RuntimeWarning,
                stacklevel=2,
            )
            return self
        import ctypes

        setter, getter, _ = functions
        previous = int(getter())
        setter(ctypes.c_int(int(self.threads)))
        self._restore = lambda: setter(ctypes.c_int(previous))
        return self

    def __exit__(self, *exc):
        if self._restore is None:
            return
        if hasattr(self._restore, "restore_original_limits"):
            self._restore.restore_original_limits()
        else:
            self._restore()


def train_epoch(model, loss, optimizer, x, y, batch_size, rng, progress=None, parallel=None):
    """One pass over ``(x, y)`` in shuffled mini-batches (the last one may be smaller).

    With ``parallel`` (a :class:`~fastbn.nn.parallel.DataParallel`), the same loop
    trains data-parallel: every rank draws the same permutation and takes its shard of
    each global batch of ``batch_size`` rows (``parallel.shard``); the loss gradient is
    that of the global batch's mean loss; the gradients are summed over the ranks after
    each backward (``parallel.reduce_gradients``) and the epoch's totals at its end.

    Parameters
    ----------
    model : Sequential
    loss : SoftmaxCrossEntropy
    optimizer : Adam or SGD
    x : array, shape (n, features)
        On the model's device.
    y : array of int64, shape (n,)
    batch_size : int
    rng : numpy.random.Generator
        Draws the epoch's permutation (on the host, so both devices shuffle alike).
    progress : object with ``update(n)``, optional
        A progress bar, advanced once per batch.
    parallel : DataParallel, optional
        Data-parallel over MPI: ``x``, ``y`` and ``rng`` are then the same on every rank,
        and ``batch_size`` is the global batch size (all ranks together).

    Returns
    -------
    loss : float
        Mean training loss over the epoch (training-mode forward, as Keras reports it);
        with ``parallel``, over all ranks (the same on every rank).
    accuracy : float

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.data import make_synthetic
    >>> ds = make_synthetic(n_train=512, n_test=10)
    >>> model = build_mlp(hidden=(16,), rng=0)
    >>> loss, acc = train_epoch(model, SoftmaxCrossEntropy(), Adam(model.store, lr=1e-2),
    ...                         ds.x_train, ds.y_train, 64, np.random.default_rng(0))
    >>> acc > 0.5
    True
    """
    xp = model.xp
    n = x.shape[0]
    perm = rng.permutation(n)
    if xp is not np:
        perm = xp.asarray(perm)
    x_batch = xp.empty((min(batch_size, n), x.shape[1]), x.dtype)
    y_batch = xp.empty(min(batch_size, n), y.dtype)
    acc = xp.zeros(2, np.float64)
    forward, backward, step = model.forward, model.backward, optimizer.step
    loss_grad, take = loss.forward_backward, xp.take
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        scale = 1.0 / idx.shape[0]  # the gradient of the (global) batch's mean loss
        if parallel is not None:
            idx = parallel.shard(idx)
        k = idx.shape[0]
        xb, yb = x_batch[:k], y_batch[:k]
        take(x, idx, axis=0, out=xb)
        take(y, idx, out=yb)
        backward(loss_grad(forward(xb, True), yb, acc, scale))
        if parallel is not None:
            parallel.reduce_gradients()
        step()
        if progress is not None:
            progress.update(1)
    acc = _device.to_host(acc)
    if parallel is not None:
        parallel.reduce_totals(acc)
    return float(acc[0]) / max(n, 1), float(acc[1]) / max(n, 1)


def evaluate(model, loss, x, y, batch_size=2048, parallel=None):
    """Mean loss and accuracy in evaluation mode (BatchNorm uses running statistics).

    Parameters
    ----------
    model : Sequential
    loss : SoftmaxCrossEntropy
    x : array, shape (n, features)
    y : array of int64, shape (n,)
    batch_size : int, default 2048
        Rows per forward (results do not depend on it).
    parallel : DataParallel, optional
        Share the rows among the ranks (``parallel.bounds``) and sum the totals over
        them; ``x`` and ``y`` are then the whole set, the same on every rank.

    Returns
    -------
    loss : float
    accuracy : float
        With ``parallel``, over all the rows (the same on every rank).

    Examples
    --------
    >>> import numpy as np
    >>> model = build_mlp(hidden=(8,), rng=0)
    >>> x = np.zeros((4, 784), np.float32)
    >>> loss, acc = evaluate(model, SoftmaxCrossEntropy(), x, np.zeros(4, np.int64))
    >>> round(loss, 4)       # zero input, zero biases: uniform softmax, loss log(10)
    2.3026
    """
    xp = model.xp
    acc = xp.zeros(2, np.float64)
    n = x.shape[0]
    first, stop = (0, n) if parallel is None else parallel.bounds(n)
    for start in range(first, stop, batch_size):
        end = min(start + batch_size, stop)
        loss.forward_backward(model.forward(x[start:end], False), y[start:end], acc)
    acc = _device.to_host(acc)
    if parallel is not None:
        parallel.reduce_totals(acc)
    return float(acc[0]) / max(n, 1), float(acc[1]) / max(n, 1)


def _row_batches(x, batch_size):
    """Consecutive slices of ``batch_size`` rows of ``x`` (the last one may be smaller)."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def warm_up(
    model,
    optimizer,
    x_train,
    y_train,
    x_test,
    y_test,
    batch_size,
    eval_batch_size=2048,
    precise_bn=False,
):
    """Run every kernel a training run will call, on a throwaway ``model`` and ``optimizer``.

    One training step per distinct batch size of an epoch (the full batch and the last,
    smaller one) and one evaluation batch per distinct size: kernels, serial and parallel
    builds alike, are chosen by shape, so these calls compile (or load from the JIT cache)
    exactly those of the run, and the run's timings and progress bar leave compilation
    out. ``model`` and ``optimizer`` are trained on a few rows: pass twins of the real
    ones (``fit`` builds them with the run's configuration).

    Parameters
    ----------
    model : Sequential
    optimizer : Adam or SGD
        Over ``model.store``.
    x_train, y_train, x_test, y_test : arrays on the model's device
    batch_size : int
    eval_batch_size : int, default 2048
        :func:`evaluate`'s batch size.
    precise_bn : bool, default False
        Also run :func:`~fastbn.nn.update_bn_stats` over the training rows in batches of
        ``eval_batch_size``, as ``fit(precise_bn=True)`` does after each epoch.

    Examples
    --------
    >>> from fastbn.data import make_synthetic
    >>> ds = make_synthetic(n_train=300, n_test=50)
    >>> model = build_mlp(hidden=(8,), rng=0)
    >>> warm_up(model, Adam(model.store), ds.x_train, ds.y_train, ds.x_test, ds.y_test, 128)
    """
    loss = SoftmaxCrossEntropy()
    n = x_train.shape[0]
    rows = n if n <= batch_size else batch_size + n % batch_size
    if rows:
        train_epoch(
            model,
            loss,
            optimizer,
            x_train[:rows],
            y_train[:rows],
            batch_size,
            np.random.default_rng(0),
        )
    n_test = x_test.shape[0]
    rows = n_test if n_test <= eval_batch_size else eval_batch_size + n_test % eval_batch_size
    if rows:
        evaluate(model, loss, x_test[:rows], y_test[:rows], eval_batch_size)
    rows = n if n <= eval_batch_size else eval_batch_size + n % eval_batch_size
    if precise_bn and rows > 1:
        update_bn_stats(model, _row_batches(x_train[:rows], eval_batch_size))


def _progress_bar(total, desc, enabled):
    """A tqdm bar on stderr, or None when disabled, not a tty, or tqdm is missing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)


def _resolve_config(options, resumed):
    """Merge defaults, a checkpoint's configuration and explicit options.

    Parameters
    ----------
    options : dict
        fit()'s configuration arguments; None means "not given".
    resumed : dict or None
        The checkpoint's configuration.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        An explicit option contradicts the checkpoint's architecture.
    """
    config = dict(DEFAULTS)
    if resumed is not None:
        config.update({k: v for k, v in resumed.items() if k in DEFAULTS})
    for key, value in options.items():
        if value is None:
            continue
        if key == "hidden":
            value = [int(h) for h in value]
        if key == "dtype":
            value = np.dtype(value).name
        if resumed is not None and key in _ARCHITECTURE and value != resumed.get(key):
            raise ValueError(
                f"{key}={value!r} contradicts the checkpoint being resumed "
                f"({key}={resumed.get(key)!r}); leave it out or start a new run"
            )
        config[key] = value
    if config["bn_momentum"] is None:
        # Keras's BatchNormalization default (0.99, i.e. 1 % of each batch) makes the
        # running statistics lag behind weights that Adam still moves: 10 epochs at batch
        # 128 test 0.866 +- 0.005 with it, 0.876 with 0.9 (docs/trainer.md). 0.9 in
        # Keras's meaning is 0.1 in PyTorch's, its default.
        config["bn_momentum"] = 0.9 if config["bn_convention"] == "keras" else 0.1
    if config["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config['optimizer']!r}")
    if int(config["batch_size"]) < 1:
        raise ValueError(f"batch_size must be >= 1, got {config['batch_size']}")
    k = config["bn_virtual_batch_size"]
    if k is not None and (int(k) < 1 or int(config["batch_size"]) % int(k)):
        raise ValueError(
            f"bn_virtual_batch_size={k} must be >= 1 and divide batch_size ({config['batch_size']})"
        )
    if np.dtype(config["dtype"]) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {config['dtype']}")
    return config


def _write_metrics(path, history, extra=None):
    """Write the metrics JSON atomically."""
    record = history.to_dict()
    if extra:
        record.update(extra)
    _checkpoint.atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def fit(
    dataset=None,
    *,
    data_dir=None,
    epochs=10,
    batch_size=None,
    lr=None,
    hidden=None,
    batch_norm=None,
    bn_position=None,
    bn_convention=None,
    bn_momentum=None,
    bn_renorm=None,
    bn_virtual_batch_size=None,
    init=None,
    optimizer=None,
    device="cpu",
    seed=None,
    dtype=None,
    precise_bn=None,
    threads=None,
    blas_threads=1,
    save=None,
    resume=None,
    metrics_out=None,
    fold=None,
    progress=None,
    log=print,
    download=True,
    comm=None,
):
    """Train the MLP on a dataset and return its history (what ``fastbn train`` runs).

    Options left as None take the checkpoint's value when resuming, else :data:`DEFAULTS`
    (the design's Keras example: ``Dense(64, relu) -> BatchNorm -> Dense(32, relu) ->
    BatchNorm -> Dense(10, softmax)``, Adam at lr 1e-3, batch 128, Fashion-MNIST).

    Parameters
    ----------
    dataset : {"fashion-mnist", "mnist", "synthetic"} or Dataset, optional
        A name (loaded with :func:`fastbn.data.load_dataset`) or a loaded dataset.
    data_dir : str, optional
        Directory searched first for the IDX files.
    epochs : int, default 10
        Total number of epochs; a resumed run continues until this many are done.
    batch_size : int, optional (128)
    lr : float, optional (1e-3)
    hidden : sequence of int, optional ((64, 32))
    batch_norm : bool, optional (True)
    bn_position : {"after_relu", "before_relu"}, optional ("after_relu")
    bn_convention : {"keras", "torch"}, optional ("keras")
    bn_momentum : float, optional
        BatchNorm momentum in the convention's meaning; default 0.9 for ``"keras"`` (not
        Keras's layer default 0.99, whose running statistics lag: see docs/trainer.md)
        and 0.1 for ``"torch"``: both weigh each new batch by 0.1.
    bn_renorm : bool, optional (False)
        Batch renormalization in the BatchNorm layers (see :func:`build_mlp`).
    bn_virtual_batch_size : int, optional
        Ghost batches of this many samples in the BatchNorm layers; it must divide
        ``batch_size`` and the size of the epoch's last, shorter batch.
    init : str, optional ("glorot_uniform")
    optimizer : {"adam", "sgd"}, optional ("adam"; SGD uses momentum 0.9)
    device : {"cpu", "cuda"}, default "cpu"
    seed : int, optional (0)
        Seeds the initial weights, the shuffles and the synthetic dataset.
    dtype : {"float32", "float64"}, optional ("float32")
    precise_bn : bool, optional (False)
        After each epoch's training, before its evaluation, replace every BatchNorm
        layer's running statistics with the exact statistics of its input over the whole
        training set (:func:`~fastbn.nn.update_bn_stats`, in batches of 2048 rows): each
        epoch's ``test_acc`` and the saved model use them. The next epoch's training
        updates them with the momentum again from there (training itself normalizes with
        batch statistics, so the weights are those of the run without ``precise_bn``).
        The pass's time is the epoch's ``precise_bn_seconds``.
    threads : int, optional
        Threads for the Numba kernels (:func:`numba.set_num_threads`); all cores when None.
    blas_threads : int or None, default 1
        Threads of the BLAS while training (restored afterwards); None leaves the BLAS
        alone. One thread is the fastest for this model's matrix products (at most
        128 x 784 x 64): OpenBLAS's threading costs more than it saves at that size, and
        on a machine shared with other processes its spinning threads can make an epoch
        several times slower (measured in docs/trainer.md).
    save : str, optional
        Checkpoint written (atomically) after every epoch.
    resume : str, optional
        Checkpoint to continue from: weights, optimizer state, BatchNorm statistics,
        epoch counter, RNG state and the history so far.
    metrics_out : str, optional
        JSON file rewritten after every epoch: ``{"config": ..., "epochs": [...]}``.
    fold : str, optional
        After training, write the inference model with every BatchNorm folded into a
        Dense layer (:func:`~fastbn.nn.fold_batch_norm`) to this ``.npz`` file: its
        ``state_dict()``, the same names and shapes as the model built with
        ``batch_norm=False``. Its test loss and accuracy and its largest logit difference
        from the trained model on the test set are ``History.fold`` (and ``"fold"`` in
        the metrics JSON).
    progress : bool, optional
        tqdm bar per epoch; None shows it when stderr is a terminal.
    log : callable or None, default print
        Receives the one-line summary of each epoch.
    download : bool, default True
        Allow fetching missing dataset files.
    comm : mpi4py.MPI.Comm, optional
        Data-parallel training over MPI (``mpiexec -n P fastbn train --distributed``):
        every rank of ``comm`` calls ``fit`` with the same arguments; each global batch
        of ``batch_size`` rows is split among the ranks, BatchNorm is synchronized and
        gradients are summed with one Allreduce per step
        (:class:`fastbn.nn.parallel.DataParallel`), so the run follows the
        single-process one to rounding. Only rank 0 logs, shows progress and writes
        ``save`` and ``metrics_out``; every rank returns the same history. CPU only.

    Returns
    -------
    History

    Examples
    --------
    >>> h = fit("synthetic", epochs=2, hidden=(32,), log=None)
    >>> len(h.epochs), h.epochs[-1]["test_acc"] > 0.9
    (2, True)
    """
    state = _checkpoint.load_checkpoint(resume) if resume is not None else None
    options = {
        "dataset": dataset if dataset is None or isinstance(dataset, str) else dataset.name,
        "hidden": hidden,
        "batch_norm": batch_norm,
        "bn_position": bn_position,
        "bn_convention": bn_convention,
        "bn_momentum": bn_momentum,
        "bn_renorm": bn_renorm,
        "bn_virtual_batch_size": bn_virtual_batch_size,
        "init": init,
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "dtype": dtype,
        "precise_bn": precise_bn,
    }
    if state is not None:
        with _checkpoint_errors(resume):  # the checkpoint's own configuration is valid
            _resolve_config({}, state["config"])
    config = _resolve_config(options, state["config"] if state else None)
    epochs = int(epochs)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    import numba

    if threads is not None:
        limit = numba.config.NUMBA_NUM_THREADS
        if not 1 <= int(threads) <= limit:
            raise ValueError(f"threads must lie in [1, {limit}] (NUMBA_NUM_THREADS), got {threads}")
        numba.set_num_threads(int(threads))
    if blas_threads is not None and int(blas_threads) < 1:
        raise ValueError(f"blas_threads must be >= 1, got {blas_threads}")
    thread_info = {"numba": numba.get_num_threads(), "blas": blas_threads}

    if isinstance(dataset, _data.Dataset):
        ds = dataset
    else:
        ds = _data.load_dataset(config["dataset"], data_dir, seed=config["seed"], download=download)
    last = ds.x_train.shape[0] % int(config["batch_size"])
    k = config["bn_virtual_batch_size"]
    if k is not None and last % int(k):
        raise ValueError(
            f"bn_virtual_batch_size={k} must divide the epoch's last batch too: "
            f"{ds.x_train.shape[0]} training samples leave a batch of {last} after "
            f"batches of {config['batch_size']}"
        )
    xp = _device.array_module(device)
    np_dtype = np.dtype(config["dtype"])
    x_train = xp.asarray(ds.x_train.astype(np_dtype, copy=False))
    x_test = xp.asarray(ds.x_test.astype(np_dtype, copy=False))
    y_train = xp.asarray(ds.y_train.astype(np.int64, copy=False))
    y_test = xp.asarray(ds.y_test.astype(np.int64, copy=False))

    init_seed, shuffle_seed = np.random.SeedSequence(config["seed"]).spawn(2)

    def build(rng):
        model = build_mlp(
            ds.num_features,
            ds.num_classes,
            config["hidden"],
            batch_norm=config["batch_norm"],
            bn_position=config["bn_position"],
            bn_convention=config["bn_convention"],
            bn_momentum=config["bn_momentum"],
            init=config["init"],
            dtype=np_dtype,
            rng=rng,
            device=device,
            bn_renorm=config["bn_renorm"],
            bn_virtual_batch_size=config["bn_virtual_batch_size"],
        )
        if config["optimizer"] == "adam":
            return model, Adam(model.store, lr=config["lr"])
        return model, SGD(model.store, lr=config["lr"], momentum=0.9)

    if state is None:
        model, opt = build(np.random.default_rng(init_seed))
    else:
        with _checkpoint_errors(resume):
            model, opt = build(np.random.default_rng(init_seed))
    rng = np.random.default_rng(shuffle_seed)
    loss = SoftmaxCrossEntropy()
    records, start_epoch = [], 0
    if state is not None:
        with _checkpoint_errors(resume):
            model.load_state_dict(state["model_state"])
            opt.load_state_dict(state["optimizer_state"])
            rng.bit_generator.state = state["rng_state"]
        records, start_epoch = list(state["history"]), state["epoch"]
    parallel = None
    if comm is not None:
        parallel = DataParallel(model, comm)  # broadcasts rank 0's parameters
    root = parallel is None or parallel.rank == 0
    run_info = {
        "device": device,
        "threads": thread_info,
        "machine": platform.node(),
        "ranks": 1 if parallel is None else parallel.size,
        "data_source": ds.source,
        "n_train": int(ds.x_train.shape[0]),
        "n_test": int(ds.x_test.shape[0]),
    }
    history = History(records, dict(config, **run_info), model, opt)
    say = log if root else None
    if say is not None:
        where = "generated" if ds.source == "synthetic" else f"from {ds.source}"
        say(
            f"data: {ds.name} {where} ({ds.x_train.shape[0]:,} training, "
            f"{ds.x_test.shape[0]:,} test samples)"
        )
    if start_epoch >= epochs:
        if say is not None:
            say(
                f"nothing to train: {start_epoch} of {epochs} epochs already done"
                if state is not None
                else "nothing to train: epochs=0"
            )
        if root and metrics_out is not None:
            _write_metrics(metrics_out, history)
        return history

    # Compile (or load) every kernel of the run before the first epoch, on a twin of the
    # model, so the progress bar, its ETA and epoch 1's samples/s measure training only.
    announced = []

    def announce():
        if not announced and say is not None:
            print(
                COMPILE_NOTICE if _config.CACHE else "compiling kernels (JIT cache off)…",
                file=sys.stderr,
                flush=True,
            )
        announced.append(time.perf_counter())

    # Each rank of a distributed run trains on its share of every global batch.
    local_batch = -(-int(config["batch_size"]) // (1 if parallel is None else parallel.size))
    t_warm = time.perf_counter()
    with _config.on_compile(announce), _BlasThreads(blas_threads):
        warm_up(
            *build(np.random.default_rng(0)),
            x_train,
            y_train,
            x_test,
            y_test,
            local_batch,
            precise_bn=bool(config["precise_bn"]),
        )
    history.config["warmup_seconds"] = time.perf_counter() - t_warm
    if announced and say is not None:
        print(
            f"kernels compiled in {time.perf_counter() - announced[0]:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    n_batches = -(-ds.x_train.shape[0] // int(config["batch_size"]))
    with _BlasThreads(blas_threads):
        for epoch in range(start_epoch + 1, epochs + 1):
            bar = _progress_bar(n_batches, f"epoch {epoch}/{epochs}", progress if root else False)
            try:
                t0 = time.perf_counter()
                train_loss, train_acc = train_epoch(
                    model,
                    loss,
                    opt,
                    x_train,
                    y_train,
                    int(config["batch_size"]),
                    rng,
                    bar,
                    parallel,
                )
                t1 = time.perf_counter()
            finally:
                if bar is not None:
                    bar.close()
            if config["precise_bn"]:
                update_bn_stats(model, _row_batches(x_train, _EVAL_BATCH))
            t_precise = time.perf_counter()
            test_loss, test_acc = evaluate(model, loss, x_test, y_test, parallel=parallel)
            t2 = time.perf_counter()
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "seconds": t1 - t0,
                "samples_per_s": ds.x_train.shape[0] / (t1 - t0),
                "eval_seconds": t2 - t_precise,
            }
            if config["precise_bn"]:
                record["precise_bn_seconds"] = t_precise - t1
            history.epochs.append(record)
            if not root:
                continue
            # Files first: once an epoch's line is printed, its checkpoint is on disk.
            if save is not None:
                _checkpoint.save_checkpoint(
                    save,
                    model_state=model.state_dict(),
                    optimizer_state=opt.state_dict(),
                    epoch=epoch,
                    rng_state=rng.bit_generator.state,
                    history=history.epochs,
                    config=config,
                )
            if metrics_out is not None:
                _write_metrics(metrics_out, history)
            if log is not None:
                log(
                    f"epoch {epoch:3d}/{epochs}  loss {train_loss:.4f}  acc {train_acc:.4f}  "
                    f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  "
                    f"{t1 - t0:6.2f}s  {record['samples_per_s']:,.0f} samples/s"
                    + (f"  precise BN {t_precise - t1:.2f}s" if config["precise_bn"] else "")
                )
    if fold is not None and root:
        history.fold = _fold_and_save(model, loss, x_test, y_test, fold)
        if metrics_out is not None:
            _write_metrics(metrics_out, history)
        if say is not None:
            say(
                f"folded inference model ({len(model.layers)} -> "
                f"{len(history.fold['layers'])} layers) written to {fold}: "
                f"test_acc {history.fold['test_acc']:.4f}"
            )
    return history


def _fold_and_save(model, loss, x_test, y_test, path):
    """Fold ``model``'s BatchNorm layers, check the result on the test set, save it.

    Parameters
    ----------
    model : Sequential
    loss : SoftmaxCrossEntropy
    x_test, y_test : arrays on the model's device
    path : str
        ``.npz`` file for the folded model's ``state_dict()`` (written atomically).

    Returns
    -------
    dict
        ``path``, ``layers`` (their reprs), ``test_loss``, ``test_acc``,
        ``max_abs_logit_diff`` and ``max_rel_logit_diff`` (over the largest logit).
    """
    import io

    folded = fold_batch_norm(model)
    test_loss, test_acc = evaluate(folded, loss, x_test, y_test)
    diff = scale = 0.0
    for start in range(0, x_test.shape[0], _EVAL_BATCH):
        rows = x_test[start : start + _EVAL_BATCH]
        a = _device.to_host(model.forward(rows, training=False)).astype(np.float64)
        b = _device.to_host(folded.forward(rows, training=False)).astype(np.float64)
        diff = max(diff, float(np.abs(a - b).max()))
        scale = max(scale, float(np.abs(a).max()))
    buffer = io.BytesIO()
    np.savez(buffer, **folded.state_dict())
    _checkpoint.atomic_write_bytes(path, buffer.getvalue())
    return {
        "path": os.fspath(path),
        "layers": [repr(layer) for layer in folded.layers],
        "test_loss": test_loss,
        "test_acc": test_acc,
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": diff / scale if scale else 0.0,
    }


@contextlib.contextmanager
def _checkpoint_errors(path):
    """Turn what a malformed checkpoint makes fail into a CheckpointError naming it."""
    try:
        yield
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise _checkpoint.CheckpointError(f"checkpoint {path} does not fit: {text}") from exc
