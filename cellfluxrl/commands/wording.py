"""Small wording helpers for the lines the commands print (a count with its noun in agreement)."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: ``count(1, "image")`` -> ``"1 image"``, ``count(3, "image")`` ->
    ``"3 images"``; ``plural`` for an irregular noun (``count(2, "class", "classes")``).

    Args:
        n: the count (an int; thousands are not grouped).
        noun: the singular noun.
        plural: the plural (default ``noun + "s"``).
    """
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
