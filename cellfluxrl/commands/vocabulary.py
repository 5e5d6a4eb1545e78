"""One vocabulary across the commands, and the old spellings kept as deprecated aliases.

The words (docs/cli.md has the full table):

- ``--steps``: solver (Heun/Euler) steps, where a command samples (``sample``, ``evaluate``);
  qualified where the solver is another one (``pretrain --sample-steps``: recorded for sampling;
  ``posttrain --rollout-steps``: rollouts).
- ``--train-steps``: optimizer steps of ``pretrain``; ``--iterations``: RL iterations of ``posttrain``.
- ``--out``: where a command writes, in every command.
- ``--save-every``: checkpoint period; ``--device``: where to compute; ``--network ema|model``:
  which weights of a run sample; ``--weights``: reward weights.

:class:`RenamedCommand` rewrites an old spelling on the command line to the new one before click
parses it, and prints one ``note:`` line per old spelling on stderr, so scripts written for 0.1
keep working. The old names are not declared as options, so ``--help`` shows only the new ones.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import click

CLI_DOC = "docs/cli.md"


def _option_arity(command: click.Command) -> dict[str, int]:
    """``{option name: number of values it takes}`` for the command's options (flags: 0)."""
    arity: dict[str, int] = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        takes = 0 if (param.is_flag or param.count) else param.nargs
        for name in (*param.opts, *param.secondary_opts):
            arity[name] = takes
    arity["--help"] = arity["-h"] = 0
    return arity


def positional_indices(args: Sequence[str], arity: Mapping[str, int]) -> list[int]:
    """Indices in ``args`` of the positional arguments (not options nor option values).

    ``--name=value`` is one token; an unknown option is taken to be a flag (click reports it).
    Everything after ``--`` is positional.
    """
    found, i = [], 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return found + list(range(i + 1, len(args)))
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            i += 1 if "=" in token else 1 + arity.get(name, 0)
            continue
        found.append(i)
        i += 1
    return found


class RenamedCommand(click.Command):
    """A click command accepting deprecated spellings.

    Args:
        renames: ``{old option: new option}``, or ``{old flag: [new option, value]}`` (``--gpu`` ->
            ``--device cuda``); ``--old=value`` works too.
        positional_out: when given, the number of declared positional arguments; one more positional
            on the command line is the old positional output and becomes ``--out`` (with a note).
        meaning: ``{new option: what it counts}`` for the notes (``"optimizer steps"``).
    """

    def __init__(self, *args, renames: Mapping[str, str | Sequence[str]] | None = None,
                 positional_out: int | None = None, meaning: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renames = dict(renames or {})
        self.positional_out = positional_out
        self.meaning = dict(meaning or {})

    def _note(self, ctx: click.Context, old: str, new: str) -> None:
        what = self.meaning.get(new.split()[0], "")
        path = " ".join(["cellfluxrl", *ctx.command_path.split()[1:]])  # the same under CliRunner (prog "cli")
        click.echo(f"note: {old} is deprecated in `{path}`; use {new}"
                   f"{f' ({what})' if what else ''}; see {CLI_DOC}", err=True)

    def rewrite(self, ctx: click.Context, args: list[str]) -> list[str]:
        """The command line with old spellings replaced by new ones (notes printed once each)."""
        out, noted = [], set()
        for token in args:
            name, eq, value = token.partition("=")
            new = self.renames.get(name) if name.startswith("--") else None
            if new is None:
                out.append(token)
                continue
            new_tokens = [new] if isinstance(new, str) else list(new)
            if name not in noted:
                noted.add(name)
                self._note(ctx, name, " ".join(new_tokens))
            if eq:
                new_tokens = [f"{new_tokens[0]}={value}"] if len(new_tokens) == 1 else new_tokens
            out.extend(new_tokens)
        if self.positional_out is not None:
            positions = positional_indices(out, _option_arity(self))
            if len(positions) == self.positional_out + 1:
                i = positions[-1]
                self._note(ctx, f"the output as a positional argument ({out[i]})", f"--out {out[i]}")
                out = out[:i] + ["--out", out[i]] + out[i + 1:]
        return out

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.rewrite(ctx, list(args)))


def renamed(**kwargs):
    """``click.command``/``group.command`` keyword arguments that make a :class:`RenamedCommand`."""
    return {"cls": RenamedCommand, **kwargs}
