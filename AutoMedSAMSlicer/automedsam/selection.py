"""Parsing slice selections such as ``10:40``, ``0::3`` or ``3,7,12`` (k indices of a volume)."""

from __future__ import annotations

from .errors import InvalidInputError


def parse_slices(spec: str | None, num_slices: int, what: str = "--slices") -> list[int]:
    """Slice indices k from a Python-style ``start:stop[:step]`` (negative values count from the
    end, as in Python) or a comma list; ``None`` or ``""`` means all slices.

    Raises:
        InvalidInputError: malformed text, indices out of ``0..num_slices-1``, or an empty selection.
    """
    if spec is None or not spec.strip():
        return list(range(num_slices))
    text = spec.strip()
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] == 0):
                raise ValueError
            ks = list(range(num_slices))[slice(*parts)]
        else:
            ks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidInputError(
            f"{what} {spec!r} is not a slice selection: use start:stop[:step] (e.g. 10:40 or 0::3) or a comma "
            "list (e.g. 3,7,12)"
        ) from None
    bad = [k for k in ks if not 0 <= k < num_slices]
    if bad:
        raise InvalidInputError(f"{what}: slice {bad[0]} is out of range; the volume has slices 0..{num_slices - 1}")
    if not ks:
        raise InvalidInputError(f"{what} {spec!r} selects no slice of the {num_slices}")
    return sorted(set(ks))
