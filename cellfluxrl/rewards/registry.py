"""Reward discovery and loading through the ``cellfluxrl.rewards`` entry-point group.

Discover cheaply, load lazily, fail loudly and by name:

- :func:`available_rewards` lists every installed reward from package *metadata* only (no plugin
  module is imported), sorted by name. Two distributions declaring the same name is an error that
  names both.
- :func:`load_reward` imports one entry point, calls its factory with a
  :class:`~cellfluxrl.rewards.RewardContext` and returns the reward callable. Any failure (import
  error, exception in the factory, something that is not callable) becomes a one-line
  :class:`RewardPluginError` naming the reward, its package and version and the entry point.
- :func:`check_output` validates what a reward returned (float64 ``(B,)``, finite).
- :func:`check_reward` imports and builds one reward for ``rewards --check`` (with a dataset's
  evaluators, or :class:`NoEvaluators` that tells "needs a dataset" apart from a failure).

The project declares its seven built-in rewards through the very same group (see pyproject.toml),
so built-ins and third-party plugins follow one code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import numpy as np

from cellfluxrl.errors import CellfluxError, did_you_mean

GROUP = "cellfluxrl.rewards"
BUILTIN_DISTRIBUTION = "cellfluxrl"

logger = logging.getLogger(__name__)


class RewardPluginError(CellfluxError):
    """A reward that cannot be discovered, loaded, built or that returned a bad value."""


@dataclass(frozen=True)
class RewardInfo:
    """One installed reward, as declared in package metadata (nothing imported).

    Attributes:
        name: the reward name (entry-point name), e.g. ``"moa"``.
        value: the entry-point value ``"module:factory"``.
        package: the distribution that declares it (``"cellfluxrl"`` for the built-ins).
        version: that distribution's version (``"?"`` when unknown).
        entry_point: the :class:`importlib.metadata.EntryPoint` itself.
    """

    name: str
    value: str
    package: str
    version: str
    entry_point: metadata.EntryPoint = field(repr=False, compare=False)

    @property
    def builtin(self) -> bool:
        """Whether the reward ships with cellfluxrl itself."""
        return self.package == BUILTIN_DISTRIBUTION

    @property
    def origin(self) -> str:
        """``package==version (entry point value)``, used in every error message."""
        return f"{self.package}=={self.version} ({self.value})"


def iter_entry_points() -> list[tuple[metadata.EntryPoint, str, str]]:
    """Every entry point of the group with its distribution name and version (no imports).

    Tests replace this function to inject synthetic entry points.
    """
    found = []
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        found.append((ep, name or "?", version or "?"))
    return found


def available_rewards() -> dict[str, RewardInfo]:
    """The installed rewards, name -> :class:`RewardInfo`, sorted by name; imports no plugin.

    Raises:
        RewardPluginError: two different distributions declare the same reward name.
    """
    rewards: dict[str, RewardInfo] = {}
    for ep, package, version in iter_entry_points():
        info = RewardInfo(ep.name, ep.value, package, version, ep)
        seen = rewards.get(ep.name)
        if seen is not None and (seen.package, seen.value) != (package, ep.value):
            raise RewardPluginError(f"reward {ep.name!r} is declared twice: by {seen.origin} and by "
                                    f"{info.origin}; uninstall one of the two packages")
        rewards[ep.name] = info
    return dict(sorted(rewards.items()))


def get_info(name: str, available: dict[str, RewardInfo] | None = None) -> RewardInfo:
    """The :class:`RewardInfo` of one reward; unknown name -> error listing the available ones."""
    available = available_rewards() if available is None else available
    if name not in available:
        raise RewardPluginError(f"unknown reward {name!r}; {did_you_mean(name, available) if available else 'none installed'}")
    return available[name]


def _describe(exc: BaseException) -> str:
    """``"Type: message"``; a ``SystemExit`` says it called ``sys.exit`` and with which code."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def load_factory(info: RewardInfo) -> Callable[[Any], Callable]:
    """Import the entry point of ``info`` and return its factory.

    Raises:
        RewardPluginError: the import fails or the object is not callable (one line, chained from
            the original exception).
    """
    try:
        factory = info.entry_point.load()
    except (Exception, SystemExit) as exc:  # any import-time failure of third-party code, sys.exit() included
        raise RewardPluginError(f"reward {info.name!r} from {info.origin} failed to load: "
                                f"{_describe(exc)}") from exc
    if not callable(factory):
        raise RewardPluginError(f"reward {info.name!r} from {info.origin}: {info.value} is a "
                                f"{type(factory).__name__}, not a factory callable")
    return factory


def load_reward(info: RewardInfo, context: Any) -> Callable:
    """Import and build one reward: ``factory(context)`` -> ``reward(batch) -> float64 (B,)``.

    Args:
        info: the reward to load (from :func:`available_rewards`).
        context: the :class:`~cellfluxrl.rewards.RewardContext` handed to the factory.

    Raises:
        RewardPluginError: import failure, factory exception, or a non-callable reward.
    """
    factory = load_factory(info)
    try:
        reward = factory(context)
    except CellfluxError as exc:
        raise RewardPluginError(f"reward {info.name!r} from {info.origin}: {exc}") from exc
    except (Exception, SystemExit) as exc:
        raise RewardPluginError(f"reward {info.name!r} from {info.origin}: factory raised "
                                f"{_describe(exc)}") from exc
    if not callable(reward):
        raise RewardPluginError(f"reward {info.name!r} from {info.origin}: factory returned a "
                                f"{type(reward).__name__}, not a callable reward")
    logger.debug("loaded reward %s from %s", info.name, info.origin)
    return reward


class NeedsDataset(Exception):
    """Raised by :class:`NoEvaluators` when a factory asks for a dataset's evaluators."""


class NoEvaluators:
    """Stands in for a dataset's evaluators in ``rewards --check`` without ``--data``: any use raises
    :class:`NeedsDataset`, so a factory that needs them is told apart from one that fails."""

    def __getattr__(self, name: str):
        raise NeedsDataset(name)


def check_reward(info: RewardInfo, context: Any) -> bool:
    """Import and build one reward as ``rewards --check`` does.

    Args:
        info: the reward.
        context: a :class:`~cellfluxrl.rewards.RewardContext` (its evaluators may be :class:`NoEvaluators`).

    Returns:
        ``True`` when the factory built a callable reward, ``False`` when it stopped only because
        it needs a dataset's evaluators that ``context`` lacks.

    Raises:
        RewardPluginError: the import fails, the factory raises, or it returns a non-callable.
    """
    try:
        load_reward(info, context)
    except RewardPluginError as exc:
        if isinstance(exc.__cause__, NeedsDataset):
            return False
        raise
    return True


def check_output(info: RewardInfo, value: Any, batch_size: int) -> np.ndarray:
    """Validate a reward's output: numpy float64, shape ``(batch_size,)``, all finite.

    Returns:
        ``value`` itself (float64 ``(B,)``).

    Raises:
        RewardPluginError: wrong type, dtype, shape, or a NaN/inf value, naming reward and package.
    """
    where = f"reward {info.name!r} from {info.origin}"
    if not isinstance(value, np.ndarray):
        raise RewardPluginError(f"{where} returned a {type(value).__name__}; expected a numpy float64 "
                                f"array of shape ({batch_size},)")
    if value.dtype != np.float64 or value.shape != (batch_size,):
        raise RewardPluginError(f"{where} returned {value.dtype} {value.shape}; expected float64 "
                                f"({batch_size},)")
    if not np.isfinite(value).all():
        bad = int(np.flatnonzero(~np.isfinite(value))[0])
        raise RewardPluginError(f"{where} returned a non-finite value ({value[bad]}) for image {bad}")
    return value
