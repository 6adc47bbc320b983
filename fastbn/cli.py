"""The ``fastbn`` command (also ``python -m fastbn``): argparse with subcommands.

``fastbn train`` trains the MLP of the design's Keras example on Fashion-MNIST (or MNIST,
or a synthetic set) with fastbn's BatchNorm; it is a thin layer over
:func:`fastbn.nn.fit`. See ``docs/trainer.md``.
"""

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


def _hidden(text):
    """Parse ``--hidden 64,32`` into ``[64, 32]`` (an empty string means no hidden layer)."""
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden must be comma-separated positive integers, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"--hidden widths must be positive, got {text!r}")
    return widths


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
        "train", help="train the MLP (Dense -> BatchNorm -> ...) on Fashion-MNIST",
        description="Train Dense(64, relu) -> BatchNorm -> Dense(32, relu) -> BatchNorm -> "
                    "Dense(10, softmax) with Adam, BatchNorm running on fastbn's kernels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=["fashion-mnist", "mnist", "synthetic"],
                      default=None, help="dataset (default: fashion-mnist, or the "
                      "checkpoint's when resuming)")
    data.add_argument("--data", metavar="DIR", default=None,
                      help="directory searched first for the IDX .gz files (then "
                      "$FASTBN_DATA, ~/.cache/fastbn/<dataset>, /usr/share/datasets/"
                      "fashion-mnist, ~/.keras/datasets/fashion-mnist, then download)")
    data.add_argument("--no-download", action="store_true",
                      help="never download; fail when the files are not found")
    model = p.add_argument_group("model and optimizer (default: the checkpoint's when "
                                 "resuming, else the Keras example)")
    model.add_argument("--hidden", type=_hidden, default=None, metavar="W1,W2,...",
                       help="hidden layer widths (default 64,32)")
    model.add_argument("--no-bn", action="store_true", help="no BatchNorm layers")
    model.add_argument("--bn-before-relu", action="store_true",
                       help="Dense -> BatchNorm+ReLU (fused) instead of Keras's "
                       "Dense(relu) -> BatchNorm")
    model.add_argument("--bn-convention", choices=["keras", "torch"], default=None,
                       help="BatchNorm momentum/epsilon: keras (0.99 / 1e-3) or torch "
                       "(0.1 / 1e-5) (default keras)")
    model.add_argument("--bn-momentum", type=float, default=None,
                       help="BatchNorm momentum in the convention's meaning (keras: weight "
                       "of the old running value; torch: weight of the new batch). Default "
                       "0.9 (keras) / 0.1 (torch); Keras's own layer default 0.99 lags "
                       "in 10-epoch runs (docs/trainer.md)")
    model.add_argument("--init", default=None,
                       choices=["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                                "torch"],
                       help="Dense weight initialization (default glorot_uniform, Keras's)")
    model.add_argument("--optimizer", choices=["adam", "sgd"], default=None,
                       help="adam (Keras defaults) or sgd with momentum 0.9 (default adam)")
    model.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    model.add_argument("--dtype", choices=["float32", "float64"], default=None,
                       help="dtype of the model (default float32)")
    run = p.add_argument_group("run")
    run.add_argument("--epochs", type=int, default=10, help="total epochs")
    run.add_argument("--batch-size", type=_positive_int, default=None,
                     help="mini-batch size (default 128)")
    run.add_argument("--seed", type=int, default=None, help="seed of weights and shuffles "
                     "(default 0)")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                     help="cpu: NumPy BLAS + Numba kernels; cuda: CuPy cuBLAS + fastbn's "
                     "CUDA kernels")
    run.add_argument("--threads", type=_positive_int, default=None,
                     help="threads for fastbn's Numba kernels (default: all cores)")
    run.add_argument("--blas-threads", type=_positive_int, default=1,
                     help="threads for the BLAS matrix products while training (one is "
                     "the fastest at this model's sizes; see docs/trainer.md)")
    run.add_argument("--distributed", action="store_true",
                     help="data-parallel over MPI: run under `mpiexec -n P fastbn train "
                     "--distributed`; each global batch is split among the P ranks, "
                     "BatchNorm is synchronized, gradients are summed with Allreduce; "
                     "rank 0 alone prints and writes files (needs pip install "
                     "'fastbn[mpi]'; CPU only)")
    out = p.add_argument_group("output")
    out.add_argument("--metrics-out", metavar="FILE.json", default=None,
                     help="per-epoch metrics as JSON (rewritten after every epoch)")
    out.add_argument("--save", metavar="FILE.npz", default=None,
                     help="checkpoint written atomically after every epoch")
    out.add_argument("--resume", metavar="FILE.npz", default=None,
                     help="continue a run from its checkpoint (up to --epochs in total)")
    out.add_argument("--plot", metavar="FILE.png", default=None,
                     help="loss and accuracy curves (needs matplotlib)")
    out.add_argument("--compare-no-bn", action="store_true",
                     help="also train the model without BatchNorm and plot both")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no progress bar and no per-epoch lines")
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
        prog="fastbn", description="fastbn: Numba-compiled BatchNorm kernels, and a trainer "
        "that uses them. Without arguments, `python -m fastbn` runs a self-check.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_train_parser(subparsers)
    from ._precompile import add_parser as _add_precompile_parser
    _add_precompile_parser(subparsers)  # fastbn precompile (fastbn/_precompile.py)
    return parser


def _run_train(args):
    """Run ``fastbn train``; returns the exit status."""
    from . import data as _data
    from .nn import checkpoint as _checkpoint
    from .nn.train import fit

    if args.compare_no_bn and (args.save or args.resume or args.no_bn):
        print("fastbn train: --compare-no-bn cannot be combined with --save, --resume or "
              "--no-bn", file=sys.stderr)
        return 2
    comm = None
    if args.distributed:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            print(f"fastbn train: --distributed needs mpi4py and an MPI library: "
                  f"pip install 'fastbn[mpi]' ({exc})", file=sys.stderr)
            return 1
        comm = MPI.COMM_WORLD
    root = comm is None or comm.Get_rank() == 0
    log = None if args.quiet or not root else print
    common = dict(data_dir=args.data, epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, hidden=args.hidden, bn_convention=args.bn_convention,
                  bn_momentum=args.bn_momentum,
                  bn_position="before_relu" if args.bn_before_relu else None,
                  init=args.init, optimizer=args.optimizer, device=args.device,
                  seed=args.seed, dtype=args.dtype, threads=args.threads,
                  blas_threads=args.blas_threads,
                  progress=False if args.quiet else None, log=log,
                  download=not args.no_download, comm=comm)
    try:
        dataset = args.dataset
        if args.compare_no_bn:
            # Load once, train twice on the same data.
            dataset = _data.load_dataset(args.dataset or "fashion-mnist", args.data,
                                         seed=0 if args.seed is None else args.seed,
                                         download=not args.no_download)
            if log:
                log("== with BatchNorm ==")
        history = fit(dataset, batch_norm=False if args.no_bn else None, save=args.save,
                      resume=args.resume,
                      metrics_out=None if args.compare_no_bn else args.metrics_out, **common)
        runs = {("without BatchNorm" if args.no_bn else "with BatchNorm"): history}
        if args.compare_no_bn:
            if log:
                log("== without BatchNorm ==")
            runs["without BatchNorm"] = fit(dataset, batch_norm=False, **common)
            if args.metrics_out:
                record = dict(history.to_dict(),
                              compare_no_bn=runs["without BatchNorm"].to_dict())
                if root:
                    _checkpoint.atomic_write_bytes(
                        args.metrics_out, (json.dumps(record, indent=2) + "\n").encode())
        if args.plot and root:
            from .nn.plot import plot_histories
            config = history.config
            plot_histories(runs, args.plot,
                           title=f"{config['dataset']}, MLP {config['hidden']}, "
                                 f"batch {config['batch_size']}, seed {config['seed']}")
            if log:
                log(f"curves written to {args.plot}")
    except (_data.DatasetError, _checkpoint.CheckpointError, ValueError, RuntimeError) as exc:
        print(f"fastbn train: error: {exc}", file=sys.stderr)
        if comm is not None and comm.Get_size() > 1:
            _abort(comm, exc)
        return 1
    except Exception as exc:  # anything else: a lone failing rank would hang the others
        if comm is None or comm.Get_size() == 1:
            raise
        print(f"fastbn train: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        _abort(comm, exc)
    except KeyboardInterrupt:
        print("fastbn train: interrupted" + (f"; the last completed epoch is in {args.save}"
                                             if args.save else ""), file=sys.stderr)
        return 130
    return 0


def _abort(comm, exc):
    """End every rank of a distributed run: the others may be waiting in a collective."""
    print(f"fastbn train: rank {comm.Get_rank()} of {comm.Get_size()} failed "
          f"({type(exc).__name__}); aborting all ranks", file=sys.stderr)
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
