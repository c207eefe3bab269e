"""The `loralab` command: one subcommand per stage.

Stage commands take `CONFIG [key=value ...]`: an optional YAML file, then overrides. Each command
imports its stage module lazily, so `loralab --help` stays fast and a missing optional extra only
matters to the command that needs it.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import click
import typer

from loralab import __version__
from loralab.config import Config, config_to_yaml, describe_fields, load_config
from loralab.errors import LoralabError
from loralab.log import setup_logging

app = typer.Typer(
    name="loralab",
    help="LoRA fine-tuning lab: prepare data, train, evaluate, chat, serve and sweep small instruction models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

log = logging.getLogger("loralab")

ConfigArgs = Annotated[
    Optional[list[str]],
    typer.Argument(help="CONFIG.yaml (optional) followed by key=value overrides, e.g. lora_rank=16."),
]


def config_from_args(args: list[str] | None, **extra) -> Config:
    """['cfg.yaml', 'lora_rank=16'] -> Config. The first argument without '=' is the YAML file."""
    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else None
    overrides = [a for a in args]
    stray = [a for a in overrides if "=" not in a]
    if stray:
        raise LoralabError(f"command line: expected key=value after the config file, got {stray[0]!r}")
    cfg = load_config(path, overrides)
    for key, value in extra.items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loralab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    setup_logging(verbose)


# --- config ------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(
    args: ConfigArgs = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every key with its default and help text.")] = False,
) -> None:
    """Print the resolved configuration (YAML file + key=value overrides), or the error."""
    if keys:
        typer.echo(describe_fields())
        return
    typer.echo(config_to_yaml(config_from_args(args)), nl=False)


# --- data --------------------------------------------------------------------------------------
@app.command()
def prepare(
    source: Annotated[
        str,
        typer.Argument(
            help="JSON/JSONL file (alpaca, ShareGPT or OpenAI messages), LLaMA-Factory data folder "
            "(FOLDER --dataset NAME), hub dataset id (yahma/alpaca-cleaned), or builtin:demo."
        ),
    ],
    output_dir: Annotated[str, typer.Option("--output-dir", "-o", help="Folder for the split files.")] = "data",
    seed: Annotated[int, typer.Option(help="Seed of the sample and split.")] = 42,
    sample: Annotated[Optional[int], typer.Option(help="Records to sample (default: all).")] = None,
    split: Annotated[str, typer.Option(help="train,val,test sizes: counts (7000,2000,1000) or fractions.")] = "0.7,0.2,0.1",
    name: Annotated[str, typer.Option(help="Output prefix: NAME_train.json, NAME_val.json, NAME_test.json.")] = "alpaca_data",
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name when SOURCE is a LLaMA-Factory data folder.")] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option(help="Drop records longer than this many tokens (needs --tokenizer).")
    ] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Model whose tokenizer counts tokens for --max-tokens.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing split files.")] = False,
) -> None:
    """Sample, clean and split an instruction dataset into train/val/test files plus a manifest."""
    from loralab import data

    manifest = data.prepare(
        source,
        output_dir=output_dir,
        seed=seed,
        sample=sample,
        split=split,
        name=name,
        dataset=dataset,
        max_tokens=max_tokens,
        tokenizer=tokenizer,
        overwrite=overwrite,
    )
    counts = manifest["counts"]["actual"]
    typer.echo(
        f"wrote {output_dir}: train {counts['train']}, val {counts['val']}, test {counts['test']} "
        f"(manifest: {output_dir}/{name}_manifest.json)"
    )


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2, never a traceback."""
    try:
        rc = app(standalone_mode=False)
    except LoralabError as e:
        log.debug("user error", exc_info=True)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
