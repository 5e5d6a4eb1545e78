"""The flat ``cellfluxrl`` command line: prepare | pretrain | posttrain | sample | evaluate | info | rewards.

Each command lives in ``cellfluxrl/commands/<name>.py`` and is imported only when it is run, so
``cellfluxrl --help`` stays fast (no torch import). Every :class:`~cellfluxrl.errors.CellfluxError`
(and any other exception) becomes one line on stderr and exit status 1; ``--debug`` re-raises it
with the full traceback.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import sys

import click

from cellfluxrl import __version__
from cellfluxrl.errors import CellfluxError

# name -> (module, attribute, one-line help shown by `cellfluxrl --help` without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("cellfluxrl.commands.prepare", "prepare", "Build a dataset: synthetic, BBBC021 (IMPA or raw Broad layout), or your own images."),
    "pretrain": ("cellfluxrl.commands.pretrain", "pretrain", "Pretrain the CellFlux base model with flow matching."),
    "posttrain": ("cellfluxrl.commands.posttrain", "posttrain", "Post-train a base run with DiffusionNFT on the rewards."),
    "sample": ("cellfluxrl.commands.sample", "sample", "Generate perturbed cells from a run (optionally best-of-N)."),
    "evaluate": ("cellfluxrl.commands.evaluate", "evaluate", "Score runs: rewards, MoA accuracy, FID/KID, best-of-N curves."),
    "score": ("cellfluxrl.commands.score", "score", "Score images from any generator: rewards, judge, distances, baselines, paired or not."),
    "measure": ("cellfluxrl.commands.measure", "measure", "Segment images and write CellProfiler-named measurements (per image and per object)."),
    "info": ("cellfluxrl.commands.info", "info", "Describe any file or folder cellfluxrl wrote (dataset, run, samples, report, evaluators)."),
    "rewards": ("cellfluxrl.commands.rewards", "rewards", "List the installed reward plugins and where they come from."),
    "demo": ("cellfluxrl.commands.demo", "demo", "The main job: prepare -> pretrain -> posttrain -> evaluate on synthetic data."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _, _) in COMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """Click's lookup, but a mistyped command name gets a did-you-mean over the available commands
        (``sampel`` -> "No such command 'sampel'. Did you mean 'sample'?", the words click uses for a
        mistyped subcommand; click itself offers none here, since the commands are not loaded)."""
        name = click.utils.make_str(args[0])
        if name not in COMMANDS and not name.startswith("-") and not ctx.resilient_parsing:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            ctx.fail(f"No such command {name!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="cellfluxrl")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """CellFluxRL: biologically-constrained virtual-cell modeling with reinforcement learning."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def hoist_debug(argv: list[str]) -> list[str]:
    """``--debug`` anywhere before a ``--`` (e.g. after the subcommand) moved to the front, where the group takes it."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return list(argv)
    return ["--debug", *[a for a in argv[:end] if a != "--debug"], *argv[end:]]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning every error into one line on stderr."""
    argv = hoist_debug(sys.argv[1:] if argv is None else list(argv))
    debug = argv[:1] == ["--debug"]
    try:
        cli.main(args=argv, prog_name="cellfluxrl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors (bad option, unknown command): one line too
        if debug:
            raise
        where = f" (see 'cellfluxrl {exc.ctx.command_path.split(' ', 1)[1]} --help')" if getattr(exc, "ctx", None) and " " in exc.ctx.command_path else ""
        click.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted: the work since the last checkpoint (or of this command) is lost; re-run the same "
                   "command to resume from what was saved.", err=True)
        sys.exit(130)
    except CellfluxError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # an unexpected failure is still one line; --debug shows where
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(f"error: {type(exc).__name__}: {message} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
