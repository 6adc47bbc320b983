"""Optimizers: Adam and SGD with momentum, one fused kernel call per step.

Given a model's :class:`~fastbn.nn.ParameterStore` (``model.store``), an optimizer updates
every parameter of the model with one kernel call over the flat parameter array. Given
a list of :class:`~fastbn.nn.Parameter` (or ``(value, grad)`` pairs) it loops over them.
"""

import numpy as np

from . import _device, _ops
from .layers import ParameterStore

__all__ = ["Adam", "SGD"]


class _Optimizer:
    """Common part: the flat ``(value, grad)`` groups and their per-element state."""

    _STATE_NAMES = ()

    def __init__(self, parameters):
        if isinstance(parameters, ParameterStore):
            groups = [(parameters.values, parameters.grads)]
        else:
            groups = []
            for i, p in enumerate(parameters):
                value, grad = (p.value, p.grad) if hasattr(p, "value") else p
                if grad is None or tuple(grad.shape) != tuple(value.shape):
                    raise ValueError(
                        f"parameters[{i}]: grad must be an array of the value's "
                        f"shape {tuple(value.shape)}"
                    )
                if not (value.flags.c_contiguous and grad.flags.c_contiguous):
                    raise ValueError(f"parameters[{i}]: value and grad must be C-contiguous")
                groups.append((value.reshape(-1), grad.reshape(-1)))
        if not groups:
            raise ValueError("parameters must not be empty")
        self._groups = groups
        self._xp = _device.module_of(groups[0][0])
        self._ops = _ops.ops_for(self._xp)
        self.state = {
            name: [self._xp.zeros_like(v) for v, _ in groups] for name in self._STATE_NAMES
        }
        self.t = 0

    def zero_grad(self):
        """Set every gradient to zero (layers overwrite theirs, so training needs no call)."""
        for _, grad in self._groups:
            grad[...] = 0

    def state_dict(self):
        """Host copies of the optimizer's state.

        Returns
        -------
        dict
            ``"t"`` (steps taken) and ``"<state>.<group>"`` arrays.
        """
        out = {"t": np.asarray(self.t, np.int64)}
        for name, arrays in self.state.items():
            for i, a in enumerate(arrays):
                out[f"{name}.{i}"] = np.array(_device.to_host(a))
        return out

    def load_state_dict(self, state):
        """Load what :meth:`state_dict` returned; checks every entry first.

        Parameters
        ----------
        state : mapping

        Raises
        ------
        KeyError
            A missing entry.
        ValueError
            A shape mismatch.
        """
        for name, arrays in self.state.items():
            for i, a in enumerate(arrays):
                key = f"{name}.{i}"
                if key not in state:
                    raise KeyError(f"optimizer state_dict lacks {key!r}")
                if tuple(np.shape(state[key])) != tuple(a.shape):
                    raise ValueError(
                        f"optimizer state {key!r} must have shape "
                        f"{tuple(a.shape)}, got {tuple(np.shape(state[key]))}"
                    )
        if "t" not in state:
            raise KeyError("optimizer state_dict lacks 't'")
        for name, arrays in self.state.items():
            for i, a in enumerate(arrays):
                a[...] = self._xp.asarray(np.asarray(state[f"{name}.{i}"], dtype=a.dtype))
        self.t = int(state["t"])


class Adam(_Optimizer):
    """Adam (Kingma & Ba), with Keras's or PyTorch's placement of epsilon.

    Per step ``t``: ``m += (1-beta1)(g-m)``, ``v += (1-beta2)(g^2-v)``, and

    - ``convention="keras"`` (``keras.optimizers.Adam``, epsilon 1e-7):
      ``p -= lr * sqrt(1-beta2^t)/(1-beta1^t) * m / (sqrt(v) + eps)``;
    - ``convention="torch"`` (``torch.optim.Adam``, eps 1e-8):
      ``p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)``.

    They differ only in where ``eps`` sits; the kernel takes the folded constants.

    Parameters
    ----------
    parameters : ParameterStore or sequence of Parameter or (value, grad)
        ``model.store`` for one fused update of the whole model.
    lr : float, default 1e-3
    beta1, beta2 : float, default 0.9, 0.999
    eps : float, optional
        Defaults to 1e-7 (Keras) or 1e-8 (PyTorch).
    convention : {"keras", "torch"}, default "keras"

    Examples
    --------
    >>> import numpy as np
    >>> p, g = np.array([1.0, -1.0], np.float32), np.array([0.5, -2.0], np.float32)
    >>> opt = Adam([(p, g)], lr=0.1)
    >>> opt.step()
    >>> p.round(4)   # the first Adam step moves each parameter by ~lr against its gradient
    array([ 0.9, -0.9], dtype=float32)
    """

    _STATE_NAMES = ("m", "v")

    def __init__(self, parameters, lr=1e-3, beta1=0.9, beta2=0.999, eps=None, convention="keras"):
        if convention not in ("keras", "torch"):
            raise ValueError(f"convention must be 'keras' or 'torch', got {convention!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        for arg, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{arg} must lie in [0, 1), got {value}")
        eps = (1e-7 if convention == "keras" else 1e-8) if eps is None else eps
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(parameters)
        self.lr, self.beta1, self.beta2, self.eps = (
            float(lr),
            float(beta1),
            float(beta2),
            float(eps),
        )
        self.convention = convention

    def step(self):
        """Update every parameter from its gradient."""
        self.t += 1
        bc1 = 1.0 - self.beta1**self.t
        bc2_sqrt = np.sqrt(1.0 - self.beta2**self.t)
        alpha = self.lr * bc2_sqrt / bc1
        eps_hat = self.eps if self.convention == "keras" else self.eps * bc2_sqrt
        for (value, grad), m, v in zip(self._groups, self.state["m"], self.state["v"]):
            self._ops.adam(value, grad, m, v, alpha, self.beta1, self.beta2, eps_hat)


class SGD(_Optimizer):
    """Stochastic gradient descent with momentum (PyTorch's form).

    ``velocity = momentum * velocity + g``; ``p -= lr * velocity`` (or, with Nesterov,
    ``p -= lr * (g + momentum * velocity)``). With a constant learning rate this equals
    Keras's ``SGD(momentum=...)``.

    Parameters
    ----------
    parameters : ParameterStore or sequence of Parameter or (value, grad)
    lr : float, default 0.01
    momentum : float, default 0.9
    nesterov : bool, default False

    Examples
    --------
    >>> import numpy as np
    >>> p, g = np.array([1.0]), np.array([2.0])
    >>> opt = SGD([(p, g)], lr=0.1, momentum=0.9)
    >>> opt.step(); opt.step()
    >>> p.round(12)  # 1 - 0.1*2 - 0.1*(0.9*2 + 2)
    array([0.42])
    """

    _STATE_NAMES = ("velocity",)

    def __init__(self, parameters, lr=0.01, momentum=0.9, nesterov=False):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(parameters)
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)

    def step(self):
        """Update every parameter from its gradient."""
        self.t += 1
        for (value, grad), velocity in zip(self._groups, self.state["velocity"]):
            self._ops.sgd(value, grad, velocity, self.lr, self.momentum, self.nesterov)
