"""RL: DiffusionNFT post-training of a CellFlux run on the rewards (CellFluxRL, paper Sec. 4.3).

Owns: the pure maths on tensors (``nft``: group advantages, optimality, implicit policies, the NFT
and KL losses, EMA schedules), the settings (``config``: :class:`PosttrainConfig`), the rollouts
and forward-process draws (``rollouts``), scoring beside the rollouts (``reward_worker``), one
iteration (``step``), the sample grids (``sample_grid``), the shuffled-reward null's permutation
(``null``), checkpoint selection on the val-select pairs (``selection``) and the resumable loop (``loop``:
:func:`~cellfluxrl.rl.loop.posttrain`). docs/posttrain.md explains the algorithm and its defaults.

May import: rewards, model, data and the shared plumbing (``checkpoint``, ``config``,
``distributed``, ``images``, ``grids``, ``errors``); never evaluation or the commands. This
``__init__`` imports nothing (torch loads with a module of the part).
"""
