"""The ``BatchNorm`` layer: parameters, running statistics, forward and backward."""

import numpy as np

from . import _checks, api, distributed


class BatchNorm:
    """Batch Normalization layer over the channel axis ``axis``.

    Holds ``gamma`` (ones) and ``beta`` (zeros), the running statistics ``running_mean``
    (zeros) and ``running_var`` (ones), and ``num_batches_tracked``. ``forward`` in
    training normalizes with batch statistics and updates the running ones; otherwise it
    normalizes with the running ones. ``backward(dy)`` returns ``dx`` and stores
    ``dgamma`` and ``dbeta``.

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
        Learn ``gamma`` and ``beta``; when False they are None.
    track_running_stats : bool, default True
        Keep running statistics; when False the layer always uses batch statistics.
    dtype : numpy dtype, default float32
        dtype of the parameters and running statistics.
    activation : {None, "relu"}, optional
        Fuse a ReLU after the normalization (forward and backward).
    running_var_unbiased : bool, default True
        Running variance from the unbiased batch variance (PyTorch) or the biased one
        (Keras).
    comm : mpi4py.MPI.Comm, optional
        Synchronized BatchNorm (like ``torch.nn.SyncBatchNorm``): each rank's
        ``forward`` in training takes its shard of the batch and normalizes with the
        statistics of the whole batch; the running statistics and, after ``backward``,
        ``dgamma`` and ``dbeta`` are those of the whole batch and identical on every
        rank. Every rank of ``comm`` must then call ``forward`` and ``backward`` together
        (they are collective). Host arrays only. See :mod:`fastbn.distributed`.

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

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, activation=None,
                 running_var_unbiased=True, comm=None):
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
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.running_var_unbiased = bool(running_var_unbiased)
        if comm is not None:
            distributed.check_comm(comm)
        self.comm = comm
        self.dtype = dtype
        C = self.num_features
        self.gamma = np.ones(C, dtype) if affine else None
        self.beta = np.zeros(C, dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.dgamma = None
        self.dbeta = None
        self.training = True
        self._saved = None

    @classmethod
    def keras(cls, num_features, *, axis=-1, momentum=0.99, epsilon=1e-3, center=True,
              scale=True, dtype=np.float32, activation=None):
        """A layer with the conventions of ``keras.layers.BatchNormalization``.

        Keras's ``momentum`` weighs the *old* running value
        (``moving = momentum * moving + (1 - momentum) * batch``), its epsilon is 1e-3,
        the channel axis is last, and its moving variance takes the biased batch
        variance. This returns the equivalent fastbn layer (``momentum = 1 - momentum``).

        Parameters
        ----------
        num_features : int
        axis : int, default -1
        momentum : float, default 0.99
            Keras's momentum (weight of the old value).
        epsilon : float, default 1e-3
        center, scale : bool, default True
            Keras's switches for ``beta`` and ``gamma``; both on or both off.
        dtype : numpy dtype, default float32
        activation : {None, "relu"}, optional

        Returns
        -------
        BatchNorm

        Examples
        --------
        >>> import fastbn
        >>> bn = fastbn.BatchNorm.keras(64)
        >>> round(bn.momentum, 2), bn.eps, bn.axis, bn.running_var_unbiased
        (0.01, 0.001, -1, False)
        """
        if bool(center) != bool(scale):
            raise ValueError("center and scale must both be True or both False, got "
                             f"center={center}, scale={scale}")
        keras_momentum = _checks.check_momentum(momentum, allow_none=False)
        return cls(num_features, axis=axis, eps=epsilon, momentum=1.0 - keras_momentum,
                   affine=bool(center), dtype=dtype, activation=activation,
                   running_var_unbiased=False)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, dtype={self.dtype}, "
                f"activation={self.activation!r})")

    def __call__(self, x, training=None):
        return self.forward(x, training=training)

    def train(self, mode=True):
        """Set training mode (the default of :meth:`forward`); returns ``self``."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode (running statistics); returns ``self``."""
        return self.train(False)

    def to(self, device):
        """Move parameters, running statistics and gradients to ``"cuda"`` or ``"cpu"``.

        ``"cuda"`` makes them Numba device arrays (``fastbn.cuda.to_device(layer, kind=)``
        gives CuPy or PyTorch ones); ``"cpu"`` makes them NumPy arrays. Returns ``self``.

        Examples
        --------
        >>> import fastbn
        >>> fastbn.BatchNorm(3).to("cpu").gamma
        array([1., 1., 1.], dtype=float32)
        """
        if device == "cpu" and not any(api.is_cuda_array(getattr(self, k, None)) for k in
                                       ("gamma", "beta", "running_mean", "running_var",
                                        "dgamma", "dbeta")):
            return self
        from . import cuda
        return cuda.move_layer(self, device)

    def forward(self, x, training=None):
        """Normalize ``x``.

        Parameters
        ----------
        x : array
            Input with ``num_features`` channels along ``axis``.
        training : bool, optional
            Batch statistics (and a running-statistics update) when True, running
            statistics when False; None uses the layer's mode (:meth:`train`/:meth:`eval`).

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
        """
        training = self.training if training is None else bool(training)
        batch_statistics = training or not self.track_running_stats
        return self._forward(x, training, comm=self.comm if batch_statistics else None)

    @distributed.synchronized("BatchNorm.forward")
    def _forward(self, x, training, comm=None):
        """:meth:`forward` once ``training`` is known; ``comm`` a Sync or None."""
        if api.is_cuda_array(x):
            if comm is not None:  # synchronized through host staging (fastbn.cuda)
                from . import cuda
                return cuda.layer_forward(self, x, training, comm=comm)
            return self._forward_cuda(x, training)
        x = api._as_host("x", x)
        for a in (self.gamma, self.beta, self.running_mean, self.running_var):
            if a is not None and type(a) is not np.ndarray:  # decided in this loop, usually
                on_device = [k for k in self._STATE if api.is_cuda_array(getattr(self, k))]
                break
        else:
            on_device = None
        if on_device:
            raise TypeError(f"x is a host array ({type(x).__name__}) but the layer is on the "
                            f"GPU (its {', '.join(on_device)} are CUDA arrays): pass a CUDA "
                            f"array, or call layer.to('cpu') first")
        if not training and self.track_running_stats:
            self._saved = None
            return api.batch_norm_inference(x, self.running_mean, self.running_var,
                                            self.gamma, self.beta, axis=self.axis,
                                            eps=self.eps, activation=self.activation)
        axis, relu = api._check_forward_args(x, self.gamma, self.beta, self.axis, self.eps,
                                             None, self.activation)
        self._check_channels(x, axis)
        update = training and self.track_running_stats
        factor = (api._momentum_factor(self.momentum, self.num_batches_tracked)
                  if update else None)
        if comm is None:  # with comm the rule applies to the global batch
            C, m = _checks.check_batch(x.shape, axis, training=True)
            if x.size == 0:  # like PyTorch: an empty output, the layer's state untouched
                nan = np.full(C, np.nan)
                self._saved = (x, axis, nan, nan)
                return np.empty(x.shape, x.dtype)
        dest, mean, var, invstd = api._forward_training(x, axis, self.gamma, self.beta,
                                                        self.eps, relu, None, guard=None,
                                                        comm=comm)
        if comm is not None:
            m = comm.count
        if update:
            new = api._running_values(self.running_mean, self.running_var, mean, var, m,
                                      factor, self.running_var_unbiased)
            api._check_finite(mean, var, "raise", new)
            api._store_running(self.running_mean, self.running_var, new)
            self.num_batches_tracked += 1
        self._saved = (x, axis, mean, invstd)
        return dest.finish()

    def backward(self, dy):
        """Gradient with respect to the last training-mode input.

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last output.

        Returns
        -------
        array
            ``dx``; ``self.dgamma`` and ``self.dbeta`` are set (both when the layer is
            affine, both None when not).

        Raises
        ------
        RuntimeError
            No training-mode forward to differentiate.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2, dtype=np.float64)
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> _ = bn.forward(x, training=True)
        >>> bn.backward(np.ones_like(x))
        array([[0., 0.],
               [0., 0.]])
        """
        return self._backward(dy, comm=self.comm)

    @distributed.synchronized("BatchNorm.backward")
    def _backward(self, dy, comm=None):
        """:meth:`backward`; ``comm`` a Sync or None."""
        if self._saved is None:
            raise RuntimeError("backward() needs a preceding forward(x, training=True) "
                               "(or a layer without running statistics)")
        x, axis, mean, invstd = self._saved
        if api.is_cuda_array(dy) != api.is_cuda_array(x):
            raise TypeError("dy must live on the same device as the forward's input")
        if api.is_cuda_array(dy):
            if comm is not None:  # synchronized through host staging (fastbn.cuda)
                from . import cuda
                return cuda.layer_backward(self, dy, comm=comm)
            return self._backward_cuda(dy)
        dy = api._as_host("dy", dy)
        _checks.check_input("dy", dy)
        if dy.shape != x.shape or dy.dtype != x.dtype:
            raise ValueError(f"dy must have the shape and dtype of the forward's input "
                             f"{x.shape} {x.dtype}, got {dy.shape} {dy.dtype}")
        relu = self.activation == "relu"
        if x.size == 0 and comm is None:  # an empty batch: no gradient to speak of
            if self.affine:
                self.dgamma = np.zeros(self.num_features, self.dtype)
                self.dbeta = np.zeros(self.num_features, self.dtype)
            return np.empty(x.shape, x.dtype)
        dx, dgamma, dbeta = api._backward(dy, x, mean, invstd, self.gamma, self.beta, axis,
                                          relu, None, comm)
        if self.affine:
            self.dgamma = dgamma.astype(self.dtype)
            self.dbeta = dbeta.astype(self.dtype)
        return dx

    def _check_channels(self, x, axis):
        if x.shape[axis] != self.num_features:
            raise ValueError(f"x must have {self.num_features} channels along axis "
                             f"{self.axis}, got shape {tuple(x.shape)}")

    def _forward_cuda(self, x, training):
        from . import cuda
        return cuda.layer_forward(self, x, training)

    def _backward_cuda(self, dy):
        from . import cuda
        return cuda.layer_backward(self, dy)

    def parameters(self):
        """The trainable arrays and their gradients: ``[(gamma, dgamma), (beta, dbeta)]``.

        Empty when the layer is not affine.

        Examples
        --------
        >>> import fastbn
        >>> len(fastbn.BatchNorm(4).parameters())
        2
        """
        if not self.affine:
            return []
        return [(self.gamma, self.dgamma), (self.beta, self.dbeta)]

    _STATE = ("gamma", "beta", "running_mean", "running_var")

    def state_dict(self):
        """Copies of the layer's state: parameters, running statistics, batch count.

        Returns
        -------
        dict
            Keys ``gamma``, ``beta``, ``running_mean``, ``running_var`` (those that are
            not None) and ``num_batches_tracked``.

        Examples
        --------
        >>> import fastbn
        >>> sorted(fastbn.BatchNorm(3).state_dict())
        ['beta', 'gamma', 'num_batches_tracked', 'running_mean', 'running_var']
        """
        state = {k: _copy(getattr(self, k)) for k in self._STATE if getattr(self, k) is not None}
        state["num_batches_tracked"] = int(self.num_batches_tracked)
        return state

    def load_state_dict(self, state):
        """Load a :meth:`state_dict`; checks every entry before changing anything.

        Parameters
        ----------
        state : dict

        Raises
        ------
        KeyError
            An entry the layer needs is missing, or an unknown entry is present.
        TypeError
            An entry is not an array of real numbers (strings, None, objects).
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
        >>> b.running_mean
        array([1., 1., 1.], dtype=float32)
        """
        expected = {k for k in self._STATE if getattr(self, k) is not None}
        expected.add("num_batches_tracked")
        missing = expected - set(state)
        unexpected = set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state_dict mismatch: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        # Validate and convert every entry first (in a fixed order), assign only then.
        values = {k: self._state_entry(k, state[k]) for k in self._STATE if k in expected}
        n = _checks.check_num_batches_tracked(state["num_batches_tracked"],
                                              "state_dict['num_batches_tracked']")
        for k, value in values.items():
            current = getattr(self, k)
            if api.is_cuda_array(current):
                from . import cuda
                cuda.copy_into(current, value)
            else:
                current[...] = value
        self.num_batches_tracked = n

    def _state_entry(self, key, value):
        """One entry of a state dict checked and converted: a finite ``(C,)`` host array
        of the layer's dtype (no NaN, no inf, nothing that overflows that dtype)."""
        name = f"state_dict[{key!r}]"
        if api.is_cuda_array(value):
            from . import cuda
            value = cuda.to_host(value)
        _checks.check_not_masked(name, value)
        try:
            a = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - any unconvertible object
            raise TypeError(f"{name} must be an array of shape ({self.num_features},), got "
                            f"{type(value).__name__} ({exc})") from None
        if a.dtype.kind == "O" and all(isinstance(v, (int, float, np.integer, np.floating))
                                       and not isinstance(v, (bool, np.bool_))
                                       for v in a.ravel()):
            a = a.astype(np.float64)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be an array of real numbers, got dtype {a.dtype}")
        if a.shape != (self.num_features,):
            raise ValueError(f"{name} must have shape ({self.num_features},), got {a.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            converted = a.astype(self.dtype)
        if not np.isfinite(converted).all():
            bad = np.flatnonzero(~np.isfinite(converted))
            raise ValueError(f"{name} must be finite in {self.dtype}, got {a[bad[0]]!r} at "
                             f"index {int(bad[0])} ({bad.size} non-finite value(s))")
        return converted


def _copy(a):
    if api.is_cuda_array(a):
        from . import cuda
        return cuda.to_host(a)
    return a.copy()
