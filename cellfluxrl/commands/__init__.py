"""Thin click commands: parse options, build a config, call one library function.

The top layer with ``cellfluxrl.cli`` (which imports a command only when it runs): it may import
every part (data, model, rewards, rl, evaluation, plumbing); nothing imports it but the CLI. A
module imports its libraries inside the command function, so ``cellfluxrl --help`` loads no torch.
"""

import click

from cellfluxrl.config import SEED_MAX

SEED = click.IntRange(0, SEED_MAX)  # every --seed: checked up front (numpy takes 0 .. 2**32 - 1)
