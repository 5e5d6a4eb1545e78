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
One option given under two spellings with different values (``--steps 5 --train-steps 7``, or an
old positional output beside another ``--out``) is a usage error, not a silent choice.
"""

from __future__ import annotations

from pathlib import Path
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


def option_tokens(args: Sequence[str], arity: Mapping[str, int]) -> list[tuple[str, str | None]]:
    """``[(option, value)]`` for each option in ``args`` before ``--`` (``--name value`` or ``--name=value``),
    walked the way :func:`positional_indices` walks them; the value is None for a flag and for an
    option not in ``arity`` (taken to be a flag)."""
    found, i = [], 0
    while i < len(args) and args[i] != "--":
        token = args[i]
        if token.startswith("-") and token != "-":
            name, eq, value = token.partition("=")
            takes = arity.get(name, 0)
            found.append((name, value if eq else args[i + 1] if takes and i + 1 < len(args) else None))
            i += 1 if eq else 1 + takes
            continue
        i += 1
    return found


def unknown_options(args: Sequence[str], arity: Mapping[str, int]) -> list[str]:
    """The options in ``args`` that are not in ``arity``: with one of them, positional arguments
    cannot be told apart from option values."""
    return [name for name, _ in option_tokens(args, arity) if name not in arity]


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
        """The command line with old spellings replaced by new ones (notes printed once each).

        Refused first (a usage error, exit 2, before any note): two spellings of one option with
        different values (``--steps 5 --train-steps 7``), and an old positional output beside a
        different ``--out``. With an option the command does not know, the positional output is
        left alone (click then names the unknown option).
        """
        arity = _option_arity(self)
        self._check_agreement(ctx, args, arity)
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
        if self.positional_out is not None and not unknown_options(out, arity):
            positions = positional_indices(out, arity)
            if len(positions) == self.positional_out + 1:
                i = positions[-1]
                self._note(ctx, f"the output as a positional argument ({out[i]})", f"--out {out[i]}")
                out = out[:i] + ["--out", out[i]] + out[i + 1:]
        return out

    def _check_agreement(self, ctx: click.Context, args: list[str], arity: Mapping[str, int]) -> None:
        """A usage error when one option is given under two spellings with different values."""
        spellings = {old: [new] if isinstance(new, str) else list(new) for old, new in self.renames.items()}
        full = {**arity, **{old: (arity.get(new[0], 1) if len(new) == 1 else 0) for old, new in spellings.items()}}
        given: dict[str, list[tuple[str, str, str]]] = {}  # new option -> [(spelling, as written, value)]
        for name, value in option_tokens(args, full):
            new = spellings.get(name, [name])
            if len(new) > 1:  # an old flag standing for an option and its value (--gpu = --device cuda)
                given.setdefault(new[0], []).append((name, name, " ".join(new[1:])))
            elif value is not None:
                given.setdefault(new[0], []).append((name, f"{name} {value}", value))
        for new, uses in given.items():
            if len({spelling for spelling, _, _ in uses}) > 1 and \
                    len({self._canonical(new, value, ctx) for _, _, value in uses}) > 1:
                olds = sorted({spelling for spelling, _, _ in uses if spelling != new})
                raise click.UsageError(
                    f"{' and '.join(written for _, written, _ in uses)} set one option twice with different values "
                    f"({', '.join(olds)}: the deprecated spelling of {new}); give {new} once", ctx)
        self._check_positional_out(ctx, args, full, given.get("--out", []))

    def _check_positional_out(self, ctx: click.Context, args: list[str], arity: Mapping[str, int],
                              outs: list[tuple[str, str, str]]) -> None:
        """A usage error when an old positional output and a different ``--out`` are both given."""
        if self.positional_out is None or not outs or unknown_options(args, arity):
            return
        positions = positional_indices(args, arity)
        if len(positions) != self.positional_out + 1:
            return
        positional = args[positions[-1]]
        if any(Path(value) != Path(positional) for _, _, value in outs):
            raise click.UsageError(f"the output is given twice: {positional} (as a positional argument, the deprecated "
                                   f"spelling) and {outs[-1][1]}; give --out once", ctx)

    def _canonical(self, option: str, value: str, ctx: click.Context) -> str:
        """``value`` as the option reads it (``gpu`` and ``cuda`` agree, as do ``5`` and ``05``), else the text."""
        from cellfluxrl.commands.params import Device

        param = next((p for p in self.params if isinstance(p, click.Option) and option in p.opts), None)
        if param is None:
            return value
        try:
            if isinstance(param.type, Device):  # its conversion checks the machine; here only the word counts
                return value.strip().lower().replace("gpu", "cuda")
            return str(param.type.convert(value, param, ctx))
        except (click.ClickException, ValueError, TypeError):
            return value

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.rewrite(ctx, list(args)))


def renamed(**kwargs):
    """``click.command``/``group.command`` keyword arguments that make a :class:`RenamedCommand`."""
    return {"cls": RenamedCommand, **kwargs}
