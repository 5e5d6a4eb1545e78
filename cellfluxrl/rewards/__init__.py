"""Rewards: entry-point plugin registry, weights, the seven built-ins and the weighted suite.

Public API::

    DEFAULT_WEIGHTS, parse_weights(spec, available=None), format_weights(weights), weights_option
    available_rewards() -> {name: RewardInfo}, RewardPluginError
    RewardBatch, RewardContext          # the plugin contract (see cellfluxrl.rewards.suite)
    RewardSuite.from_dataset(dataset, weights, device="cpu", segmenter=None, cellpose_model=None)
    RewardResult                        # .total, .components, .stats, .weights

Importing this package imports no torch and no reward plugin; rewards load when a suite asks.

Owns, besides that plugin contract (``registry``, ``weights``, ``suite``, ``builtin``): what the
rewards stand on, i.e. the morphology statistics (``morphology``), segmentation backends
(``segmentation/``), the MoA classifier and its training degradations (``moa_classifier``,
``degradations``), the per-MoA reference statistics (``refstats``) and the evaluators a dataset
carries (``evaluators``, ``evaluators_resume``). A new reward is an entry point in the group
``cellfluxrl.rewards`` (a built-in one: a factory in ``builtin`` plus a line in pyproject.toml).

May import: ``cellfluxrl.data``, ``cellfluxrl.model`` and the shared plumbing; never rl,
evaluation or the commands.
"""

from cellfluxrl.rewards.registry import GROUP, RewardInfo, RewardPluginError, available_rewards
from cellfluxrl.rewards.suite import RewardBatch, RewardContext, RewardResult, RewardSuite
from cellfluxrl.rewards.weights import DEFAULT_WEIGHTS, format_weights, parse_weights, weights_option

__all__ = [
    "DEFAULT_WEIGHTS", "GROUP", "RewardBatch", "RewardContext", "RewardInfo", "RewardPluginError", "RewardResult",
    "RewardSuite", "available_rewards", "format_weights", "parse_weights", "weights_option",
]
