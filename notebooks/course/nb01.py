"""Checks for notebook 01 (the unified p-sparse view)."""

from __future__ import annotations

from . import check_equal, check_number


def _row(rows, method):
    return next(r for r in rows if r["method"] == method)


def check_exercise_1(answer, rows) -> None:
    """Random's per-tensor budget Σ_t ⌊p·numel_t⌋."""
    return check_number(1, answer, _row(rows, "random")["budget"], rtol=0, atol=0.5, what="your budget",
                        hint="floor each tensor's p·numel before summing, over the backbone only (not the head)")


def check_exercise_2(answer, rows) -> None:
    """LoRA's equivalent sparsity added / m."""
    lora = _row(rows, "lora")
    return check_number(2, answer, lora["budget"] / lora["m"], rtol=1e-6, what="your p",
                        hint="r·(d_in + d_out) per adapted Linear, two per layer, divided by m (a fraction, not %)")


def check_exercise_3(answer, rows) -> None:
    """The methods that end below their budget."""
    expected = {r["method"] for r in rows if r["after"] < r["budget"]}
    return check_equal(3, answer, expected, normalize=lambda s: {str(x).lower() for x in s},
                       what="your set", hint="compare r['after'] with r['budget'] in each row")
