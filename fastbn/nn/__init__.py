"""A small neural-network toolkit whose BatchNorm layers run on fastbn.

Layers (:class:`Dense`, :class:`ReLU`, :class:`BatchNorm`), the :class:`Sequential`
model, the fused :class:`SoftmaxCrossEntropy` loss, the :class:`Adam` and :class:`SGD`
optimizers, the trainer (:func:`fit`, which ``fastbn train`` runs) and its data-parallel
hook over MPI (:class:`DataParallel`, in :mod:`fastbn.nn.parallel`), exact population
statistics for the BatchNorm layers (:func:`update_bn_stats`) and BatchNorm folded into
the Dense layers for inference (:func:`fold_batch_norm`). Matrix products
use NumPy's BLAS on the CPU and CuPy's cuBLAS on a GPU (``device="cuda"``); the rest runs
on fastbn's kernels.

Examples
--------
>>> import numpy as np
>>> from fastbn import nn
>>> model = nn.build_mlp(hidden=(32,), rng=0)
>>> opt = nn.Adam(model.store, lr=1e-3)
>>> loss = nn.SoftmaxCrossEntropy()
>>> x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
>>> value, grad = loss(model.forward(x), np.arange(8) % 10)
>>> _ = model.backward(grad); opt.step()
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .fold import fold_batch_norm
from .layers import INITIALIZERS, BatchNorm, Dense, Parameter, ParameterStore, ReLU, Sequential
from .loss import SoftmaxCrossEntropy
from .optim import SGD, Adam
from .parallel import DataParallel
from .precise import update_bn_stats
from .train import DEFAULTS, History, build_mlp, evaluate, fit, set_threads, train_epoch

__all__ = [
    "Dense",
    "ReLU",
    "BatchNorm",
    "Sequential",
    "Parameter",
    "ParameterStore",
    "INITIALIZERS",
    "SoftmaxCrossEntropy",
    "Adam",
    "SGD",
    "fit",
    "build_mlp",
    "train_epoch",
    "evaluate",
    "History",
    "set_threads",
    "DEFAULTS",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "DataParallel",
    "update_bn_stats",
    "fold_batch_norm",
]
