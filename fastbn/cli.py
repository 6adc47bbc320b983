"""The ``fastbn`` command (also ``python -m fastbn``): argparse with subcommands.

```fastbn train`` trains the MLP of the design's Keras example on Fashion-MNIST (or MNIST,
or a synthetic set) with fastbn's BatchNorm; it is a thin layer over
:func:`fastbn.nn.fit`. See ``docs/trainer.md``.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import sys
import time

from ._install import install_hint

__all__ = ["main", "build_parser"]


def _hidden(text):
    """Parse ``--hidden 64,32`` into ``[64, 32]`` (an empty string means no hidden layer)."""
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden must be comma-separated positive integers, got {text!r}"
        ) from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"--hidden widths must be positive, got {text!r}")
    return widths


def _epochs(text):
    """An argparse type for integers >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text):
    """An argparse type for integers >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_train_parser(subparsers):
    """Add the ``train`` subcommand and its options."""
    p = subparsers.add_parser(
        "train",
        help="train the MLP (Dense -> BatchNorm -> ...) on Fashion-MNIST",
        description="Train Dense(64, relu) -> BatchNorm -> Dense(32, relu) -> BatchNorm -> "
        "Dense(10, softmax) with Adam, BatchNorm running on fastbn's kernels.",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=["fashion-mnist", "mnist", "synthetic"],
        default=None,
        help="dataset (default: fashion-mnist, or the checkpoint's when resuming)",
    )
    data.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="directory searched first for the IDX .gz files (it must "
        "exist; then "
        "$FASTBN_DATA, ~/.cache/fastbn/<dataset>, /usr/share/datasets/"
        "fashion-mnist, ~/.keras/datasets/fashion-mnist, then download)",
    )
    data.add_argument(
        "--no-download",
        action="store_true",
        help="never download; fail when the files are not found",
    )
    model = p.add_argument_group(
        "model and optimizer (default: the checkpoint's when resuming, else the Keras example)"
    )
    model.add_argument(
        "--hidden",
        type=_hidden,
        default=None,
        metavar="W1,W2,...",
        help="hidden layer widths (default 64,32)",
    )
    model.add_argument("--no-bn", action="store_true", help="no BatchNorm layers")
    model.add_argument(
        "--bn-before-relu",
        action="store_true",
        help="Dense -> BatchNorm+ReLU (fused) instead of Keras's Dense(relu) -> BatchNorm",
    )
    model.add_argument(
        "--bn-convention",
        choices=["keras", "torch"],
        default=None,
        help="BatchNorm momentum/epsilon: keras (0.99 / 1e-3) or torch "
        "(0.1 / 1e-5) (default keras)",
    )
    model.add_argument(
        "--bn-momentum",
        type=float,
        default=None,
        help="BatchNorm momentum in the convention's meaning (keras: weight "
        "of the old running value; torch: weight of the new batch). Default "
        "0.9 (keras) / 0.1 (torch); Keras's own layer default 0.99 lags "
        "in 10-epoch runs (docs/trainer.md)",
    )
    model.add_argument(
        "--renorm",
        action="store_true",
        default=None,
        help="batch renormalization in the BatchNorm layers (Keras's renorm: default "
        "clipping, renorm_momentum 0.99)",
    )
    model.add_argument(
        "--virtual-batch-size",
        type=_positive_int,
        default=None,
        metavar="K",
        help="ghost batch normalization: BatchNorm statistics per chunk of K samples "
        "(K must divide the batch size); running statistics from the whole batch",
    )
    model.add_argument(
        "--init",
        default=None,
        choices=["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "torch"],
        help="Dense weight initialization (default glorot_uniform, Keras's)",
    )
    model.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default=None,
        help="adam (Keras defaults) or sgd with momentum 0.9 (default adam)",
    )
    model.add_argument(
        "--precise-bn",
        action="store_true",
        default=None,
        help="after each epoch, before evaluating, set every BatchNorm layer's running "
        "statistics to the exact statistics of its input over the whole training set "
        "(fastbn.nn.update_bn_stats); the weights are those of the run without it",
    )
    model.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    model.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="dtype of the model (default float32)",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--epochs",
        type=_epochs,
        default=10,
        help="total epochs, those of a resumed checkpoint included (default 10)",
    )
    run.add_argument(
        "--batch-size", type=_positive_int, default=None, help="mini-batch size (default 128)"
    )
    run.add_argument(
        "--seed", type=int, default=None, help="seed of weights and shuffles (default 0)"
    )
    run.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: NumPy BLAS + Numba kernels; cuda: CuPy cuBLAS + fastbn's "
        "CUDA kernels (default cpu)",
    )
    run.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="threads for fastbn's Numba kernels (default: all cores)",
    )
    run.add_argument(
        "--blas-threads",
        type=_positive_int,
        default=1,
        help="threads for the BLAS matrix products while training (default "
        "1, the fastest at this model's sizes; see docs/trainer.md)",
    )
    run.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over MPI: run under `mpiexec -n P fastbn train "
        "--distributed`; each global batch is split among the P ranks, "
        "BatchNorm is synchronized, gradients are summed with Allreduce; "
        "rank 0 alone prints and writes files (needs mpi4py and an MPI "
        "library: " + install_hint("mpi").replace("%", "%%") + "; CPU only)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--metrics-out",
        metavar="FILE.json",
        default=None,
        help="per-epoch metrics as JSON (rewritten after every epoch)",
    )
    out.add_argument(
        "--save",
        metavar="FILE.npz",
        default=None,
        help="checkpoint written atomically after every epoch",
    )
    out.add_argument(
        "--resume",
        metavar="FILE.npz",
        default=None,
        help="continue a run from its checkpoint (up to --epochs in total)",
    )
    out.add_argument(
        "--fold",
        metavar="FILE.npz",
        default=None,
        help="after training, write the inference model with every BatchNorm folded "
        "into a Dense layer (fastbn.nn.fold_batch_norm); its test accuracy goes to the "
        "metrics",
    )
    out.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="loss and accuracy curves (needs matplotlib: checked before training)",
    )
    out.add_argument(
        "--compare-no-bn",
        action="store_true",
        help="also train the model without BatchNorm and plot both",
    )
    out.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar and no per-epoch lines"
    )
    p.set_defaults(handler=_run_train)
    return p


def build_parser():
    """The ``fastbn`` argument parser.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> args = build_parser().parse_args(["train", "--epochs", "2", "--hidden", "16,8"])
    >>> args.command, args.epochs, args.hidden
    ('train', 2, [16, 8])
    """
    parser = argparse.ArgumentParser(
        prog="fastbn",
        description="fastbn: Numba-compiled BatchNorm kernels, and a trainer "
        "that uses them. Without arguments, `python -m fastbn` runs a self-check.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train_parser(subparsers)
    from ._precompile import add_parser as _add_precompile_parser

    _add_precompile_parser(subparsers)  # fastbn precompile (fastbn/_precompile.py)
    return parser


class Interrupts:
    """SIGINT while a command runs: always honoured, always reported truthfully.

    Outside the compiler a Ctrl-C raises KeyboardInterrupt as usual (the command reports
    it and exits 130). Inside Numba's compiler an exception can be swallowed or leave a
    half-built function behind (later calls then fail with an internal error), so there
    the process ends at once, with exit status 130 and the same report: nothing is being
    written at that moment (checkpoints are replaced atomically). A second Ctrl-C always
    ends the process at once.

    Parameters
    ----------
    prog : str
        Prefix of the report (``"fastbn train"``).
    checkpoint : str, optional
        The run's ``--save`` file: the report names it only if this run wrote it (or it
        is the ``resume`` file, still in place).
    resume : str, optional
    """

    def __init__(self, prog, checkpoint=None, resume=None):
        self.prog = prog
        self.checkpoint = checkpoint
        self.resume = resume
        self.received = False
        self.started_ns = time.time_ns()
        self._previous = None

    def report(self, during_compile=False):
        """The line printed on an interrupt."""
        line = f"{self.prog}: interrupted" + (" while compiling kernels" if during_compile else "")
        if self.checkpoint is not None:
            if self._checkpoint_is_current():
                line += f"; the last completed epoch is in {self.checkpoint}"
            else:
                line += f"; no checkpoint was written to {self.checkpoint}"
        return line

    def _checkpoint_is_current(self):
        try:
            written = os.stat(self.checkpoint).st_mtime_ns >= self.started_ns
        except OSError:
            return False
        if written:
            return True
        with contextlib.suppress(OSError, TypeError):
            return self.resume is not None and os.path.samefile(self.checkpoint, self.resume)
        return False

    def _handler(self, signum, frame):
        from . import _config

        if self.received or _config.compiling():
            self.exit_now(during_compile=not self.received)
        self.received = True
        raise KeyboardInterrupt

    def exit_now(self, during_compile=False):
        """Report the interrupt and end the process with status 130 (no clean-up)."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.write(self.report(during_compile) + "\n")
            sys.stderr.flush()
        os._exit(130)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Python delivers no signal here anyway
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _error(message, status=1):
    """Print ``fastbn train: error: message``; return ``status``."""
    print(f"fastbn train: error: {message}", file=sys.stderr)
    return status


def _check_output_file(option, path):
    """An error message when ``path`` cannot be written as an output file, else None."""
    if os.path.isdir(path):
        return f"{option} {path} is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{option} {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} {path}: permission denied (cannot write in {parent})"
    return None


def _check_train_options(args):
    """Check what can be checked before any data is read; returns an exit status or None.

    The data directory, the output files, matplotlib for ``--plot``, MPI for
    ``--distributed``, the checkpoint to resume (read and validated) and whether there is
    anything to train at all.
    """
    from . import data as _data
    from .nn import checkpoint as _checkpoint

    if args.compare_no_bn and (args.save or args.resume or args.no_bn):
        print(
            "fastbn train: --compare-no-bn cannot be combined with --save, --resume or --no-bn",
            file=sys.stderr,
        )
        return 2
    if args.data is not None:
        try:
            _data.check_data_dir(args.data)
        except _data.DatasetError as exc:
            return _error(f"--data: {exc}")
    for option, path in (
        ("--save", args.save),
        ("--metrics-out", args.metrics_out),
        ("--fold", args.fold),
        ("--plot", args.plot),
    ):
        problem = path is not None and _check_output_file(option, path)
        if problem:
            return _error(problem)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return _error(f"--plot needs matplotlib, which is not installed: {install_hint('plot')}")
    if args.distributed and args.device != "cpu":
        # fastbn.nn.DataParallel would refuse the model after the data is loaded
        return _error(
            f"--distributed trains on the CPU only (--device cpu), got --device "
            f"{args.device}: the gradient Allreduce works on host arrays"
        )
    if args.distributed and importlib.util.find_spec("mpi4py") is None:
        return _error(f"--distributed needs mpi4py and an MPI library: {install_hint('mpi')}")
    if args.resume is not None:
        try:
            done = _checkpoint.load_checkpoint(args.resume)["epoch"]
        except _checkpoint.CheckpointError as exc:
            return _error(exc)
        if done >= args.epochs:
            print(
                f"fastbn train: nothing to train: {args.resume} already holds {done} "
                f"epoch{'s' * (done != 1)} (--epochs {args.epochs} in total); pass "
                f"--epochs {done + 1} or more to continue",
                file=sys.stderr,
            )
            return 0
    elif args.epochs == 0:
        print("fastbn train: nothing to train: --epochs 0", file=sys.stderr)
        return 0
    return None


def _run_train(args):
    """Run ``fastbn train``; returns the exit status."""
    status = _check_train_options(args)
    if status is not None:
        return status
    with Interrupts("fastbn train", checkpoint=args.save, resume=args.resume) as interrupts:
        status = _train(args, interrupts)
    if interrupts.received and status != 130:
        # The interrupt was swallowed somewhere below: it still ends the run, truthfully.
        print(interrupts.report(), file=sys.stderr)
        return 130
    return status


def _train(args, interrupts):
    """The training part of ``fastbn train`` (options already checked)."""
    from . import data as _data
    from .nn import checkpoint as _checkpoint
    from .nn.train import fit

    comm = None
    if args.distributed:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            return _error(
                f"--distributed needs mpi4py and an MPI library: {install_hint('mpi')} ({exc})"
            )
        comm = MPI.COMM_WORLD
    root = comm is None or comm.Get_rank() == 0
    log = None if args.quiet or not root else print
    common = dict(
        data_dir=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        bn_convention=args.bn_convention,
        bn_momentum=args.bn_momentum,
        bn_renorm=args.renorm,
        bn_virtual_batch_size=args.virtual_batch_size,
        bn_position="before_relu" if args.bn_before_relu else None,
        init=args.init,
        optimizer=args.optimizer,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
        precise_bn=args.precise_bn,
        threads=args.threads,
        blas_threads=args.blas_threads,
        progress=False if args.quiet else None,
        log=log,
        download=not args.no_download,
        comm=comm,
    )
    try:
        dataset = args.dataset
        if args.compare_no_bn:
            # Load once, train twice on the same data.
            dataset = _data.load_dataset(
                args.dataset or "fashion-mnist",
                args.data,
                seed=0 if args.seed is None else args.seed,
                download=not args.no_download,
            )
            if log:
                log("== with BatchNorm ==")
        history = fit(
            dataset,
            batch_norm=False if args.no_bn else None,
            save=args.save,
            resume=args.resume,
            metrics_out=None if args.compare_no_bn else args.metrics_out,
            fold=args.fold,
            **common,
        )
        runs = {("without BatchNorm" if args.no_bn else "with BatchNorm"): history}
        if args.compare_no_bn:
            if log:
                log("== without BatchNorm ==")
            runs["without BatchNorm"] = fit(dataset, batch_norm=False, **common)
            if args.metrics_out:
                record = dict(history.to_dict(), compare_no_bn=runs["without BatchNorm"].to_dict())
                if root:
                    _checkpoint.atomic_write_bytes(
                        args.metrics_out, (json.dumps(record, indent=2) + "\n").encode()
                    )
        if args.plot and root:
            from .nn.plot import plot_histories

            config = history.config
            plot_histories(
                runs,
                args.plot,
                title=f"{config['dataset']}, MLP {config['hidden']}, "
                f"batch {config['batch_size']}, seed {config['seed']}",
            )
            if log:
                log(f"curves written to {args.plot}")
    except KeyboardInterrupt:
        print(interrupts.report(), file=sys.stderr)
        return 130
    except (_data.DatasetError, _checkpoint.CheckpointError, ValueError, RuntimeError) as exc:
        if interrupts.received:  # what an interrupt inside a library turned into
            print(interrupts.report(), file=sys.stderr)
            return 130
        print(f"fastbn train: error: {exc}", file=sys.stderr)
        if comm is not None and comm.Get_size() > 1:
            _abort(comm, exc)
        return 1
    except Exception as exc:  # anything else: a lone failing rank would hang the others
        if interrupts.received:
            print(interrupts.report(), file=sys.stderr)
            return 130
        if comm is None or comm.Get_size() == 1:
            raise
        print(f"fastbn train: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        _abort(comm, exc)
    return 0


def _abort(comm, exc):
    """End every rank of a distributed run: the others may be waiting in a collective."""
    print(
        f"fastbn train: rank {comm.Get_rank()} of {comm.Get_size()} failed "
        f"({type(exc).__name__}); aborting all ranks",
        file=sys.stderr,
    )
    sys.stderr.flush()
    comm.Abort(1)


def main(argv=None):
    """Entry point of the ``fastbn`` console script and of ``python -m fastbn ARGS``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        Exit status: 0 success, 1 a run error (missing data, bad checkpoint...), 2 a
        usage error.

    Examples
    --------
    >>> main(["train", "--dataset", "synthetic", "--epochs", "1", "--hidden", "16",
    ...       "--quiet"])
    0
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return args.handler(args)
