"""`loralab run EXPERIMENT.yaml`: the whole experiment in one command.

    prepare data -> train (validated) -> evaluate base and tuned on the test split -> report

Everything lands in `output_dir`:  data split (dataset_dir), `train/` (the run folder), `eval/`
(base/ and tuned/ predictions and metrics, comparison.json), `report.html` / `report.md`.
The data split is reused while its manifest matches the data settings; train and eval record a
fingerprint of the settings they depend on in `stages.json`. Running the same experiment again reuses
finished stages, and a stage whose settings changed is redone only with
`--force` (nothing already computed is thrown away without asking). A training run that was killed is
resumed from its last complete checkpoint, or started again when it had none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from loralab import data, evaluate, report, train
from loralab.config import EVAL_KEYS, TRAIN_KEYS, Config, load_config
from loralab.errors import LoralabError
from loralab.log import log_to_file
from loralab.runinfo import write_json

log = logging.getLogger(__name__)


def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: Config, data_sha: str) -> dict[str, str]:
    """Fingerprints of what each stage depends on: data files -> train -> eval."""
    settings = cfg.model_dump(mode="json")
    # The split files' fingerprint stands for the folder they are in: moving the folder changes nothing.
    train_fp = fingerprint({"data": data_sha, **{k: settings[k] for k in TRAIN_KEYS - {"dataset_dir"}}})
    eval_fp = fingerprint({"train": train_fp, **{k: settings[k] for k in EVAL_KEYS}})
    return {"train": train_fp, "eval": eval_fp}


def run_experiment(path: str | None, overrides: list[str] | None = None, force: bool = False) -> dict:
    cfg = load_config(path, overrides)
    if cfg.adapter_name_or_path:
        raise LoralabError("adapter_name_or_path: `loralab run` trains its own adapter; unset adapter_name_or_path")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with log_to_file(out / "experiment.log"):
        return run_stages(cfg, out, force)


def run_stages(cfg: Config, out: Path, force: bool) -> dict:
    """The four stages in the experiment folder `out`, each reused when its fingerprint matches."""
    stages_file = out / "stages.json"
    done = json.loads(stages_file.read_text()) if stages_file.is_file() else {}

    # 1. Data: sample, clean and split the source into dataset_dir (with its manifest), or reuse it.
    log.info("stage 1/4 prepare")
    cfg = data.with_prepared_data(cfg, force=force)
    manifest_file = Path(cfg.dataset_dir) / f"{cfg.data_name}_manifest.json"
    data_sha = json.loads(manifest_file.read_text())["files"] if manifest_file.is_file() else ""
    keys = stage_keys(cfg, data_sha=fingerprint(data_sha))

    # 2. Train, validated on the validation split; the best checkpoint is the run's adapter.
    run_dir = out / "train"
    train_cfg = cfg.model_copy(update={"output_dir": str(run_dir)})
    finished = (run_dir / "train_results.json").is_file()
    if finished and done.get("train") == keys["train"] and not force:
        log.info("stage 2/4 train: reusing %s", run_dir)
        summary = json.loads((run_dir / "train_results.json").read_text())
    else:
        if finished and not force:
            raise _changed("train", "model, data or training settings")
        # A training run of this experiment that was cut off resumes from its last complete checkpoint
        # (the rule train and sweep use); without one there is nothing to keep and it starts over.
        resuming = not force and run_dir.is_dir() and train.find_resume_checkpoint(run_dir) is not None
        train_cfg = train_cfg.model_copy(
            update={"overwrite_output_dir": not resuming, "resume_from_checkpoint": resuming or None}
        )
        log.info("stage 2/4 train: %s%s", run_dir, " (resuming)" if resuming else "")
        summary = train.train(train_cfg)
        done = _mark(stages_file, done, "train", keys["train"])
        done.pop("eval", None)

    # 3. Evaluate base and tuned on the test split, same prompts, paired comparison.
    eval_dir = out / "eval"
    if (eval_dir / "comparison.json").is_file() and done.get("eval") == keys["eval"] and not force:
        log.info("stage 3/4 eval: reusing %s", eval_dir)
        comparison = json.loads((eval_dir / "comparison.json").read_text())
    else:
        if done.get("eval") and not force:
            raise _changed("eval", "generation settings")
        log.info("stage 3/4 eval: base and tuned on %s", cfg.test_dataset)
        comparison = evaluate.evaluate_models(
            cfg, {"base": None, "tuned": str(run_dir)}, split="test", out_dir=eval_dir, overwrite=True
        )
        done = _mark(stages_file, done, "eval", keys["eval"])

    # 4. Report: metric table with CIs, loss curves, example predictions.
    report_path = report.write_report(out)
    log.info("stage 4/4 report: %s", report_path)
    table = evaluate.format_comparison_table(comparison)
    return {
        "output_dir": str(out),
        "train": summary,
        "comparison": comparison,
        "report": str(report_path),
        "table": table,
    }


def _mark(stages_file: Path, done: dict, stage: str, key: str) -> dict:
    done = {**done, stage: key}
    write_json(stages_file, done)
    return done


def _changed(stage: str, what: str) -> LoralabError:
    return LoralabError(
        f"{stage}: the {what} changed since this experiment's {stage} stage ran; pass --force to redo it "
        "(replacing its results), or set another output_dir"
    )
