"""The `loralab` command: one subcommand per stage.

Stage commands take `CONFIG [key=value ...]`: an optional YAML file, then overrides. Each command
imports its stage module lazily, so `loralab --help` stays fast and a missing optional extra only
matters to the command that needs it.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import click
import typer

from loralab import __version__
from loralab.config import Config, config_to_yaml, describe_fields, load_config
from loralab.errors import LoralabError
from loralab.log import setup_logging
from loralab.runinfo import write_json

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

# Libraries of optional stages -> the extra of pyproject.toml that installs them.
EXTRA_OF_MODULE = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "gradio": "webchat",
    "optuna": "sweep",
    "sqlalchemy": "sweep",
}

ConfigArgs = Annotated[
    list[str] | None,
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
    diff_lf: Annotated[
        bool,
        typer.Option(
            "--diff-lf",
            help="Only the effective values LLaMA-Factory would not use for this file (keys it leaves unset).",
        ),
    ] = False,
) -> None:
    """Print the resolved configuration (YAML file + key=value overrides), or the error."""
    if keys:
        typer.echo(describe_fields())
        return
    if diff_lf:
        from loralab.config import differences_from_llamafactory, given_keys

        cfg = config_from_args(args)
        rest = list(args or [])
        path = rest.pop(0) if rest and "=" not in rest[0] else None
        rows = differences_from_llamafactory(cfg, given_keys(path, rest))
        if not rows:
            typer.echo("every effective value is what LLaMA-Factory would use")
            return
        typer.echo(f"{'key':<24} {'loralab':<28} {'LLaMA-Factory':<22} why loralab's default")
        for r in rows:
            typer.echo(f"{r['key']:<24} {str(r['loralab']):<28} {str(r['llamafactory']):<22} {r['why']}")
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
    sample: Annotated[int | None, typer.Option(help="Records to sample (default: all).")] = None,
    split: Annotated[
        str, typer.Option(help="train,val,test sizes: counts (7000,2000,1000) or fractions.")
    ] = "0.7,0.2,0.1",
    name: Annotated[
        str, typer.Option(help="Output prefix: NAME_train.json, NAME_val.json, NAME_test.json.")
    ] = "alpaca_data",
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name when SOURCE is a LLaMA-Factory data folder.")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Drop records longer than this many tokens (needs --tokenizer).")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Model whose tokenizer counts tokens for --max-tokens.")] = None,
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


# --- train / export ----------------------------------------------------------------------------
@app.command("train")
def train_cmd(
    args: ConfigArgs = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty output_dir (overwrite_output_dir).")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last complete checkpoint in output_dir.")
    ] = False,
) -> None:
    """Fine-tune with LoRA (or full) on the train split, validated on the validation split."""
    from loralab import data

    cfg = config_from_args(
        args, overwrite_output_dir=True if overwrite else None, resume_from_checkpoint=True if resume else None
    )
    # A typo in the config or a missing data file fails here in about a second, before the
    # 10-20 s of importing torch/transformers (reading the data twice costs far less).
    data.load_conversations(cfg, "train")
    data.load_conversations(cfg, "eval")
    from loralab.train import train

    summary = train(cfg)
    if summary:  # only the main process of a multi-process run reports
        best = summary["best_eval_loss"]
        typer.echo(
            f"trained {summary['steps']} steps into {summary['run_dir']}"
            + (f" (best validation loss {best:.4f} at step {summary['best_step']})" if best is not None else "")
        )


@app.command("export")
def export_cmd(
    args: ConfigArgs = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty export_dir.")] = False,
) -> None:
    """Merge adapter_name_or_path into its base model and save a plain model folder in export_dir.

    With export_gguf=f16,q8_0 also GGUF files for llama.cpp and an Ollama Modelfile."""
    from loralab.export import export

    cfg = config_from_args(args)
    path = export(cfg, overwrite=overwrite)
    typer.echo(f"wrote merged model to {path}")
    if cfg.gguf_types:
        files = ", ".join(sorted(p.name for p in path.glob("*.gguf")))
        typer.echo(f"GGUF: {files}; for Ollama: ollama create NAME -f {path / 'Modelfile'}")


# --- predict / eval / compare ------------------------------------------------------------------
SplitOpt = Annotated[str, typer.Option("--split", help="train, val or test (dataset / eval_dataset / test_dataset).")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Predict on this data file instead of a split.")]
OutOpt = Annotated[str | None, typer.Option("--output-dir", "-o", help="Output folder (default: under output_dir).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
BootOpt = Annotated[int, typer.Option("--n-boot", help="Bootstrap / permutation resamples for CIs and p-values.")]


@app.command()
def predict(
    args: ConfigArgs = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="train, val or test (dataset / eval_dataset / test_dataset); default test, or "
            "eval_dataset into output_dir with do_predict: true (LLaMA-Factory's predict).",
        ),
    ] = None,
    data_file: DataOpt = None,
    output_dir: OutOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Generate replies for a split (or --data FILE): generated_predictions.jsonl + predict_results.json."""
    from loralab import evaluate

    out = evaluate.predict(config_from_args(args), split, data_file, output_dir, overwrite)
    r = out["results"]
    typer.echo(
        f"wrote {out['dir']}/generated_predictions.jsonl: {r['samples']} samples in {r['seconds']:.1f}s "
        f"({r['samples_per_second']:.2f} samples/s, {r['generated_tokens_per_second']:.1f} generated tokens/s)"
    )
    if "metrics" in out:  # do_predict: LLaMA-Factory prints its predict metrics
        typer.echo(evaluate.format_metrics_table(out))
        typer.echo(f"wrote {out['dir']}/predict_results.json and metrics.json")


@app.command("eval")
def eval_(
    args: ConfigArgs = None,
    split: SplitOpt = "test",
    data_file: DataOpt = None,
    predictions: Annotated[
        str | None, typer.Option("--predictions", help="Score this generated_predictions.jsonl instead of predicting.")
    ] = None,
    compare_base: Annotated[
        bool,
        typer.Option("--compare-base", help="Also score the base model (adapter off) and compare, sample by sample."),
    ] = False,
    output_dir: OutOpt = None,
    overwrite: OverwriteOpt = False,
    n_boot: BootOpt = 1000,
) -> None:
    """Predict and score (BLEU/ROUGE with 95% CIs): metrics.json, per_sample_scores.jsonl, a table."""
    from loralab import evaluate

    cfg = config_from_args(args)
    if compare_base:
        if predictions:
            raise LoralabError("--compare-base: generates with both models; it cannot be combined with --predictions")
        if len(cfg.adapter_paths) != 1:
            raise LoralabError(
                "--compare-base: set adapter_name_or_path=ADAPTER_DIR (one adapter) to compare with the base model"
            )
        adapter = cfg.adapter_paths[0]
        tag = evaluate.adapter_tag(adapter)
        summary = evaluate.evaluate_models(
            cfg,
            {"base": None, tag if tag != "base" else "tuned": adapter},
            split,
            output_dir,
            data_file,
            overwrite,
            n_boot,
        )
        typer.echo(evaluate.format_comparison_table(summary))
        typer.echo(f"wrote {summary['dir']}/comparison.json")
        return
    result = evaluate.evaluate(cfg, split, data_file, predictions, output_dir, overwrite, n_boot)
    typer.echo(
        f"{result.get('split') or result.get('data') or result.get('predictions')}: {result['n_samples']} samples"
    )
    typer.echo(evaluate.format_metrics_table(result))
    typer.echo(f"wrote {result['dir']}/metrics.json")


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="Evaluation folder A (the reference), made by `loralab eval`.")],
    run_b: Annotated[str, typer.Argument(help="Evaluation folder B, on the same split.")],
    output: Annotated[str | None, typer.Option("--output", help="Also write the comparison as JSON here.")] = None,
    n_boot: BootOpt = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the resampling.")] = 0,
) -> None:
    """Paired comparison of two evaluations of the same split: B-A, 95% CI, p-value per metric."""
    from pathlib import Path

    from loralab import evaluate

    result = evaluate.compare_evaluations(run_a, run_b, n_boot=n_boot, seed=seed)
    typer.echo(f"B = {run_b} vs A = {run_a}: {result['n_samples']} samples")
    typer.echo(evaluate.format_paired_table(result))
    if output:
        if Path(output).exists():
            raise LoralabError(f"--output: {output} already exists; choose another file")
        write_json(output, result)
        typer.echo(f"wrote {output}")


# --- serving: chat / api / webchat -------------------------------------------------------------
HostOpt = Annotated[
    str | None, typer.Option("--host", help="Bind address (default: API_HOST env, else api_host = 127.0.0.1).")
]
PortOpt = Annotated[int | None, typer.Option("--port", help="Port (default: API_PORT env, else api_port).")]
AdapterOpt = Annotated[
    list[str] | None, typer.Option("--adapter", help="Serve an adapter as model NAME: NAME=PATH (repeatable).")
]


def _serving_config(args: list[str] | None, adapter_flags: list[str] | None) -> Config:
    from loralab.api import parse_adapter_flags

    cfg = config_from_args(args)
    extra = parse_adapter_flags(adapter_flags)
    if extra:
        cfg.adapters = {**cfg.adapters, **extra}
    return cfg


@app.command()
def chat(args: ConfigArgs = None) -> None:
    """Chat in the terminal (streaming, multi-turn; /clear, /system TEXT, /exit). Reads lines from a pipe too."""
    from loralab import chat as chat_stage

    chat_stage.chat(config_from_args(args))


@app.command()
def api(
    args: ConfigArgs = None,
    host: HostOpt = None,
    port: PortOpt = None,
    adapter: AdapterOpt = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require Authorization: Bearer KEY on /v1 (default: API_KEY env).")
    ] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Requests generated together at most.")] = 16,
    max_request_bytes: Annotated[
        int, typer.Option("--max-request-bytes", help="Largest request body accepted (413 above it).")
    ] = 1_000_000,
) -> None:
    """OpenAI-compatible server: /v1/models, /v1/chat/completions (streaming), /health; model = base or adapter."""
    from loralab import api as api_stage

    api_stage.serve(_serving_config(args, adapter), host, port, api_key, max_batch_size, max_request_bytes)


@app.command()
def webchat(
    args: ConfigArgs = None,
    host: HostOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default: 7860).")] = None,
    adapter: AdapterOpt = None,
    username: Annotated[str | None, typer.Option("--username", help="Require this login (with --password).")] = None,
    password: Annotated[
        str | None, typer.Option("--password", help="Password for --username (default: WEBCHAT_PASSWORD env).")
    ] = None,
) -> None:
    """Browser chat page (Gradio): streaming replies, model/adapter selector, system prompt, settings."""
    from loralab import webchat as webchat_stage

    webchat_stage.serve(_serving_config(args, adapter), host, port, username, password)


@app.command("run")
def run_cmd(
    args: ConfigArgs = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage, replacing earlier results.")] = False,
) -> None:
    """The whole experiment: prepare -> train -> evaluate base and tuned on the test split -> report."""
    from loralab.experiment import run_experiment

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else None
    result = run_experiment(path, args, force=force)
    typer.echo(result["table"])
    typer.echo(f"\nrun folder: {result['output_dir']}   report: {result['report']}")


# --- sweep / report ----------------------------------------------------------------------------
@app.command()
def sweep(
    sweep_file: Annotated[
        str, typer.Argument(help="SWEEP.yaml: base config, strategy, search_space, n_trials, objective.")
    ],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides of the base config, e.g. torch_threads=2.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna RDB URL shared by several workers, e.g. postgresql://user:pass@host/db "
            "(default: the sweep file's `storage`, else a journal file in the sweep folder)."
        ),
    ] = None,
    trials_only: Annotated[
        bool,
        typer.Option("--trials-only", help="Only run trials; leave selection and the test evaluation to another run."),
    ] = False,
    n_trials: Annotated[
        int | None,
        typer.Option(min=1, help="Trial budget of the whole sweep instead of the file's (more: grows a sweep)."),
    ] = None,
    timeout_minutes: Annotated[
        float | None,
        typer.Option(min=0.01, help="No new trial starts after this long in this worker, instead of the file's."),
    ] = None,
) -> None:
    """Hyperparameter sweep (grid / random / TPE); rerun the same command to resume or to add workers."""
    from loralab import report
    from loralab import sweep as sweep_stage

    stray = [a for a in overrides or [] if "=" not in a]
    if stray:
        raise LoralabError(f"command line: expected key=value after the sweep file, got {stray[0]!r}")
    result = sweep_stage.run_sweep(
        sweep_file,
        overrides,
        storage=storage,
        trials_only=trials_only,
        n_trials=n_trials,
        timeout_minutes=timeout_minutes,
    )
    if result.get("final"):
        typer.echo(f"\n{result['final']['table']}")
        page = report.write_report(result["sweep_dir"])
        typer.echo(
            f"\nwinner: trial {result['final']['best_trial']} {result['final']['best_params']}   "
            f"sweep folder: {result['sweep_dir']}   report: {page}"
        )


@app.command("report")
def report_cmd(
    folder: Annotated[str, typer.Argument(help="A run, evaluation, experiment (`loralab run`) or sweep folder.")],
) -> None:
    """Static HTML (+ Markdown) report: metrics with CIs, loss curves, comparisons, examples, sweep analysis."""
    from loralab import report

    typer.echo(f"wrote {report.write_report(folder)}")


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2, never a traceback."""
    try:
        rc = app(standalone_mode=False)
    except LoralabError as e:
        log.debug("user error", exc_info=True)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    # typer >= 0.26 carries its own copy of click (typer.Exit, typer.Abort, typer.TyperException);
    # older ones raise click's own exceptions: a usage mistake is one message either way.
    except (click.exceptions.Exit, typer.Exit) as e:
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except (click.ClickException, typer.TyperException) as e:
        if hasattr(e, "show"):
            e.show()
        else:
            typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as e:  # an optional stage whose extra is not installed
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        typer.echo(
            f"error: this command needs {e.name}, which is not installed: pip install 'loralab[{extra}]'", err=True
        )
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
