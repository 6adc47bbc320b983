"""Layers and the ``Sequential`` model.

Every layer works on 2-D ``(batch, features)`` arrays of one array module (NumPy on the
CPU, CuPy on a GPU), chosen when the model is built: matrix products go to the module's
BLAS (``xp.matmul`` with ``out=``), everything elementwise to fastbn's kernels
(:mod:`fastbn.nn._ops`), BatchNorm to :class:`fastbn.BatchNorm`.

Memory: a :class:`Sequential` keeps all trainable parameters in one flat array and all
their gradients in another (each layer's ``weight``, ``bias``, ``gamma``, ``beta`` are
views into them), so an optimizer updates the whole model in one kernel call. Layers
keep their activations in buffers allocated once per batch size: the array a layer
returns belongs to it and is overwritten by its next call of the same batch size.
"""

from collections import namedtuple

import numpy as np

from .. import layer as _core_layer
from . import _device, _ops

__all__ = [
    "Parameter",
    "ParameterStore",
    "Dense",
    "ReLU",
    "BatchNorm",
    "Sequential",
    "INITIALIZERS",
]

Parameter = namedtuple("Parameter", ["name", "value", "grad"])
Parameter.__doc__ = """A trainable array and its gradient (same shape, same device).

Attributes
----------
name : str
    ``"layers.<index>.<name>"``, e.g. ``"layers.0.weight"``.
value : array
    The parameter, updated in place by the optimizers.
grad : array
    Its gradient, written by the layer's ``backward``.
"""

INITIALIZERS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "torch")
_ALIASES = {
    "glorot": "glorot_uniform",
    "xavier": "glorot_uniform",
    "he": "he_normal",
    "kaiming": "he_normal",
}


class ParameterStore:
    """All parameters of a model in one flat array, all gradients in another.

    Parameters
    ----------
    specs : list of (str, numpy.ndarray)
        Names and initial values (host arrays); the store copies them.
    xp : module
        Array module of the store (NumPy or CuPy).
    dtype : numpy dtype
        dtype of the flat arrays.

    Attributes
    ----------
    values, grads : array, shape (P,)
        The flat parameter and gradient arrays.
    parameters : list of Parameter
        One view of ``values`` and of ``grads`` per parameter, in ``specs`` order.
    xp : module

    Examples
    --------
    >>> import numpy as np
    >>> store = ParameterStore([("w", np.ones((2, 3))), ("b", np.zeros(3))], np, np.float32)
    >>> store.values.shape, store.parameters[0].value.shape
    ((9,), (2, 3))
    >>> store.parameters[0].value[0, 0] = 5.0
    >>> float(store.values[0])
    5.0
    """

    def __init__(self, specs, xp, dtype):
        self.xp = xp
        self.dtype = np.dtype(dtype)
        sizes = [int(np.size(init)) for _, init in specs]
        total = int(sum(sizes))
        host = np.empty(total, self.dtype)
        offset = 0
        for (_, init), size in zip(specs, sizes):
            host[offset : offset + size] = np.asarray(init, dtype=np.float64).ravel()
            offset += size
        self.values = xp.asarray(host)
        self.grads = xp.zeros(total, self.dtype)
        self.parameters = []
        offset = 0
        for (name, init), size in zip(specs, sizes):
            shape = np.shape(init)
            self.parameters.append(
                Parameter(
                    name,
                    self.values[offset : offset + size].reshape(shape),
                    self.grads[offset : offset + size].reshape(shape),
                )
            )
            offset += size

    def __len__(self):
        return len(self.parameters)

    def __iter__(self):
        return iter(self.parameters)

    @property
    def size(self):
        """int: Total number of scalar parameters."""
        return int(self.values.shape[0])


def _initial_weight(init, fan_in, fan_out, rng):
    """Draw an initial ``(fan_in, fan_out)`` weight matrix (float64, host).

    Parameters
    ----------
    init : str
        One of :data:`INITIALIZERS` (or an alias: ``"glorot"``, ``"he"``).
    fan_in, fan_out : int
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray
    """
    init = _ALIASES.get(init, init)
    if init == "glorot_uniform":  # Keras's Dense default
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out))
    if init == "glorot_normal":
        return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out))
    if init == "he_uniform":
        limit = np.sqrt(6.0 / fan_in)
        return rng.uniform(-limit, limit, (fan_in, fan_out))
    if init == "he_normal":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
    if init == "torch":  # torch.nn.Linear: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        limit = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-limit, limit, (fan_in, fan_out))
    raise ValueError(f"init must be one of {INITIALIZERS} (or {sorted(_ALIASES)}), got {init!r}")


class _Layer:
    """Base of the layers: no parameters, bound to an array module by the model."""

    xp = np
    ops = _ops.CpuOps

    def param_specs(self):
        """Names and initial host values of the layer's parameters (none by default)."""
        return []

    def bind(self, xp, ops, params):
        """Attach the layer to an array module and to its parameter views.

        Parameters
        ----------
        xp : module
            NumPy or CuPy.
        ops : CpuOps or ArrayOps
            Elementwise operations for ``xp``.
        params : dict of str to Parameter
            The views created by the model's :class:`ParameterStore`, by local name.
        """
        self.xp = xp
        self.ops = ops

    def _buffer(self, cache, n, width, dtype):
        """A cached ``(n, width)`` array of this layer's module (allocated on first use)."""
        buf = cache.get(n)
        if buf is None:
            buf = cache[n] = self.xp.empty((n, width), dtype)
        return buf


class Dense(_Layer):
    """Fully connected layer ``y = act(x @ weight + bias)``, Keras's ``Dense``.

    ``weight`` has Keras's layout ``(in_features, out_features)``. With
    ``activation="relu"`` the bias and the ReLU run in one fused kernel after the matrix
    product, and backward computes the ReLU mask and the bias gradient in one pass.

    Parameters
    ----------
    in_features, out_features : int
    activation : {None, "relu"}, optional
    init : str, default "glorot_uniform"
        Weight initialization: ``"glorot_uniform"`` (Keras's default), ``"glorot_normal"``,
        ``"he_uniform"``, ``"he_normal"`` (aliases ``"glorot"``, ``"he"``), or ``"torch"``
        (``torch.nn.Linear``'s ``U(-1/sqrt(in), 1/sqrt(in))`` for weight and bias).
        Biases start at zero except with ``"torch"``.
    rng : numpy.random.Generator or int, optional
        Source of the initial weights (a seed is accepted).
    dtype : numpy dtype, default float32

    Attributes
    ----------
    weight, bias : array
        Views into the model's flat parameter array once the layer is in a model.
    weight_grad, bias_grad : array
        Their gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.nn import Dense, Sequential
    >>> model = Sequential([Dense(4, 3, activation="relu", rng=0)])
    >>> model.layers[0].weight.shape
    (4, 3)
    >>> model.forward(np.ones((2, 4), np.float32)).shape
    (2, 3)
    """

    def __init__(
        self,
        in_features,
        out_features,
        activation=None,
        *,
        init="glorot_uniform",
        rng=None,
        dtype=np.float32,
    ):
        for arg, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.activation = activation
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(rng)
        self._init_weight = _initial_weight(init, self.in_features, self.out_features, rng)
        if _ALIASES.get(init, init) == "torch":
            limit = 1.0 / np.sqrt(self.in_features)
            self._init_bias = rng.uniform(-limit, limit, self.out_features)
        else:
            self._init_bias = np.zeros(self.out_features)
        self.weight = self._init_weight.astype(self.dtype)
        self.bias = self._init_bias.astype(self.dtype)
        self.weight_grad = np.zeros_like(self.weight)
        self.bias_grad = np.zeros_like(self.bias)
        self._out, self._dz, self._dx = {}, {}, {}
        self._x = self._y = None

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}, activation={self.activation!r})"

    def param_specs(self):
        """``[("weight", ...), ("bias", ...)]`` with the initial values."""
        return [("weight", self._init_weight), ("bias", self._init_bias)]

    def bind(self, xp, ops, params):
        """Use the model's views for ``weight``/``bias`` and their gradients."""
        super().bind(xp, ops, params)
        self.weight, self.weight_grad = params["weight"].value, params["weight"].grad
        self.bias, self.bias_grad = params["bias"].value, params["bias"].grad
        self._out, self._dz, self._dx = {}, {}, {}

    def forward(self, x, training=True):
        """``act(x @ weight + bias)`` into this layer's buffer for the batch size.

        Parameters
        ----------
        x : array, shape (n, in_features)
        training : bool, default True
            Unused (same computation in both modes); kept for a uniform interface.

        Returns
        -------
        array, shape (n, out_features)
        """
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (n, {self.in_features}), got {tuple(x.shape)}")
        y = self._buffer(self._out, x.shape[0], self.out_features, self.dtype)
        self.xp.matmul(x, self.weight, out=y)
        self.ops.bias_activation(y, self.bias, self.activation == "relu")
        self._x, self._y = x, y
        return y

    def backward(self, dy, input_grad=True):
        """Gradients of ``weight`` and ``bias`` (stored) and of the input (returned).

        Parameters
        ----------
        dy : array, shape (n, out_features)
        input_grad : bool, default True
            Compute ``dx``; the model's first layer skips it (its input is the data).

        Returns
        -------
        array or None
            ``dx``, shape (n, in_features), or None when ``input_grad`` is False.
        """
        if self._x is None:
            raise RuntimeError("backward() needs a preceding forward()")
        n = dy.shape[0]
        relu = self.activation == "relu"
        dz = self._buffer(self._dz, n, self.out_features, self.dtype) if relu else dy
        self.ops.activation_grad_bias(dy, self._y, relu, dz, self.bias_grad)
        self.xp.matmul(self._x.T, dz, out=self.weight_grad)
        if not input_grad:
            return None
        dx = self._buffer(self._dx, n, self.in_features, self.dtype)
        self.xp.matmul(dz, self.weight.T, out=dx)
        return dx


class ReLU(_Layer):
    """Rectified linear unit ``max(x, 0)`` as a layer.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.nn import ReLU, Sequential
    >>> Sequential([ReLU()]).forward(np.array([[-1.0, 2.0]], np.float32))
    array([[0., 2.]], dtype=float32)
    """

    def __init__(self):
        self._out, self._dx = {}, {}
        self._y = None

    def __repr__(self):
        return "ReLU()"

    def bind(self, xp, ops, params):
        """Attach to an array module (no parameters)."""
        super().bind(xp, ops, params)
        self._out, self._dx = {}, {}

    def forward(self, x, training=True):
        """``max(x, 0)`` into this layer's buffer.

        Parameters
        ----------
        x : array, shape (n, C)
        training : bool, default True
            Unused.

        Returns
        -------
        array, shape (n, C)
        """
        y = self._buffer(self._out, x.shape[0], x.shape[1], x.dtype)
        self.ops.relu(x, y)
        self._y = y
        return y

    def backward(self, dy, input_grad=True):
        """``dy * (y > 0)``.

        Parameters
        ----------
        dy : array, shape (n, C)
        input_grad : bool, default True
            When False nothing is computed (nothing before this layer).

        Returns
        -------
        array or None
        """
        if self._y is None:
            raise RuntimeError("backward() needs a preceding forward()")
        if not input_grad:
            return None
        dx = self._buffer(self._dx, dy.shape[0], dy.shape[1], dy.dtype)
        self.ops.relu_grad(dy, self._y, dx)
        return dx


class BatchNorm(_Layer):
    """BatchNorm over the features of ``(batch, features)`` inputs, on fastbn's kernels.

    A thin wrapper of :class:`fastbn.BatchNorm` (the layer of :mod:`fastbn.layer`) whose
    ``gamma``/``beta`` live in the model's flat parameter array.

    Parameters
    ----------
    num_features : int
    convention : {"keras", "torch"}, default "keras"
        ``"keras"``: ``keras.layers.BatchNormalization`` (momentum 0.99 weighing the *old*
        running value, epsilon 1e-3, biased moving variance). ``"torch"``:
        ``torch.nn.BatchNorm1d`` (momentum 0.1 weighing the *new* batch, eps 1e-5,
        unbiased running variance).
    momentum, eps : float, optional
        Override the convention's defaults; ``momentum`` keeps the convention's meaning.
    activation : {None, "relu"}, optional
        Fuse a ReLU after the normalization (one kernel forward, one backward).
    affine : bool, default True
        Learn ``gamma`` and ``beta`` (Keras's ``center=scale=True``); when False the layer
        has no parameters and normalizes only.
    dtype : numpy dtype, default float32
    renorm : bool, default False
        Batch renormalization (Keras's ``renorm``, default clipping and
        ``renorm_momentum``); its statistics join :meth:`state_dict`.
    virtual_batch_size : int, optional
        Ghost batches of this many samples (each training batch must be a multiple).

    Attributes
    ----------
    bn : fastbn.BatchNorm
        The wrapped layer (running statistics: ``bn.running_mean``, ``bn.running_var``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.nn import BatchNorm, Sequential
    >>> model = Sequential([BatchNorm(3)])
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (16, 3)).astype(np.float32)
    >>> y = model.forward(x, training=True)
    >>> bool(np.abs(y.mean(axis=0)).max() < 1e-5)
    True
    >>> model.layers[0].bn.momentum   # Keras momentum 0.99 == fastbn/PyTorch momentum 0.01
    0.010000000000000009
    """

    def __init__(
        self,
        num_features,
        *,
        convention="keras",
        momentum=None,
        eps=None,
        activation=None,
        affine=True,
        dtype=np.float32,
        renorm=False,
        virtual_batch_size=None,
    ):
        variants = dict(renorm=renorm, virtual_batch_size=virtual_batch_size)
        if convention == "keras":
            self.bn = _core_layer.BatchNorm.keras(
                num_features,
                axis=-1,
                momentum=0.99 if momentum is None else momentum,
                epsilon=1e-3 if eps is None else eps,
                center=bool(affine),
                scale=bool(affine),
                dtype=dtype,
                activation=activation,
                **variants,
            )
        elif convention == "torch":
            self.bn = _core_layer.BatchNorm(
                num_features,
                axis=1,
                momentum=0.1 if momentum is None else momentum,
                eps=1e-5 if eps is None else eps,
                affine=bool(affine),
                dtype=dtype,
                activation=activation,
                **variants,
            )
        else:
            raise ValueError(f"convention must be 'keras' or 'torch', got {convention!r}")
        self.convention = convention
        self.num_features = int(num_features)
        self.activation = activation
        self.affine = bool(affine)
        self.dtype = np.dtype(dtype)
        self.gamma_grad = self.beta_grad = None

    def __repr__(self):
        return (
            f"BatchNorm({self.num_features}, convention={self.convention!r}, "
            f"momentum={self.bn.momentum:.4g}, eps={self.bn.eps:g}, "
            f"activation={self.activation!r}"
            + ("" if self.affine else ", affine=False")
            + (", renorm=True" if self.bn.renorm else "")
            + (
                f", virtual_batch_size={self.bn.virtual_batch_size}"
                if self.bn.virtual_batch_size is not None
                else ""
            )
            + ")"
        )

    _STATS = ("running_mean", "running_var", "renorm_mean", "renorm_stddev", "running_stddev")

    def param_specs(self):
        """``[("gamma", ones), ("beta", zeros)]``, or ``[]`` when not affine."""
        if not self.affine:
            return []
        return [("gamma", np.ones(self.num_features)), ("beta", np.zeros(self.num_features))]

    def bind(self, xp, ops, params):
        """Point the wrapped layer's ``gamma``/``beta`` at the model's views."""
        super().bind(xp, ops, params)
        if self.affine:
            self.bn.gamma, self.gamma_grad = params["gamma"].value, params["gamma"].grad
            self.bn.beta, self.beta_grad = params["beta"].value, params["beta"].grad
        if xp is not np:
            for key in self._STATS:
                if getattr(self.bn, key) is not None:
                    setattr(self.bn, key, xp.asarray(getattr(self.bn, key)))

    @property
    def gamma(self):
        """array or None: The scale (a view into the model's parameters; None if not affine)."""
        return self.bn.gamma

    @property
    def beta(self):
        """array or None: The shift (a view into the model's parameters; None if not affine)."""
        return self.bn.beta

    def forward(self, x, training=True):
        """Batch statistics (and a running-statistics update) in training, else running ones.

        Parameters
        ----------
        x : array, shape (n, num_features)
        training : bool, default True

        Returns
        -------
        array, shape (n, num_features)
        """
        return self.bn.forward(x, training=training)

    def backward(self, dy, input_grad=True):
        """``dx``, and ``dgamma``/``dbeta`` copied into the model's gradient array.

        Parameters
        ----------
        dy : array, shape (n, num_features)
        input_grad : bool, default True
            Accepted for a uniform interface; ``dx`` is always computed.

        Returns
        -------
        array
        """
        dx = self.bn.backward(dy)
        if self.affine:
            self.gamma_grad[...] = self.bn.dgamma
            self.beta_grad[...] = self.bn.dbeta
        return dx if input_grad else None

    def state_dict(self):
        """Running statistics.

        ``running_mean``, ``running_var`` (host copies), with ``renorm`` also
        ``renorm_mean``, ``renorm_stddev`` and ``running_stddev``, and
        ``num_batches_tracked``.
        """
        state = {
            key: np.array(_device.to_host(getattr(self.bn, key)))
            for key in self._STATS
            if getattr(self.bn, key) is not None
        }
        state["num_batches_tracked"] = np.asarray(self.bn.num_batches_tracked, np.int64)
        return state

    def load_state_dict(self, state):
        """Load what :meth:`state_dict` returned (in place, any device)."""
        keys = [key for key in self._STATS if getattr(self.bn, key) is not None]
        for key in keys:
            value = np.asarray(state[key])
            if value.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), got {value.shape}")
        for key in keys:
            getattr(self.bn, key)[...] = self.xp.asarray(np.asarray(state[key]))
        self.bn.num_batches_tracked = int(state["num_batches_tracked"])


class Sequential:
    """A stack of layers with forward, backward and one flat parameter array.

    Parameters
    ----------
    layers : sequence of layers
        :class:`Dense`, :class:`ReLU`, :class:`BatchNorm` (or anything with ``forward``,
        ``backward``, ``param_specs`` and ``bind``). All parameters must share one dtype.
    device : {"cpu", "cuda"}, default "cpu"
        Where the model lives (NumPy or CuPy arrays).

    Attributes
    ----------
    layers : list
    store : ParameterStore
        ``store.values`` / ``store.grads``: every parameter / gradient, flat.
    xp : module

    Examples
    --------
    >>> import numpy as np
    >>> from fastbn.nn import Dense, BatchNorm, Sequential
    >>> model = Sequential([Dense(5, 4, activation="relu", rng=0), BatchNorm(4),
    ...                     Dense(4, 2, rng=1)])
    >>> x = np.random.default_rng(2).random((8, 5), dtype=np.float32)
    >>> logits = model.forward(x, training=True)
    >>> model.backward(np.ones_like(logits)) is None   # no gradient for the data
    True
    >>> [p.name for p in model.parameters()][:3]
    ['layers.0.weight', 'layers.0.bias', 'layers.1.gamma']
    """

    def __init__(self, layers, device="cpu"):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("layers must not be empty")
        self.device = device
        self.xp = _device.array_module(device)
        self.ops = _ops.ops_for(self.xp)
        specs, owners = [], []
        dtypes = {np.dtype(layer.dtype) for layer in self.layers if hasattr(layer, "dtype")}
        if len(dtypes) > 1:
            raise ValueError(f"all layers must share one dtype, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        for i, layer in enumerate(self.layers):
            for name, init in layer.param_specs():
                specs.append((f"layers.{i}.{name}", init))
                owners.append((i, name))
        self.store = ParameterStore(specs, self.xp, self.dtype)
        per_layer = [{} for _ in self.layers]
        for (i, name), param in zip(owners, self.store.parameters):
            per_layer[i][name] = param
        for layer, params in zip(self.layers, per_layer):
            layer.bind(self.xp, self.ops, params)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner}\n], device={self.device!r})"

    def parameters(self):
        """The trainable parameters, in layer order.

        Returns
        -------
        list of Parameter
        """
        return list(self.store.parameters)

    def forward(self, x, training=True):
        """Run every layer.

        Parameters
        ----------
        x : array, shape (n, features)
            On the model's device, of the model's dtype.
        training : bool, default True
            BatchNorm uses batch statistics and updates its running ones when True.

        Returns
        -------
        array
            The last layer's output buffer (overwritten by the next call).
        """
        for layer in self.layers:
            x = layer.forward(x, training=training)
        return x

    __call__ = forward

    def backward(self, dy, input_grad=False):
        """Back-propagate ``dy`` through every layer, filling ``store.grads``.

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last forward's output.
        input_grad : bool, default False
            Also return the gradient with respect to the model's input (the first layer
            skips that matrix product otherwise).

        Returns
        -------
        array or None
        """
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            dy = self.layers[i].backward(dy, input_grad=(i > 0 or input_grad))
        return dy

    def predict(self, x, batch_size=2048):
        """Logits in evaluation mode (running statistics), as a new array.

        Parameters
        ----------
        x : array, shape (n, features)
        batch_size : int, default 2048

        Returns
        -------
        array, shape (n, outputs)
        """
        outputs = []
        for start in range(0, x.shape[0], batch_size):
            outputs.append(self.forward(x[start : start + batch_size], training=False).copy())
        return self.xp.concatenate(outputs)

    def state_dict(self):
        """Host copies of the parameters (by name) and of BatchNorm running statistics.

        Returns
        -------
        dict of str to numpy.ndarray
            ``layers.<i>.weight`` etc., and ``layers.<i>.running_mean``,
            ``layers.<i>.running_var``, ``layers.<i>.num_batches_tracked``.
        """
        state = {p.name: np.array(_device.to_host(p.value)) for p in self.store}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, BatchNorm):
                for key, value in layer.state_dict().items():
                    state[f"layers.{i}.{key}"] = value
        return state

    def load_state_dict(self, state):
        """Load a :meth:`state_dict` in place; checks names and shapes first.

        Parameters
        ----------
        state : mapping of str to array

        Raises
        ------
        KeyError
            Missing or unexpected entries.
        ValueError
            A shape mismatch.
        """
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"state_dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        for p in self.store:
            if tuple(np.shape(state[p.name])) != tuple(p.value.shape):
                raise ValueError(
                    f"{p.name} must have shape {tuple(p.value.shape)}, "
                    f"got {tuple(np.shape(state[p.name]))}"
                )
        bn_layers = [
            (i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, BatchNorm)
        ]
        for i, layer in bn_layers:
            for key in ("running_mean", "running_var"):
                shape = tuple(np.shape(state[f"layers.{i}.{key}"]))
                if shape != (layer.num_features,):
                    raise ValueError(
                        f"layers.{i}.{key} must have shape ({layer.num_features},), got {shape}"
                    )
        for i, layer in bn_layers:
            layer.load_state_dict({k: state[f"layers.{i}.{k}"] for k in layer.state_dict()})
        for p in self.store:
            p.value[...] = self.xp.asarray(np.asarray(state[p.name], dtype=self.dtype))
