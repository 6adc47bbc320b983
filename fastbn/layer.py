"""The ``BatchNorm`` layer: parameters, running statistics, forward and backward.

The layer's state machine, written once for every device: it picks the backend of its
arrays (:mod:`fastbn.backends`) and runs the shared operations of :mod:`fastbn._ops`.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from . import _checks, _cpu_backend, _ops, _variants, api, backends, distributed

_FLOAT64 = np.dtype(np.float64)  # the statistics the layer keeps for its backward


class BatchNorm:
    """Batch Normalization layer over the channel axis ``axis``.

    Holds ``gamma`` (ones) and ``beta`` (zeros), the running statistics ``running_mean``
    (zeros) and ``running_var`` (ones), and ``num_batches_tracked``. ``forward`` in
    training normalizes with batch statistics and updates the running ones; otherwise it
    normalizes with the running ones. ``backward(dy)`` returns ``dx`` and stores
    ``dgamma`` and ``dbeta``. ``forward(x, residual=z)`` computes a ResNet block's
    ``act(bn(x) + z)`` in one pass; its ``backward`` also stores ``dresidual``, the
    gradient with respect to ``z``.

    The defaults follow PyTorch (``momentum=0.1`` weighs the *new* batch, ``eps=1e-5``,
    unbiased running variance). :meth:`keras` builds the Keras equivalent.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    axis : int, default 1
        Channel axis of the inputs (``-1`` for NHWC or Keras-style inputs).
    eps : float, default 1e-5
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch in the running statistics; None for a cumulative
        average over all batches (``1 / num_batches_tracked``).
    affine : bool, default True
        Learn ``gamma`` and ``beta``; when False they are None (both; see ``scale`` and
        ``center`` for one without the other).
    track_running_stats : bool, default True
        Keep running statistics; when False the layer always uses batch statistics.
    dtype : numpy dtype, default float32
        dtype of the parameters and running statistics.
    activation : {None, "relu"}, optional
        Fuse a ReLU after the normalization (forward and backward).
    running_var_unbiased : bool, default True
        Running variance from the unbiased batch variance (PyTorch) or the biased one
        (Keras).
    frozen : bool, default False
        Frozen BatchNorm (torchvision's and detectron2's ``FrozenBatchNorm2d``, but with
        ``gamma`` and ``beta`` still trained): ``forward`` always normalizes with the
        running statistics and never updates them, also with ``training=True``;
        ``backward`` gives the gradient through those fixed statistics. Needs
        ``track_running_stats``. An attribute: set ``layer.frozen`` at any time.
    update_running_stats : bool, default True
        False: ``forward`` in training normalizes with the batch statistics (and
        ``backward`` gives the training gradient) but leaves ``running_mean``,
        ``running_var`` and ``num_batches_tracked`` untouched. An attribute too.
    comm : mpi4py.MPI.Comm, optional
        Synchronized BatchNorm (like ``torch.nn.SyncBatchNorm``): each rank's
        ``forward`` in training takes its shard of the batch and normalizes with the
        statistics of the whole batch; the running statistics and, after ``backward``,
        ``dgamma`` and ``dbeta`` are those of the whole batch and identical on every
        rank. Every rank of ``comm`` must then call ``forward`` and ``backward`` together
        (they are collective). Host arrays only. See :mod:`fastbn.distributed`. After
        a forward with running statistics (eval mode, ``frozen``) the forward is local and
        ``backward`` is collective: ``dgamma`` and ``dbeta`` are summed over every rank.
        With ``renorm``, the batch statistics (and so ``r`` and ``d``) are the synchronized
        ones; with ``virtual_batch_size``, the ghost batches are each rank's own, the
        running statistics and the parameter gradients those of the whole batch.
    center, scale : bool, default True
        Keep ``beta`` (``center``) and ``gamma`` (``scale``), independently (Keras's
        switches); a missing one is None, its gradient too. ``affine=False`` turns both
        off.
    renorm : bool, default False
        Batch renormalization (Ioffe, 2017), with Keras 3's ``renorm`` semantics: in
        training ``y = ((x - mean) / std * r + d) * gamma + beta`` with
        ``r = clip(std / s, rmin, rmax)``, ``d = clip((mean - renorm_mean) / s, -dmax,
        dmax)``, ``s = max(renorm_stddev, sqrt(eps))``, constants of the gradient. The
        renorm statistics ``renorm_mean`` (zeros) and ``renorm_stddev`` (ones) move
        towards the batch's with ``renorm_momentum``; the running mean and the running
        standard deviation ``running_stddev`` (ones) move towards the batch's with
        ``momentum`` in the layer's convention, and ``running_var`` is
        ``max(running_stddev**2 - eps, 0)`` (with ``running_var_unbiased``, the running
        standard deviation follows ``sqrt(unbiased var + eps)``). Inference is unchanged.
        Needs ``track_running_stats``.
    renorm_clipping : dict, optional
        Keys among ``"rmin"``, ``"rmax"``, ``"dmax"`` (missing: 0, inf, inf, as Keras);
        an unknown key, ``rmax < rmin`` or ``dmax < 0`` is a ValueError.
    renorm_momentum : float in [0, 1], default 0.99
        Keras's meaning in either convention: the weight of the *old* renorm statistics.
    renorm_ramp : int, optional
        The paper's schedule instead of fixed clipping: ``rmax`` from 1 to 3 and ``dmax``
        from 0 to 5, linearly over this many training steps (``num_batches_tracked``),
        ``rmin = 1 / rmax``. Not with ``renorm_clipping``.
    virtual_batch_size : int, optional
        Ghost batch normalization (tf-keras's ``virtual_batch_size``): in training each
        chunk of ``virtual_batch_size`` consecutive samples along axis 0 is normalized
        with its own statistics (``gamma``, ``beta`` shared); the batch size must be a
        multiple of it (ValueError). The running statistics take the exact statistics of
        the whole batch, once per step. A chunk as large as the batch is plain
        BatchNorm, bit for bit. Not with ``renorm``.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(64, 3)).astype(np.float32)
    >>> y = bn.forward(x, training=True)
    >>> bool(abs(y.mean()) < 1e-5)
    True
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.dbeta
    array([64., 64., 64.], dtype=float32)
    >>> bn.num_batches_tracked
    1
    """

    def __init__(
        self,
        num_features,
        *,
        axis=1,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        dtype=np.float32,
        activation=None,
        running_var_unbiased=True,
        frozen=False,
        update_running_stats=True,
        comm=None,
        center=True,
        scale=True,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        renorm_ramp=None,
        virtual_batch_size=None,
    ):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        dtype = np.dtype(dtype)
        if dtype.kind == "f" and not dtype.isnative:  # any byte order in, native state
            dtype = dtype.newbyteorder("=")
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_momentum(momentum)
        _checks.check_activation(activation)
        self.activation = activation
        self.scale = bool(affine) and bool(scale)
        self.center = bool(affine) and bool(center)
        self.affine = self.scale or self.center
        self.track_running_stats = bool(track_running_stats)
        self.running_var_unbiased = bool(running_var_unbiased)
        if frozen and not track_running_stats:
            raise ValueError("frozen=True needs running statistics (track_running_stats=True)")
        self.frozen = bool(frozen)
        self.update_running_stats = bool(update_running_stats)
        if comm is not None:
            distributed.check_comm(comm)
        self.comm = comm
        self.dtype = dtype
        self._init_variants(renorm, renorm_clipping, renorm_momentum, renorm_ramp)
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(
                virtual_batch_size, (int, np.integer)
            ):
                raise TypeError(
                    "virtual_batch_size must be an int or None, got "
                    f"{type(virtual_batch_size).__name__}"
                )
            if virtual_batch_size < 1:
                raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
            if self.renorm:
                raise ValueError(
                    "virtual_batch_size and renorm cannot be combined (got "
                    f"virtual_batch_size={virtual_batch_size}, renorm=True)"
                )
            virtual_batch_size = int(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        C = self.num_features
        self.gamma = np.ones(C, dtype) if self.scale else None
        self.beta = np.zeros(C, dtype) if self.center else None
        if track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
        else:
            self.running_mean = self.running_var = None
        self.renorm_mean = np.zeros(C, dtype) if self.renorm else None
        self.renorm_stddev = np.ones(C, dtype) if self.renorm else None
        self.running_stddev = np.ones(C, dtype) if self.renorm else None
        self.num_batches_tracked = 0
        self.dgamma = None
        self.dbeta = None
        self.dresidual = None
        self.training = True
        self._saved = None
        self._residual = None  # z of the last forward(x, residual=z), for its backward
        self._saved_mask = None

    def _init_variants(self, renorm, renorm_clipping, renorm_momentum, renorm_ramp):
        """Check and set the batch-renormalization options (before any state exists)."""
        self.renorm = bool(renorm)
        if not self.renorm:
            if renorm_clipping is not None or renorm_ramp is not None:
                raise ValueError("renorm_clipping and renorm_ramp need renorm=True")
        elif not self.track_running_stats:
            raise ValueError("renorm=True needs track_running_stats=True")
        self.renorm_clipping = _variants.check_renorm_clipping(renorm_clipping)
        self.renorm_momentum = _checks.check_momentum(
            renorm_momentum, allow_none=False, name="renorm_momentum"
        )
        if renorm_ramp is not None:
            if isinstance(renorm_ramp, bool) or not isinstance(renorm_ramp, (int, np.integer)):
                raise TypeError(
                    f"renorm_ramp must be an int or None, got {type(renorm_ramp).__name__}"
                )
            if renorm_ramp < 1:
                raise ValueError(f"renorm_ramp must be >= 1, got {renorm_ramp}")
            if renorm_clipping is not None:
                raise ValueError(
                    "renorm_ramp sets the clipping itself: pass renorm_clipping or "
                    f"renorm_ramp, not both (got {renorm_clipping!r} and {renorm_ramp})"
                )
            renorm_ramp = int(renorm_ramp)
        self.renorm_ramp = renorm_ramp

    @classmethod
    def keras(
        cls,
        num_features,
        *,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        dtype=np.float32,
        activation=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        renorm_ramp=None,
        virtual_batch_size=None,
        comm=None,
    ):
        """A layer with the conventions of ``keras.layers.BatchNormalization``.

        Keras's ``momentum`` weighs the *old* running value
        (``moving = momentum * moving + (1 - momentum) * batch``), its epsilon is 1e-3,
        the channel axis is last, and its moving variance takes the biased batch
        variance. This returns the equivalent fastbn layer (``momentum = 1 - momentum``),
        in evaluation mode, as Keras calls it: ``layer(x)`` normalizes with the moving
        statistics, ``layer(x, training=True)`` with the batch's (and updates them);
        ``layer.train()`` makes training the default.

        Parameters
        ----------
        num_features : int
        axis : int, default -1
        momentum : float, default 0.99
            Keras's momentum (weight of the old value).
        epsilon : float, default 1e-3
        center, scale : bool, default True
            Keras's switches for ``beta`` and ``gamma``, independent.
        dtype : numpy dtype, default float32
        activation : {None, "relu"}, optional
        renorm, renorm_clipping, renorm_momentum, renorm_ramp, virtual_batch_size, comm
            As for :class:`BatchNorm` (Keras's and tf-keras's names and meanings).

        Returns
        -------
        BatchNorm

        Examples
        --------
        >>> import fastbn
        >>> bn = fastbn.BatchNorm.keras(64)
        >>> round(bn.momentum, 2), bn.eps, bn.axis, bn.running_var_unbiased
        (0.01, 0.001, -1, False)
        >>> fastbn.BatchNorm.keras(4, scale=False).gamma is None
        True
        >>> bn.training
        False
        """
        keras_momentum = _checks.check_momentum(momentum, allow_none=False)
        layer = cls(
            num_features,
            axis=axis,
            eps=epsilon,
            momentum=1.0 - keras_momentum,
            center=center,
            scale=scale,
            dtype=dtype,
            activation=activation,
            running_var_unbiased=False,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            renorm_ramp=renorm_ramp,
            virtual_batch_size=virtual_batch_size,
            comm=comm,
        )
        # Keras's call runs inference unless told training=True (its learning phase is
        # off by default); PyTorch's modules start in training mode
        return layer.eval()

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype}, "
            f"activation={self.activation!r}{self._variant_repr()})"
        )

    def _variant_repr(self):
        parts = []
        if self.affine and not (self.center and self.scale):
            parts.append(f"center={self.center}, scale={self.scale}")
        if self.renorm:
            rmin, rmax, dmax = self.renorm_clipping
            clipping = (
                f"renorm_ramp={self.renorm_ramp}"
                if self.renorm_ramp is not None
                else f"renorm_clipping={{'rmin': {rmin}, 'rmax': {rmax}, 'dmax': {dmax}}}"
            )
            parts.append(f"renorm=True, {clipping}, renorm_momentum={self.renorm_momentum}")
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        return "".join(", " + p for p in parts)

    def __call__(
        self, x: ArrayLike, training: bool | None = None, mask: Any = None, residual: Any = None
    ) -> Any:
        return self.forward(x, training=training, mask=mask, residual=residual)

    def train(self, mode: bool = True) -> "BatchNorm":
        """Set training mode (the default of :meth:`forward`); returns ``self``."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Set evaluation mode (running statistics); returns ``self``."""
        return self.train(False)

    def to(self, device: str | None = None, kind: str = "numba", *, dtype=None) -> "BatchNorm":
        """Move parameters, running statistics and gradients to ``"cuda"`` or ``"cpu"``,
        and/or convert them to another float dtype.

        ``"cuda"`` makes them device arrays of ``kind`` (``"numba"``, ``"cupy"`` or
        ``"torch"``; ``fastbn.cuda.to_device(layer, kind=)`` does the same); ``"cpu"``
        makes them NumPy arrays; None leaves them where they are. ``dtype`` (float16,
        float32 or float64) converts every array of the layer, and its ``dtype``, like
        ``torch.nn.Module.to(dtype)``; a value that would not be finite in the new dtype
        is a ValueError and nothing changes. A saved forward is dropped. Returns ``self``.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> fastbn.BatchNorm(3).to("cpu").gamma
        array([1., 1., 1.], dtype=float32)
        >>> fastbn.BatchNorm(2).to(dtype=np.float64).running_var
        array([1., 1.])
        """
        if dtype is not None:
            self._convert(dtype)
        if device is None:
            self._saved = None
            return self
        if device == "cuda":
            gpu = backends.cuda()
            gpu.check_kind(kind)
            for name in self._ARRAYS:
                setattr(self, name, gpu.as_device(getattr(self, name, None), kind))
        elif device == "cpu":
            on_device = [k for k in self._ARRAYS if _checks.is_cuda_array(getattr(self, k, None))]
            if not on_device:
                return self
            for name in on_device:
                setattr(self, name, backends.cuda().to_host(getattr(self, name)))
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self._saved = None
        return self

    def _convert(self, dtype):
        """Convert every array of the layer to ``dtype`` (checked first, then assigned)."""
        dtype = np.dtype(dtype)
        if dtype.kind == "f" and not dtype.isnative:
            dtype = dtype.newbyteorder("=")
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        converted = {}
        for name in self._ARRAYS:
            a = getattr(self, name, None)
            if a is None:
                continue
            on_device = _checks.is_cuda_array(a)
            host = backends.cuda().to_host(a) if on_device else a
            with np.errstate(over="ignore", invalid="ignore"):
                new = host.astype(dtype)
            if name in self._STATE and not np.isfinite(new).all():
                raise ValueError(
                    f"{name} does not fit in dtype {dtype}: {int((~np.isfinite(new)).sum())} "
                    f"value(s) would not be finite (largest magnitude "
                    f"{float(np.abs(host).max())!r}); the layer was left unchanged"
                )
            converted[name] = (new, on_device and backends.cuda().wrap(name, a).kind)
        for name, (new, kind) in converted.items():
            setattr(self, name, backends.cuda().as_device(new, kind) if kind else new)
        self.dtype = dtype

    def forward(
        self,
        x: ArrayLike,
        training: bool | None = None,
        mask: Any = None,
        residual: ArrayLike | None = None,
    ) -> Any:
        """Normalize ``x``.

        Parameters
        ----------
        x : array
            Input with ``num_features`` channels along ``axis``.
        training : bool, optional
            Batch statistics (and a running-statistics update, unless
            ``update_running_stats`` is False) when True, running statistics when False;
            None uses the layer's mode (:meth:`train`/:meth:`eval`). A ``frozen`` layer
            always uses its running statistics. Either way :meth:`backward` gives the
            gradient of this forward: through the batch statistics, or through the fixed
            running ones (``dx = gamma * invstd * dy``).
        mask : bool array, optional
            With batch statistics: masked statistics (see
            :func:`fastbn.batch_norm_forward`; a ``numpy.ma`` ``x`` gives its own mask);
            the running variance's unbiased correction uses the True positions' count.
            The layer keeps it for :meth:`backward`. A ValueError with running
            statistics (``training=False``, ``frozen``), which take no mask, and with
            ``renorm`` or ``virtual_batch_size`` (not supported with a mask).
        residual : array, optional
            ``z`` of x's shape, dtype and kind (any layout): the output is
            ``act(bn(x) + z)``, the add in the normalizing pass (see
            :func:`fastbn.batch_norm_forward`). The layer keeps a reference to it for
            :meth:`backward`, which then sets ``dresidual``.

        Returns
        -------
        array
            Same shape, dtype and kind as ``x``.

        An empty batch in training gives an empty output and changes nothing of the
        layer (``num_batches_tracked`` included); :meth:`backward` then gives an empty
        ``dx`` and zero ``dgamma``/``dbeta``.

        Raises
        ------
        FloatingPointError
            Non-finite batch statistics in training, or a running update that would
            overflow the layer's dtype; nothing of the layer changes.
        TypeError
            ``x`` is a host array and the layer is on the GPU (or the reverse), or a
            masked array.
        fastbn.distributed.DistributedError
            With ``comm``, when another rank failed in the same call.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2)
        >>> bn.forward(np.array([[1.0, 2.0], [3.0, 4.0]]), training=False).dtype
        dtype('float64')
        >>> y = bn.forward(np.array([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]), training=True,
        ...                mask=np.array([True, True, False]))
        >>> np.round(y[:2], 3)
        array([[-1., -1.],
               [ 1.,  1.]])

        A ResNet block's ``relu(bn(x) + z)``, and the gradient of ``z``:

        >>> block = fastbn.BatchNorm(2, dtype=np.float64, activation="relu")
        >>> x, z = np.array([[1.0, 2.0], [3.0, 6.0]]), np.array([[0.5, 0.5], [-2.0, 0.5]])
        >>> np.round(block.forward(x, training=True, residual=z), 3)
        array([[0. , 0. ],
               [0. , 1.5]])
        >>> dx = block.backward(np.ones_like(x))
        >>> block.dresidual
        array([[0., 0.],
               [0., 1.]])
        """
        if training is None:
            training = self.training
        elif training is not True and training is not False:  # "False" must not train
            if not isinstance(training, np.bool_):
                raise TypeError(
                    f"training must be a bool or None, got {type(training).__name__} ({training!r})"
                )
            training = bool(training)
        if self.frozen:
            if not self.track_running_stats:
                raise ValueError("a frozen layer needs running statistics (track_running_stats)")
            training = False
        batch_statistics = training or not self.track_running_stats
        if mask is not None or isinstance(x, np.ma.MaskedArray):
            if not batch_statistics and mask is not None:
                raise ValueError(
                    "mask= applies to batch statistics (training=True); the running "
                    "statistics normalize every position, and a mask would change nothing"
                )
            if batch_statistics:
                if self.renorm or self.virtual_batch_size is not None:
                    raise ValueError(
                        "mask= (or a numpy.ma x) is not supported with renorm or virtual_batch_size"
                    )
                x, mask = _cpu_backend.from_masked_array(x, self.axis, mask)
        given = x
        y = self._forward(
            x, training, residual, comm=self.comm if batch_statistics else None, mask=mask
        )
        self._residual = residual if self._saved is not None else None
        return _cpu_backend.tensor_result(y, given)  # a PyTorch CPU tensor in: a tensor

    @distributed.synchronized("BatchNorm.forward")
    def _forward(self, x, training, residual=None, comm=None, mask=None):
        """:meth:`forward` once ``training`` is known; ``comm`` a Sync or None.

        What :meth:`backward` differentiates (``_saved``, ``_saved_mask``) is replaced
        only by a forward that succeeds: one that raises leaves the layer as it was.
        """
        if (training or not self.track_running_stats) and residual is None:
            update = training and self.track_running_stats and self.update_running_stats
            x3 = _cpu_backend.direct_view(
                x, self.axis, None, self.gamma, self.beta, self.running_mean, self.running_var
            )
            w = (
                None
                if mask is None or x3 is None
                else _cpu_backend.direct_mask(mask, x, self.axis, x3)
            )
            if (
                x3 is not None
                and (mask is None or w is not None)
                and comm is None
                and x3.shape[1] == self.num_features
                and x3.shape[0] * x3.shape[2] >= 2
                and _cpu_backend.direct_options(self.eps, self.activation)
                and not self._variant(training, x.shape)
                and (
                    not update
                    or all(
                        a.flags.writeable and a.flags.c_contiguous
                        for a in (self.running_mean, self.running_var)
                    )
                )
            ):
                # the direct path (see fastbn.api): the kernels and the rules of the
                # general one below, on the same view
                factor = (
                    _ops.momentum_factor(self.momentum, self.num_batches_tracked)
                    if update
                    else None
                )
                y = np.empty(x.shape, x.dtype)
                mean, _, invstd = _cpu_backend.direct_train(
                    x3,
                    y.reshape(x3.shape),
                    self.gamma,
                    self.beta,
                    self.eps,
                    self.activation == "relu",
                    self.running_mean if update else None,
                    self.running_var,
                    factor,
                    self.running_var_unbiased,
                    "raise",
                    2,
                    w,
                )
                if update:
                    self.num_batches_tracked += 1
                self._saved = (x, self.axis % x.ndim, mean, invstd, None)
                self._saved_mask = mask
                return y
        be = self._backend(x)
        if not training and self.track_running_stats:
            y = api.batch_norm_inference(
                x,
                self.running_mean,
                self.running_var,
                self.gamma,
                self.beta,
                axis=self.axis,
                eps=self.eps,
                activation=self.activation,
                residual=residual,
            )
            # for a backward through the fixed statistics (read when it runs)
            x = be.wrap("x", x)
            self._saved = (be.unwrap(x), self.axis % len(x.shape), None, None, None)
            self._saved_mask = None
            return y
        if residual is not None and _checks.is_cuda_array(residual) != _checks.is_cuda_array(x):
            raise TypeError(
                f"residual must live on the same device as x: x is a "
                f"{'CUDA' if _checks.is_cuda_array(x) else 'host'} array, residual is not"
            )
        if mask is not None and _checks.is_cuda_array(mask) != _checks.is_cuda_array(x):
            raise TypeError("mask must live on the same device as x")
        x, mask = be.wrap("x", x), be.wrap("mask", mask)
        gamma, beta = be.wrap_state("gamma", self.gamma), be.wrap_state("beta", self.beta)
        axis, relu = _ops.check_forward_args(
            x, gamma, beta, self.axis, self.eps, None, self.activation
        )
        self._check_channels(x, axis)
        residual = be.wrap("residual", residual)
        _checks.check_residual(residual, x.shape, x.dtype)
        if residual is not None and self._variant(training, x.shape):
            raise ValueError(
                "residual= is not supported in training with renorm=True or "
                "virtual_batch_size smaller than the batch: add z after the layer"
            )
        _checks.check_mask(mask, x.shape, axis)
        running = None
        if training and self.track_running_stats and self.update_running_stats:
            factor = _ops.momentum_factor(self.momentum, self.num_batches_tracked)
            running_mean = be.wrap_state("running_mean", self.running_mean)
            running_var = be.wrap_state("running_var", self.running_var)
            # the layer's own arrays, but replaceable by the user: checked as batch_norm's
            _checks.check_running("running_mean", running_mean, self.num_features, axis)
            _checks.check_running("running_var", running_var, self.num_features, axis)
            running = _ops.Running(running_mean, running_var, factor, self.running_var_unbiased)
        if comm is None:  # with comm the rule applies to the global batch
            _checks.check_batch(x.shape, axis, training=True)
            if x.size == 0:  # like PyTorch: an empty output, the layer's state untouched
                running = None
        if self._variant(training, x.shape) and (x.size or (comm is not None and self.renorm)):
            return self._variant_forward(be, x, gamma, beta, axis, relu, running, comm)
        # float64 statistics for the backward
        y, mean, invstd = _ops.train_forward(
            be,
            x,
            gamma,
            beta,
            axis,
            self.eps,
            relu,
            None,
            None,
            dtype=_FLOAT64,
            running=running,
            comm=comm,
            residual=residual,
            mask=mask,
        )
        if running is not None:
            self.num_batches_tracked += 1
        self._saved = (be.unwrap(x), axis, mean, invstd, None)
        self._saved_mask = mask
        return y

    def _variant(self, training, shape):
        """Whether a forward takes a variant's path: renormalization in training, or ghost
        batches smaller than the batch (a ghost batch of the whole batch is plain)."""
        if not training:
            return False
        k = self.virtual_batch_size
        return self.renorm or (k is not None and len(shape) > 0 and shape[0] != k)

    def _variant_forward(self, be, x, gamma, beta, axis, relu, running, comm):
        """The training forward of batch renormalization or ghost batches (checked
        arguments, wrapped arrays); saves what the backward needs."""
        if self.renorm:
            if self.renorm_ramp is None:
                rmin, rmax, dmax = self.renorm_clipping
            else:
                rmin, rmax, dmax = _variants.ramp_clipping(
                    self.num_batches_tracked, self.renorm_ramp
                )
            renorm = _variants.Renorm(
                be.wrap_state("renorm_mean", self.renorm_mean),
                be.wrap_state("renorm_stddev", self.renorm_stddev),
                be.wrap_state("running_stddev", self.running_stddev),
                self.renorm_momentum,
                rmin,
                rmax,
                dmax,
            )
            y, mean, invstd, gamma_r, beta_r, r, d = _variants.renorm_train_forward(
                be, x, gamma, beta, axis, self.eps, relu, _FLOAT64, renorm, running, comm=comm
            )
            saved = (mean, invstd, ("renorm", gamma_r, beta_r, r, d))
        else:
            k = self.virtual_batch_size
            _variants.check_virtual_batch(x.shape, axis, k)
            _checks.check_batch((k,) + tuple(x.shape[1:]), axis, training=True)
            y, means, invstds = _variants.ghost_train_forward(
                be, x, gamma, beta, axis, self.eps, relu, k, _FLOAT64, running, comm=comm
            )
            saved = (means, invstds, ("ghost",))
        if running is not None:
            self.num_batches_tracked += 1
        self._saved = (be.unwrap(x), axis) + saved
        self._saved_mask = None
        return y

    def backward(self, dy: ArrayLike) -> Any:
        """Gradient with respect to the last forward's input.

        After a forward with batch statistics, the training gradient; after one with the
        running statistics (``training=False``, or a ``frozen`` layer), the gradient
        through those fixed statistics: ``dx = gamma * invstd * dy``,
        ``dgamma = sum(dy * xhat)``, ``dbeta = sum(dy)`` (ReLU-masked ``dy`` with
        ``activation="relu"``); the running statistics are not touched.

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last output.

        Returns
        -------
        array
            ``dx``; ``self.dgamma`` and ``self.dbeta`` are set (both when the layer is
            affine, both None when not), and ``self.dresidual``: the gradient with
            respect to the forward's ``residual`` (None when it had none).

        Raises
        ------
        RuntimeError
            No forward to differentiate.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2, dtype=np.float64)
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> _ = bn.forward(x, training=True)
        >>> bn.backward(np.ones_like(x))
        array([[0., 0.],
               [0., 0.]])

        Through the running statistics (reset here to mean 0, variance 1):

        >>> bn.reset_running_stats()
        >>> _ = bn.forward(x, training=False)
        >>> np.round(bn.backward(np.ones_like(x)), 4)
        array([[1., 1.],
               [1., 1.]])
        >>> bn.dbeta
        array([2., 2.])
        """
        return _cpu_backend.tensor_result(self._backward(dy, comm=self.comm), dy)

    @distributed.synchronized("BatchNorm.backward")
    def _backward(self, dy, comm=None):
        """:meth:`backward`; ``comm`` a Sync or None."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward(x)")
        x, axis, mean, invstd, variant = self._saved
        residual = self._residual
        mask = self._saved_mask
        frozen = mean is None  # the forward normalized with the running statistics
        if frozen:
            if _checks.is_cuda_array(dy) != _checks.is_cuda_array(x):
                raise TypeError("dy must live on the same device as the forward's input")
            be = self._backend(x)
            mean, invstd = _ops.frozen_statistics(
                be, be.wrap_state("x", x), self.running_mean, self.running_var, self.eps
            )
        if (
            variant is None
            and residual is None
            and comm is None
            and type(dy) is np.ndarray
            and dy.shape == x.shape
            and dy.dtype == x.dtype
            and dy.flags.c_contiguous
        ):
            x3 = _cpu_backend.direct_view(x, axis, None, mean, invstd, self.gamma, self.beta)
            w = None if mask is None or x3 is None else _cpu_backend.direct_mask(mask, x, axis, x3)
            if x3 is not None and x.size and (mask is None or w is not None):
                # the direct path (see fastbn.api)
                dx = np.empty(x.shape, x.dtype)
                relu = self.activation == "relu"
                if w is not None:  # a mask comes from a forward with batch statistics
                    dgamma, dbeta = _cpu_backend.direct_masked_backward(
                        dy.reshape(x3.shape), x3, w, mean, invstd, self.gamma, self.beta, relu,
                        dx.reshape(x3.shape),
                    )  # fmt: skip
                else:
                    direct = (
                        _cpu_backend.direct_frozen_backward
                        if frozen
                        else _cpu_backend.direct_backward
                    )
                    dgamma, dbeta = direct(dy, x3, mean, invstd, self.gamma, self.beta, relu, dx)
                self._set_grads(
                    dgamma.astype(self.dtype, copy=False), dbeta.astype(self.dtype, copy=False)
                )
                self.dresidual = None
                return dx
        if _checks.is_cuda_array(dy) != _checks.is_cuda_array(x):
            raise TypeError("dy must live on the same device as the forward's input")
        be = self._backend(dy)
        dy, x = be.wrap("dy", dy), be.wrap_state("x", x)
        _checks.check_input("dy", dy)
        if dy.shape != x.shape or dy.dtype != x.dtype:
            raise ValueError(
                f"dy must have the shape and dtype of the forward's input "
                f"{x.shape} {x.dtype}, got {dy.shape} {dy.dtype}"
            )
        gamma, beta = be.wrap_state("gamma", self.gamma), be.wrap_state("beta", self.beta)
        grads = (gamma if gamma is not None else beta, self.dtype) if self.affine else None
        relu = self.activation == "relu"
        if variant is None:
            operation = _ops.frozen_backward if frozen else _ops.backward
            dx, dgamma, dbeta, *dz = operation(
                be,
                dy,
                x,
                be.wrap_state("mean", mean),
                be.wrap_state("invstd", invstd),
                gamma,
                beta,
                axis,
                relu,
                None,
                None,
                grads=grads,
                comm=comm,
                residual=None if residual is None else be.wrap("residual", residual),
                residual_grad=residual is not None,
                **({} if frozen else {"mask": mask}),
            )
        elif variant[0] == "renorm":
            _, gamma_r, beta_r, r, d = variant
            dx, dgamma, dbeta = _variants.renorm_backward(
                be,
                dy,
                x,
                be.wrap_state("mean", mean),
                be.wrap_state("invstd", invstd),
                gamma_r,
                beta_r,
                r,
                d,
                axis,
                relu,
                grads,
                comm=comm,
            )
        else:
            dx, dgamma, dbeta = _variants.ghost_backward(
                be, dy, x, mean, invstd, gamma, beta, axis, relu, grads, comm=comm
            )
        self._set_grads(dgamma, dbeta)
        self.dresidual = dz[0] if variant is None and dz else None
        return dx

    def _set_grads(self, dgamma, dbeta):
        """Keep the gradients of the parameters the layer has (None for a missing one)."""
        self.dgamma = dgamma if self.scale else None
        self.dbeta = dbeta if self.center else None

    def _backend(self, x):
        """The backend of ``x``; a TypeError when the layer's state lives elsewhere."""
        if not _checks.is_cuda_array(x):
            for a in (getattr(self, k) for k in self._STATE):
                if a is not None and type(a) is not np.ndarray:  # decided here, usually
                    break
            else:
                return backends.cpu
            on_device = [k for k in self._STATE if _checks.is_cuda_array(getattr(self, k))]
            if on_device:
                raise TypeError(
                    f"x is a host array ({type(x).__name__}) but the layer is on "
                    f"the GPU (its {', '.join(on_device)} are CUDA arrays): pass a "
                    f"CUDA array, or call layer.to('cpu') first"
                )
            return backends.cpu
        on_host = [
            k
            for k in self._STATE
            if getattr(self, k) is not None and not _checks.is_cuda_array(getattr(self, k))
        ]
        if on_host:
            raise TypeError(
                f"the layer's {', '.join(on_host)} are on the host but x is a CUDA "
                f"array: call layer.to('cuda') (or fastbn.cuda.to_device(layer)) "
                f"first"
            )
        return backends.cuda()

    def _check_channels(self, x, axis):
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"x must have {self.num_features} channels along axis "
                f"{self.axis}, got shape {tuple(x.shape)}"
            )

    def parameters(self) -> list:
        """The trainable arrays and their gradients: ``[(gamma, dgamma), (beta, dbeta)]``.

        Empty when the layer is not affine.

        Examples
        --------
        >>> import fastbn
        >>> len(fastbn.BatchNorm(4).parameters())
        2
        """
        pairs = [(self.gamma, self.dgamma), (self.beta, self.dbeta)]
        return [(p, g) for p, g in pairs if p is not None]

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (and the renorm
        statistics and running standard deviation 0, 1 and 1), in place, wherever they
        live.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2)
        >>> _ = bn.forward(np.array([[1.0, 2.0], [3.0, 5.0]], np.float32), training=True)
        >>> bn.reset_running_stats()
        >>> bn.running_mean, bn.running_var, bn.num_batches_tracked
        (array([0., 0.], dtype=float32), array([1., 1.], dtype=float32), 0)
        """
        for name, fill in (
            ("running_mean", 0.0),
            ("running_var", 1.0),
            ("renorm_mean", 0.0),
            ("renorm_stddev", 1.0),
            ("running_stddev", 1.0),
        ):
            a = getattr(self, name)
            if a is not None:
                backends.backend_of(a).copy_into(a, np.full(self.num_features, fill, self.dtype))
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, then ``gamma`` 1 and ``beta`` 0 (PyTorch's
        ``reset_parameters``); the gradients stay as they are.

        Examples
        --------
        >>> import fastbn
        >>> bn = fastbn.BatchNorm(2)
        >>> bn.gamma[:] = 3.0
        >>> bn.reset_parameters()
        >>> bn.gamma
        array([1., 1.], dtype=float32)
        """
        self.reset_running_stats()
        for name, fill in (("gamma", 1.0), ("beta", 0.0)):
            a = getattr(self, name)
            if a is not None:
                backends.backend_of(a).copy_into(a, np.full(self.num_features, fill, self.dtype))

    _STATE = (
        "gamma",
        "beta",
        "running_mean",
        "running_var",
        "renorm_mean",
        "renorm_stddev",
        "running_stddev",
    )
    _ARRAYS = _STATE + ("dgamma", "dbeta")

    def state_dict(self) -> dict:
        """Copies of the layer's state: parameters, running statistics, batch count.

        Returns
        -------
        dict
            Keys ``gamma``, ``beta``, ``running_mean``, ``running_var``, ``renorm_mean``,
            ``renorm_stddev``, ``running_stddev`` (those that are not None) and
            ``num_batches_tracked``.

        Examples
        --------
        >>> import fastbn
        >>> sorted(fastbn.BatchNorm(3).state_dict())
        ['beta', 'gamma', 'num_batches_tracked', 'running_mean', 'running_var']
        """
        state = {k: _copy(getattr(self, k)) for k in self._STATE if getattr(self, k) is not None}
        state["num_batches_tracked"] = int(self.num_batches_tracked)
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> "IncompatibleKeys":
        """Load a :meth:`state_dict`; checks every entry before changing anything.

        Parameters
        ----------
        state : dict
        strict : bool, default True
            True: the keys must be exactly the layer's (PyTorch's rule). False: load the
            entries the layer has, leave the others of the layer as they are (a state
            without ``num_batches_tracked`` keeps the layer's count) and ignore unknown
            keys; the entries present are checked all the same.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, sorted lists (empty when strict).

        Raises
        ------
        KeyError
            With ``strict``: an entry the layer needs is missing, or an unknown entry is
            present.
        TypeError
            ``state`` is not a mapping; an entry is not an array of real numbers
            (strings, None, objects).
        ValueError
            An entry has the wrong shape, or a value that is not finite in the layer's
            dtype; ``num_batches_tracked`` is not an integer >= 0.

        Every entry is checked before any is assigned: a call that raises leaves the
        layer exactly as it was.

        Examples
        --------
        >>> import fastbn
        >>> a, b = fastbn.BatchNorm(3), fastbn.BatchNorm(3)
        >>> a.running_mean[:] = 1.0
        >>> b.load_state_dict(a.state_dict())
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> b.running_mean
        array([1., 1., 1.], dtype=float32)
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of names to arrays (what state_dict() "
                f"returns), got {type(state).__name__}"
            )
        expected = {k for k in self._STATE if getattr(self, k) is not None}
        expected.add("num_batches_tracked")
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        # Validate and convert every entry first (in a fixed order), assign only then.
        values = {
            k: self._state_entry(k, state[k]) for k in self._STATE if k in expected and k in state
        }
        n = self.num_batches_tracked
        if "num_batches_tracked" in state:
            n = _checks.check_num_batches_tracked(
                state["num_batches_tracked"], "state_dict['num_batches_tracked']"
            )
        for k, value in values.items():
            current = getattr(self, k)
            backends.backend_of(current).copy_into(current, value)
        self.num_batches_tracked = n
        return IncompatibleKeys(missing, unexpected)

    def _state_entry(self, key, value):
        """One entry of a state dict checked and converted: a finite ``(C,)`` host array
        of the layer's dtype (no NaN, no inf, nothing that overflows that dtype)."""
        name = f"state_dict[{key!r}]"
        if _cpu_backend.is_tensor(value) and not _checks.is_cuda_array(value):
            # a parameter (requires grad) or bfloat16, which NumPy cannot view: its values
            value = value.detach()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()  # exact
        if _checks.is_cuda_array(value):
            value = backends.cuda().to_host(value)
        _checks.check_not_masked(name, value)
        try:
            a = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - any unconvertible object
            raise TypeError(
                f"{name} must be an array of shape ({self.num_features},), got "
                f"{type(value).__name__} ({exc})"
            ) from None
        if a.dtype.kind == "O" and all(
            isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_))
            for v in a.ravel()
        ):
            a = a.astype(np.float64)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be an array of real numbers, got dtype {a.dtype}")
        if a.shape != (self.num_features,):
            raise ValueError(f"{name} must have shape ({self.num_features},), got {a.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            converted = a.astype(self.dtype)
        if not np.isfinite(converted).all():
            bad = np.flatnonzero(~np.isfinite(converted))
            raise ValueError(
                f"{name} must be finite in {self.dtype}, got {a[bad[0]]!r} at "
                f"index {int(bad[0])} ({bad.size} non-finite value(s))"
            )
        return converted


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` did not match (PyTorch's result)."""

    missing_keys: list
    unexpected_keys: list


def _copy(a):
    if _checks.is_cuda_array(a):
        return backends.cuda().to_host(a)
    return a.copy()
