"""Text formatting shared by the benchmark tools: durations, ratios, shapes, tables.

Imported by :mod:`benchmarks.render` and :mod:`benchmarks.interleaved` (which therefore
do not import each other for it); imports nothing of the suite.

Examples
--------
>>> format_time(1.234e-5), format_pct(0.5), format_ratio(1.5), format_shape((2, 3))
('12.3 us', '50%', '1.50x', '2x3')
"""

from __future__ import annotations


def format_time(seconds):
    """Format a duration with a unit that keeps 3-4 significant digits.

    Parameters
    ----------
    seconds : float or None
        The duration.

    Returns
    -------
    str
        E.g. ``"12.3 ms"``, ``"45.6 us"``; ``"-"`` for ``None``.
    """
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return (
                f"{seconds / scale:.3g} {unit}"
                if seconds / scale < 100
                else f"{seconds / scale:.0f} {unit}"
            )
    return f"{seconds * 1e9:.0f} ns"


def format_pct(fraction):
    """Format a fraction as a percentage, ``"-"`` for ``None``.

    Examples
    --------
    >>> format_pct(0.257), format_pct(None)
    ('26%', '-')
    """
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def format_ratio(ratio):
    """Format a speed-up as ``"1.23x"``, ``"-"`` for ``None``.

    Examples
    --------
    >>> format_ratio(1.234), format_ratio(None)
    ('1.23x', '-')
    """
    return "-" if ratio is None else f"{ratio:.2f}x"


def format_shape(shape):
    """Format a shape as ``"32x64x56x56"``.

    Examples
    --------
    >>> format_shape([32, 64, 56, 56])
    '32x64x56x56'
    """
    return "x".join(map(str, shape))


def table(headers, body, markdown=True):
    """Lay out a table as Markdown or as aligned plain text.

    Parameters
    ----------
    headers : list of str
        Column titles; a title starting with ``>`` is right-aligned (the ``>`` is dropped).
    body : list of list of str
        The cells.
    markdown : bool, optional
        Markdown pipe table (default) or space-aligned text for a terminal.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    right = [h.startswith(">") for h in headers]
    headers = [h.lstrip(">") for h in headers]
    if markdown:
        lines = [
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---:" if r else "---" for r in right) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *body)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)
        )

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in body])
