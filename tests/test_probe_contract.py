"""Contract breaks found by an adversarial probe of the public API and the layer (each
test failed before its fix): flags that must be bools, and a call that raises leaving
the layer exactly as it was, its saved forward included."""

import numpy as np
import pytest
import reference as ref
from helpers import assert_close

import fastbn


def rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------
# training= must be a bool (torch.nn.functional.batch_norm: TypeError), never truthiness
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", ["False", "True", 1, 0, 1.0, None])
def test_batch_norm_training_must_be_a_bool(training):
    """``training="False"`` trained and updated the running statistics (truthiness)."""
    x = rand((6, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="training must be a bool"):
        fastbn.batch_norm(x, rm, rv, training=training)
    assert (rm == 0).all() and (rv == 1).all()


def test_batch_norm_training_takes_numpy_bools():
    x = rand((6, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = fastbn.batch_norm(x, rm, rv, training=np.True_)
    assert_close(y, ref.forward(x)[0], 1e-5, 1e-5)
    assert (rm != 0).all()
    y = fastbn.batch_norm(x, rm, rv, training=np.False_)
    assert_close(y, ref.inference(x, rm, rv), 1e-5, 1e-5)


@pytest.mark.parametrize("training", ["False", 1, 0.0])
def test_layer_forward_training_must_be_a_bool_or_none(training):
    bn = fastbn.BatchNorm(3)
    with pytest.raises(TypeError, match="training must be a bool or None"):
        bn.forward(rand((6, 3)), training=training)
    assert bn.num_batches_tracked == 0 and (bn.running_mean == 0).all()


# --------------------------------------------------------------------------------------
# The layer: a forward that raises leaves the saved forward (what backward differentiates)
# --------------------------------------------------------------------------------------

BAD_INPUTS = {
    "wrong channels": rand((8, 3, 5)),
    "non-finite": np.full((8, 4, 5), np.nan, np.float32),
    "int dtype": np.ones((8, 4, 5), np.int32),
    "one value per channel": rand((1, 4, 1)),
}


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=str)
@pytest.mark.parametrize("mode", ["masked", "training", "eval"])
def test_layer_failed_forward_keeps_the_saved_forward(mode, bad):
    """A masked forward, then a forward that raises: the backward gave the *unmasked*
    gradient (the failed call had cleared the saved mask); after an eval-mode forward it
    raised "backward() needs a preceding forward" (the failed call had cleared it)."""
    x, dy = rand((8, 4, 5), 1), rand((8, 4, 5), 2)
    mask = np.random.default_rng(3).random((8, 5)) > 0.3
    kwargs = {"mask": mask} if mode == "masked" else {}
    training = mode != "eval"
    bn, twin = fastbn.BatchNorm(4), fastbn.BatchNorm(4)
    bn.forward(x, training=training, **kwargs)
    twin.forward(x, training=training, **kwargs)
    if mode == "eval" and bad in ("non-finite", "one value per channel"):
        pytest.skip("not an error with the running statistics")
    with pytest.raises((ValueError, TypeError, FloatingPointError)):
        bn.forward(BAD_INPUTS[bad], training=training)
    np.testing.assert_array_equal(bn.backward(dy), twin.backward(dy))
    np.testing.assert_array_equal(bn.dgamma, twin.dgamma)
    np.testing.assert_array_equal(bn.dbeta, twin.dbeta)
    for key, value in twin.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)


# --------------------------------------------------------------------------------------
# The layer's own running statistics replaced by the user
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, error, match",
    [
        (np.zeros(5, np.float32), ValueError, r"running_mean must have shape \(4,\)"),
        ([0.0] * 4, TypeError, "running_mean must be an array of shape"),
        (np.zeros(4, np.int64), TypeError, "running_mean must be a float array"),
    ],
    ids=["wrong shape", "list", "int"],
)
def test_layer_replaced_running_stats_are_checked(value, error, match):
    """A running_mean of the wrong shape was a NumPy broadcasting error ("could not
    broadcast input array") and a list an AttributeError, neither naming it."""
    bn = fastbn.BatchNorm(4)
    bn.running_mean = value
    for x in (rand((8, 4, 5)), rand((8, 4, 5)).astype(np.float16)):  # direct, general path
        with pytest.raises(error, match=match):
            bn.forward(x, training=True)
        assert bn.num_batches_tracked == 0 and (bn.running_var == 1).all()


def test_layer_read_only_running_stats_are_named():
    bn = fastbn.BatchNorm(4)
    bn.running_mean.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean must be writable"):
        bn.forward(rand((8, 4, 5)), training=True)
    assert bn.num_batches_tracked == 0 and (bn.running_var == 1).all()


# --------------------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [None, [("gamma", np.ones(3))], "gamma"], ids=repr)
def test_load_state_dict_of_a_non_mapping_names_it(state):
    """``load_state_dict(None)`` said "'NoneType' object is not iterable"."""
    bn = fastbn.BatchNorm(3)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        bn.load_state_dict(state)


def test_load_state_dict_takes_tensors_that_require_grad_and_bfloat16():
    """A dict of parameters (``requires_grad``) or of bfloat16 tensors was a TypeError
    ("Can't call numpy() on Tensor that requires grad")."""
    torch = pytest.importorskip("torch")
    bn = fastbn.BatchNorm(3)
    state = {k: torch.as_tensor(v) for k, v in bn.state_dict().items()}
    state["gamma"] = torch.full((3,), 2.0, requires_grad=True)
    state["beta"] = torch.full((3,), 0.5, dtype=torch.bfloat16)
    bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.gamma, np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(bn.beta, np.full(3, 0.5, np.float32))


# --------------------------------------------------------------------------------------
# Arguments that are not arrays, flags that are not bools
# --------------------------------------------------------------------------------------

CALLS = {
    "batch_norm_forward": lambda x: fastbn.batch_norm_forward(x),
    "batch_norm_inference": lambda x: fastbn.batch_norm_inference(x, np.zeros(2), np.ones(2)),
    "batch_norm": lambda x: fastbn.batch_norm(x, training=True),
    "batch_norm_backward dy": lambda x: fastbn.batch_norm_backward(
        x, np.ones((3, 2)), np.zeros(2), np.ones(2)
    ),
    "batch_norm_backward x": lambda x: fastbn.batch_norm_backward(
        np.ones((3, 2)), x, np.zeros(2), np.ones(2)
    ),
    "BatchNorm.forward": lambda x: fastbn.BatchNorm(2).forward(x, training=True),
    "BatchNorm.forward eval": lambda x: fastbn.BatchNorm(2).forward(x, training=False),
}


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_none_as_input_is_a_type_error_naming_it(call):
    """``x=None`` was an AttributeError ("'NoneType' object has no attribute 'dtype'")."""
    with pytest.raises(TypeError, match=r"(x|dy) must be an array, got None"):
        CALLS[call](None)


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_ragged_list_is_a_type_error_naming_it(call):
    """A ragged list was NumPy's ValueError ("setting an array element with a
    sequence"), which names no argument."""
    with pytest.raises(TypeError, match=r"(x|dy) must be an array"):
        CALLS[call]([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("value", ["no", 1, None])
def test_running_var_unbiased_must_be_a_bool(value):
    """``running_var_unbiased="no"`` was taken as True."""
    x, rm, rv = rand((6, 3)), np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="running_var_unbiased must be a bool"):
        fastbn.batch_norm(x, rm, rv, training=True, running_var_unbiased=value)
    assert (rm == 0).all() and (rv == 1).all()


@pytest.mark.parametrize("value", ["no", 1, None])
def test_residual_grad_must_be_a_bool(value):
    """``residual_grad="no"`` returned a fourth result (truthiness)."""
    x = rand((6, 3))
    _, mean, invstd = fastbn.batch_norm_forward(x)
    out = np.zeros_like(x)
    with pytest.raises(TypeError, match="residual_grad must be a bool"):
        fastbn.batch_norm_backward(x, x, mean, invstd, residual_grad=value, out=out)
    assert (out == 0).all()


# --------------------------------------------------------------------------------------
# Destinations that overlap themselves (a stride of 0 on an axis of length > 1)
# --------------------------------------------------------------------------------------


def _stride0(shape, dtype=np.float32, fill=7.0):
    """A writable array whose first axis has stride 0: every row is one row."""
    row = np.full(shape[1:], fill, dtype)
    return np.lib.stride_tricks.as_strided(row, shape=shape, strides=(0,) + row.strides)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, out: fastbn.batch_norm_forward(x, out=out),
        lambda x, out: fastbn.batch_norm_inference(x, np.zeros(3), np.ones(3), out=out),
        lambda x, out: fastbn.batch_norm(x, np.zeros(3), np.ones(3), training=True, out=out),
        lambda x, out: fastbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), out=out),
    ],
    ids=["forward", "inference", "batch_norm", "backward"],
)
def test_self_overlapping_out_is_refused(call):
    """A writable ``out`` with a stride of 0 took the rows' results one over the other
    (the last row's values everywhere), silently; PyTorch refuses such an ``out``."""
    x = rand((6, 3))
    out = _stride0((6, 3))
    with pytest.raises(ValueError, match="out must not overlap itself"):
        call(x, out)
    assert (out == 7).all()


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_self_overlapping_running_statistics_are_refused(which):
    """A running_mean of stride 0 (``as_strided``; a PyTorch ``expand``) took every
    channel's update in one element, silently."""
    x = rand((6, 3))
    running = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    running[which] = _stride0((3,), fill=0.5)
    before = {k: v.copy() for k, v in running.items()}
    with pytest.raises(ValueError, match=f"{which} must not overlap itself"):
        fastbn.batch_norm(x, training=True, **running)
    for k, v in running.items():
        np.testing.assert_array_equal(v, before[k])


def test_empty_and_length_one_axes_may_have_stride_zero():
    """NumPy gives empty arrays strides of 0: not an overlap."""
    x = np.zeros((0, 3), np.float32)
    out = np.lib.stride_tricks.as_strided(np.zeros(3, np.float32), (0, 3), (0, 4))
    assert fastbn.batch_norm_forward(x, out=out)[0] is out
    x = rand((1, 3, 4))
    out = np.lib.stride_tricks.as_strided(np.zeros(12, np.float32), (1, 3, 4), (0, 16, 4))
    y, _, _ = fastbn.batch_norm_forward(x, out=out)
    assert_close(y, ref.forward(x)[0], 1e-5, 1e-5)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(6, 4), (300, 4, 50)])
def test_out_sharing_memory_with_running_statistics_is_refused(shape, which):
    """``out`` holding ``running_mean`` (or ``running_var``): both are results of the
    call, and one overwrote the other (the running mean came back as outputs)."""
    x = rand(shape)
    out = np.full(shape, 7.0, np.float32)
    running = {"running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32)}
    running[which] = out.reshape(-1)[-4:]
    with pytest.raises(ValueError, match=f"out must not share memory with {which}"):
        fastbn.batch_norm(x, training=True, out=out, **running)
    assert (out == 7).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_batches_tracked": -1}, ValueError, "num_batches_tracked must be an integer >= 0"),
        ({"num_batches_tracked": "3"}, TypeError, "num_batches_tracked must be an integer"),
        ({"num_batches_tracked": 1.5}, ValueError, "num_batches_tracked must be an integer"),
    ],
    ids=["nbt -1", "nbt str", "nbt 1.5"],
)
def test_batch_norm_checks_num_batches_tracked_in_eval_mode_too(kwargs, error, match):
    """docs/api.md: num_batches_tracked is "checked whenever it is given"; with
    ``training=False`` it was not checked at all. (momentum and on_nonfinite are not
    read in eval mode, as in PyTorch: tests/test_contract.py's sweep takes a bad
    momentum there for a valid call.)"""
    x = rand((6, 3))
    with pytest.raises(error, match=match):
        fastbn.batch_norm(x, np.zeros(3), np.ones(3), training=False, **kwargs)
