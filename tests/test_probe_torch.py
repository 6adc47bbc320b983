"""fastbn.torch against PyTorch's own expectations, found by an adversarial probe (each
test failed before its fix): the exception types of PyTorch's test_nn BatchNorm tests,
a non-bool ``training``, and a module call that raises leaving ``num_batches_tracked``."""

import pytest

torch = pytest.importorskip("torch")

import fastbn.torch as fbt  # noqa: E402

# --------------------------------------------------------------------------------------
# test_nn.py's test_batchnorm_raises_error_if_*_is_not_same_size_as_input: RuntimeError
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_wrong_sizes_raise_what_pytorch_raises(wrong, size, training):
    """PyTorch's tests catch RuntimeError for these; fastbn's contract says ValueError:
    the error is both (a ValueError subclass that is also a RuntimeError)."""
    args = {k: torch.rand(10) for k in ("running_mean", "running_var", "weight", "bias")}
    args[wrong] = torch.rand(size)
    x = torch.rand(2, 10)
    for f in (torch.nn.functional.batch_norm, fbt.batch_norm):
        with pytest.raises(RuntimeError):
            f(x, training=training, **args)
    with pytest.raises(ValueError, match=rf"{wrong} must have shape \(10,\).*got \({size},\)"):
        fbt.batch_norm(x, training=training, **args)


def test_module_with_wrong_channels_raises_runtime_error_too():
    for cls in (torch.nn.BatchNorm2d, fbt.BatchNorm2d):
        for mode in (True, False):
            with pytest.raises(RuntimeError):
                cls(3).train(mode)(torch.randn(2, 4, 3, 3))


def test_eval_without_running_statistics_raises_runtime_error_too():
    x = torch.randn(4, 3)
    for f in (torch.nn.functional.batch_norm, fbt.batch_norm):
        with pytest.raises(RuntimeError):
            f(x, None, None, training=False)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        fbt.batch_norm(x, None, None, training=False)


@pytest.mark.parametrize("shape", [(3,), ()])
def test_input_of_fewer_than_two_dimensions_raises_runtime_error_too(shape):
    x, rm, rv = torch.randn(shape), torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(x, rm, rv)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fbt.batch_norm(x, rm, rv)
    with pytest.raises(RuntimeError):
        fbt.batch_norm(x, rm, rv)


# --------------------------------------------------------------------------------------
# training must be a bool (torch: TypeError)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", ["False", 1, None])
def test_training_must_be_a_bool(training):
    """``training="False"`` trained and updated the running statistics."""
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError):
        torch.nn.functional.batch_norm(x, rm, rv, training=training)
    with pytest.raises(TypeError, match="training must be a bool"):
        fbt.batch_norm(x, rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


# --------------------------------------------------------------------------------------
# A module call that raises leaves the module's state as it was
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bad", ["one value per channel", "non-finite"])
def test_module_call_that_raises_leaves_num_batches_tracked(bad, momentum):
    """num_batches_tracked was incremented before the call that raised (torch's order),
    so with ``momentum=None`` the refused batch still counted in the cumulative average
    of every later batch."""
    x = torch.randn(1, 3) if bad == "one value per channel" else torch.full((4, 3), torch.nan)
    bn = fbt.BatchNorm1d(3, momentum=momentum)
    with pytest.raises((ValueError, FloatingPointError)):
        bn(x)
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))
    # the cumulative average is that of the batches taken
    batches = [torch.randn(8, 3) * (i + 1) for i in range(2)]
    for b in batches:
        bn(b)
    if momentum is None:
        expected = torch.stack([b.mean(0) for b in batches]).mean(0)
        torch.testing.assert_close(bn.running_mean, expected)
    assert bn.num_batches_tracked.item() == 2


def test_module_counts_like_pytorch_on_success():
    """The count and the momentum=None factor as torch's modules (empty batches too)."""
    ours, theirs = fbt.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for x in (torch.randn(4, 3, 2, 2), torch.randn(0, 3, 2, 2), torch.randn(2, 3, 5, 5)):
        torch.testing.assert_close(ours(x), theirs(x))
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


# --------------------------------------------------------------------------------------
# fastbn.BatchNorm given PyTorch CPU tensors: tensors back, in every mode
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_layer_returns_tensors_for_tensors_in_every_mode(training):
    """The layer gave a NumPy array back for a tensor in training and a tensor in eval
    mode (its eval path goes through batch_norm_inference); DESIGN.md: results come
    back as the caller's kind of array, PyTorch CPU tensors as tensors."""
    import numpy as np

    import fastbn

    x, dy = torch.randn(8, 3, 5), torch.randn(8, 3, 5)
    ours, twin = fastbn.BatchNorm(3), fastbn.BatchNorm(3)
    y = ours.forward(x, training=training)
    expected = twin.forward(x.numpy(), training=training)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), expected)
    dx = ours.backward(dy)
    assert isinstance(dx, torch.Tensor)
    np.testing.assert_array_equal(dx.numpy(), twin.backward(dy.numpy()))
    np.testing.assert_array_equal(ours.dgamma, twin.dgamma)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_gives_pytorchs_message(shape):
    """Code written for torch.nn matches on this message (e.g. to suggest drop_last);
    fastbn.torch gave its own ("training needs more than 1 value per channel")."""
    x = torch.randn(shape)
    with pytest.raises(ValueError) as theirs:
        torch.nn.functional.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError) as ours:
        fbt.batch_norm(x, None, None, training=True)
    assert str(ours.value) == str(theirs.value)
    cls = {2: fbt.BatchNorm1d, 3: fbt.BatchNorm1d, 4: fbt.BatchNorm2d}[len(shape)]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        cls(3)(x)
