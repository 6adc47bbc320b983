"""Loss and accuracy curves of one or more training runs (matplotlib, imported lazily)."""

from .._install import install_hint

__all__ = ["plot_histories"]


def plot_histories(histories, path, title=None):
    """Plot loss and accuracy per epoch (train dashed, test solid) and save the figure.

    Parameters
    ----------
    histories : mapping of str to (History or dict or list of dict)
        Label to run; a run is a :class:`~fastbn.nn.History`, a ``{"epochs": [...]}``
        dict, or the list of per-epoch records itself.
    path : str or os.PathLike
        Output image (format from the extension, e.g. ``.png``).
    title : str, optional

    Raises
    ------
    RuntimeError
        matplotlib is not installed (the message says how to get it).

    Examples
    --------
    >>> import os, tempfile
    >>> runs = {"a": [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5,
    ...                "test_acc": 0.4}]}
    >>> path = os.path.join(tempfile.mkdtemp(), "c.png")
    >>> plot_histories(runs, path)
    >>> os.path.getsize(path) > 0
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(f"plotting needs matplotlib: {install_hint('plot')} ({exc})") from exc
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, run) in enumerate(histories.items()):
        records = run.epochs if hasattr(run, "epochs") else run
        if isinstance(records, dict):
            records = records["epochs"]
        epochs = [r["epoch"] for r in records]
        color = colors[i % len(colors)]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(
                epochs,
                [r[f"train_{key}"] for r in records],
                "--",
                color=color,
                label=f"{label} train",
            )
            ax.plot(
                epochs,
                [r[f"test_{key}"] for r in records],
                "-o",
                color=color,
                markersize=3,
                label=f"{label} test",
            )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
