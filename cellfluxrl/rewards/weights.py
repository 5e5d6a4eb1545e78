"""Reward weights: the paper's defaults and the ``--weights moa=5,nuc_in_cyto=2`` syntax.

Shared by ``posttrain``, ``sample`` and ``evaluate``. The default is the paper's weighted sum
(Sec. 5.1): ``r = 5 r_MoA + 2 r_NucInCyto + r_Roundness + r_NucSize + r_CytoSize + r_NucCount +
r_CytoCount``. ``--weights`` overrides the named rewards only; a weight of 0 drops a reward; a
plugin reward joins the sum only when it is named.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import click

from cellfluxrl.errors import CellfluxError, did_you_mean

DEFAULT_WEIGHTS: dict[str, float] = {
    "moa": 5.0, "nuc_in_cyto": 2.0, "roundness": 1.0, "nuc_size": 1.0, "cyto_size": 1.0,
    "nuc_count": 1.0, "cyto_count": 1.0,
}

WEIGHTS_HELP = ("Reward weights as NAME=W pairs separated by commas, e.g. 'moa=5,nuc_in_cyto=2,actin_tubulin=1'. "
                "Overrides the named rewards of the default (the paper's sum: moa=5, nuc_in_cyto=2, "
                "roundness=1, nuc_size=1, cyto_size=1, nuc_count=1, cyto_count=1); W=0 drops a reward; "
                "a plugin reward joins only when named. `cellfluxrl rewards` lists the installed names.")


def _parse_pair(item: str, where: str) -> tuple[str, float]:
    """One ``NAME=W`` item -> (name, weight); CellfluxError naming ``where`` and the item when malformed."""
    name, sep, number = (part.strip() for part in item.partition("="))
    if not sep or not name or not number:
        raise CellfluxError(f"{where}: {item.strip()!r} is not NAME=WEIGHT")
    try:
        weight = float(number)
    except ValueError:
        raise CellfluxError(f"{where}: weight of {name!r} is not a number ({number!r})") from None
    if not math.isfinite(weight):
        raise CellfluxError(f"{where}: weight of {name!r} must be finite, got {number!r}")
    if weight < 0:
        raise CellfluxError(f"{where}: weight of {name!r} must be >= 0, got {number!r}")
    return name, weight


def parse_weights(spec: str | None, available: Iterable[str] | None = None,
                  defaults: Mapping[str, float] | None = None, where: str | None = None) -> dict[str, float]:
    """Parse a weight string and merge it into the defaults.

    Args:
        spec: ``"moa=5,nuc_in_cyto=2"``-style overrides; ``None`` or ``""`` gives the defaults.
        available: the reward names that may be named (default: the installed rewards, discovered
            from entry-point metadata without importing them).
        defaults: what ``spec`` overrides (default: the paper's :data:`DEFAULT_WEIGHTS`).
        where: how an error names the string (default ``--weights 'SPEC'``; a settings file says
            ``"FILE: weights = 'SPEC'"``).

    Returns:
        name -> weight (float, > 0), the defaults first in their order then the named plugins in
        the order given; rewards with weight 0 removed.

    Raises:
        CellfluxError: a malformed item (``"moa"``, ``"=3"``, ``"moa=x"``), a non-finite or negative
            weight, a name given twice, an unknown name (the message lists the available ones), or
            all weights zero.
    """
    weights = dict(DEFAULT_WEIGHTS if defaults is None else defaults)
    if spec is None or not spec.strip():
        return weights
    where = f"--weights {spec!r}" if where is None else where
    if available is None:
        from cellfluxrl.rewards.registry import available_rewards

        available = available_rewards()
    names = set(available) | set(weights)
    seen: set[str] = set()
    for item in spec.split(","):
        name, weight = _parse_pair(item, where)
        if name in seen:
            raise CellfluxError(f"{where}: {name!r} is given twice")
        if name not in names:
            raise CellfluxError(f"{where}: unknown reward {name!r}; {did_you_mean(name, names)}")
        seen.add(name)
        weights[name] = weight
    weights = {name: w for name, w in weights.items() if w != 0.0}
    if not weights:
        raise CellfluxError(f"{where}: every weight is zero; keep at least one reward")
    return weights


def format_weights(weights: Mapping[str, float]) -> str:
    """``{"moa": 5.0, "roundness": 1.0}`` -> ``"moa=5,roundness=1"`` (round-trips through parse)."""
    return ",".join(f"{name}={w:.10g}" for name, w in weights.items())


def _given_weights(ctx, param, value: str | None) -> str | None:
    """Refuse, as a usage error (exit 2), an explicitly empty ``--weights ""`` (it used to mean the
    defaults without a word) and any weight string :func:`parse_weights` rejects."""
    if value is None:
        return value
    if not value.strip():
        raise click.BadParameter("is empty; give NAME=W,... or leave the option out for the paper's weights")
    try:
        parse_weights(value)
    except CellfluxError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"--weights {value!r}: ")) from None
    return value


TRAIN_WEIGHTS_HELP = ("Training reward weights as NAME=W pairs separated by commas, e.g. 'nuc_size=2,actin_tubulin=1'. "
                      "Overrides the named rewards of the training default: with --reward-norm per_reward (the "
                      "default) the paper's seven at moa=2, nuc_in_cyto=1, the others 1 (a standardised reward's "
                      "weight is its share of the advantage: docs/posttrain.md); with none the paper's sum. W=0 "
                      "drops a reward; a plugin reward joins only when named. Evaluation keeps the paper's sum.")


def weights_option(f=None, *, help: str = WEIGHTS_HELP):
    """Click decorator adding ``--weights TEXT``; the command receives the raw string (or None).
    ``@weights_option(help=...)`` gives the option another help text."""
    if f is None:
        return lambda g: weights_option(g, help=help)
    return click.option("--weights", "weights", default=None, metavar="NAME=W,...", help=help,
                        callback=_given_weights)(f)
