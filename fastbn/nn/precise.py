"""Exact population statistics for a model's BatchNorm layers (``update_bn_stats``).

A BatchNorm layer's running statistics are an exponential average of batch statistics
taken while the weights below it were still moving. :func:`update_bn_stats` replaces
them with the exact mean and variance of the layer's input over a whole data set,
computed with the trained weights.

fvcore's ``update_bn_stats`` and ``torch.optim.swa_utils.update_bn`` approximate the same
thing by running the model in training mode with a cumulative average: the mean comes
out right (for equal batch sizes) but the variance is the *average of the per-batch
variances*, which leaves out the spread of the batch means around the population mean
(the between-batch term of the law of total variance), and every layer's input is
computed with the layers below it normalizing by *batch* statistics. Here the batches'
``(count, mean, M2)`` are merged exactly (Chan et al.'s pairwise update, weighted by
count), and each layer's input is computed in inference mode with the layers below it
already holding their new statistics: what the model will compute at test time.
"""

import numpy as np

from . import _device
from .layers import BatchNorm, Sequential

__all__ = ["update_bn_stats"]


def _inputs_of(item):
    """The input array of one element of ``batches``: ``x`` or the ``x`` of ``(x, y)``."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("batches must yield arrays or (x, y) tuples, got an empty tuple")
        return item[0]
    return item


def _merge(total, h):
    """Merge one batch ``h`` (rows: samples) into ``total = (count, mean, M2)``.

    Float64 throughout; the batch's own ``M2`` is summed around its own mean (no
    ``E[x^2] - E[x]^2`` cancellation), then combined with Chan et al.'s formula
    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``.

    Parameters
    ----------
    total : tuple (int, array, array) or None
    h : array, shape (n, C)

    Returns
    -------
    tuple (int, array, array)
    """
    h = h.astype(np.float64)
    n_b = int(h.shape[0])
    mean_b = h.mean(axis=0)
    m2_b = ((h - mean_b) ** 2).sum(axis=0)
    if total is None:
        return n_b, mean_b, m2_b
    n_a, mean_a, m2_a = total
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def update_bn_stats(model, batches):
    """Set every BatchNorm layer's running statistics to the exact statistics of its input.

    Each :class:`~fastbn.nn.BatchNorm` layer of ``model``, in order, gets as running mean
    and variance the mean and variance of its input over *all* samples of ``batches``
    (merged exactly across batches of any sizes, weighted by their sample counts), where
    that input is what the model computes in inference mode with the BatchNorm layers
    before it already holding their new statistics. The variance follows the layer's
    convention: unbiased (``/(n - 1)``) for PyTorch's, biased (``/n``) for Keras's.
    Parameters, ``num_batches_tracked`` and the momentum are left as they are. A layer
    with batch renormalization also gets ``running_stddev = sqrt(var + eps)`` (from which
    it derives ``running_var``); its renorm statistics, used only in training, stay.

    ``batches`` is read once (a generator works): the input of the first BatchNorm layer
    is kept for every sample (``n x features`` values of the model's dtype) and carried
    forward layer by layer, so each layer runs once per sample.

    Parameters
    ----------
    model : Sequential
    batches : iterable
        Arrays of shape ``(n_i, features)``, or ``(x, y)`` tuples whose ``x`` is used
        (a data loader's batches). Host arrays are moved to the model's device.

    Returns
    -------
    int
        The number of samples the statistics were computed over (0 when the model has no
        BatchNorm layer: ``batches`` is then not read).

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~fastbn.nn.Sequential`.
    ValueError
        ``batches`` holds no sample (or only one, for an unbiased variance), or a batch
        does not fit the model (the layer's message).
    FloatingPointError
        A statistic is not finite in the layer's dtype. On any error every layer keeps
        the running statistics it had.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn import nn
    >>> model = nn.Sequential([nn.BatchNorm(3, convention="torch")])
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (100, 3)).astype(np.float32)
    >>> nn.update_bn_stats(model, [x[:30], x[30:37], x[37:]])   # any batch sizes
    100
    >>> bn = model.layers[0].bn
    >>> bool(np.allclose(bn.running_mean, x.mean(0), rtol=1e-6))
    True
    >>> bool(np.allclose(bn.running_var, x.astype(np.float64).var(0, ddof=1), rtol=1e-6))
    True
    >>> bn.num_batches_tracked   # untouched
    0
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a fastbn.nn.Sequential, got {type(model).__name__}")
    targets = [i for i, layer in enumerate(model.layers) if isinstance(layer, BatchNorm)]
    if not targets:
        return 0
    xp = model.xp
    first = targets[0]
    inputs = []  # the current BatchNorm layer's input, batch by batch (owned copies)
    for item in batches:
        h = xp.asarray(_inputs_of(item), dtype=model.dtype)
        if h.ndim != 2:
            raise ValueError(f"each batch must be 2-D (n, features), got shape {tuple(h.shape)}")
        if h.shape[0] == 0:
            continue
        for layer in model.layers[:first]:
            h = layer.forward(h, training=False)
        inputs.append(h.copy())  # layers return buffers that their next call overwrites
    count = sum(int(h.shape[0]) for h in inputs)
    if count == 0:
        raise ValueError("batches must hold at least one sample, got none")

    saved = [
        {key: getattr(model.layers[i].bn, key).copy() for key in _statistics(model.layers[i])}
        for i in targets
    ]
    try:
        for k, index in enumerate(targets):
            _set_exact_statistics(model.layers[index], index, inputs)
            if k + 1 < len(targets):  # carry the inputs to the next BatchNorm layer
                segment = model.layers[index : targets[k + 1]]
                for j, h in enumerate(inputs):
                    for layer in segment:
                        h = layer.forward(h, training=False)
                    inputs[j] = h.copy()
    except BaseException:
        for i, state in zip(targets, saved):
            for key, value in state.items():
                getattr(model.layers[i].bn, key)[...] = value
        raise
    return count


def _statistics(layer):
    """The running statistics that inference uses, by attribute name of the core layer.

    ``running_mean`` and ``running_var``; with batch renormalization also
    ``running_stddev``, of which the layer derives ``running_var`` after each step (its
    renorm statistics, which only training uses, are not among them).
    """
    keys = ["running_mean", "running_var"]
    if getattr(layer.bn, "running_stddev", None) is not None:
        keys.append("running_stddev")
    return keys


def _set_exact_statistics(layer, index, inputs):
    """Merge ``inputs`` (a list of ``(n_i, C)`` arrays) and store them in ``layer``.

    Parameters
    ----------
    layer : BatchNorm
    index : int
        The layer's position in the model (for messages).
    inputs : list of array
    """
    total = None
    for h in inputs:
        total = _merge(total, h)
    n, mean, m2 = total
    bn = layer.bn
    if bn.running_var_unbiased:
        if n < 2:
            raise ValueError(
                f"layers.{index}: an unbiased running variance needs at least 2 samples, got {n}"
            )
        var = m2 / (n - 1)
    else:
        var = m2 / n
    mean, var = _device.to_host(mean), _device.to_host(var)
    with np.errstate(over="ignore", invalid="ignore"):
        stats = [np.asarray(a).astype(bn.running_mean.dtype) for a in (mean, var)]
    for name, value in zip(("mean", "var"), stats):
        if not np.isfinite(value).all():
            bad = int(np.flatnonzero(~np.isfinite(value))[0])
            raise FloatingPointError(
                f"layers.{index}: the population {name} of channel {bad} is not finite in "
                f"{value.dtype}; the running statistics were left unchanged"
            )
    xp = layer.xp
    bn.running_mean[...] = xp.asarray(stats[0])
    bn.running_var[...] = xp.asarray(stats[1])
    if "running_stddev" in _statistics(layer):
        # Batch renormalization keeps sqrt(var + eps) and derives running_var from it:
        # both must hold the exact statistics, or the next training step undoes them.
        with np.errstate(over="ignore"):
            stddev = np.sqrt(np.asarray(var, np.float64) + bn.eps).astype(stats[1].dtype)
        bn.running_stddev[...] = xp.asarray(stddev)
