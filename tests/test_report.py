"""Reports: an experiment folder (tiny model: real training + base vs tuned evaluation), a plain
evaluation folder and a run folder render to HTML + Markdown; the page is opened in headless Chromium
and every image must load."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from loralab import report
from loralab.errors import LoralabError
from loralab.testing import CHROMIUM, CHROMIUM_FLAGS


def check_in_browser(page: Path, screenshot: Path) -> None:
    """Open the page offline in headless Chromium: every <img> must have loaded; keep a screenshot."""
    if not CHROMIUM.is_file():
        pytest.skip(f"headless browser check: {CHROMIUM} not found (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory(prefix="loralab-chromium-") as profile:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS, offline=True
        )
        try:
            tab = browser.new_page()
            tab.goto(page.resolve().as_uri())
            tab.wait_for_load_state("load")
            images = tab.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            assert images, "the report has no images"
            broken = [alt for alt, complete, width in images if not complete or width == 0]
            assert not broken, f"images that did not load: {broken}"
            tab.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory, tiny_model):
    """What `loralab run` leaves: data, train/ (a real tiny run), eval/ (base vs tuned on the test split)."""
    from loralab import data, evaluate
    from loralab.config import build_config
    from loralab.train import train

    out = tmp_path_factory.mktemp("experiment")
    data.prepare("builtin:demo", output_dir=out / "data", sample=40, split="28,6,6", name="alpaca_data")
    cfg = build_config(
        {
            "model_name_or_path": str(tiny_model),
            "dataset_dir": str(out / "data"),
            "output_dir": str(out / "train"),
            "max_steps": 2,
            "eval_steps": 1,
            "logging_steps": 1,
            "per_device_train_batch_size": 8,
            "cutoff_len": 96,
            "max_new_tokens": 8,
            "torch_threads": 1,
        }
    )
    train(cfg)
    evaluate.evaluate_models(
        cfg, {"base": None, "tuned": str(out / "train")}, split="test", out_dir=out / "eval", n_boot=200, progress=False
    )
    (out / "stages.json").write_text(json.dumps({"prepare": "x", "train": "y", "eval": "z"}))
    return out


def test_experiment_report_renders_offline(experiment_dir, artifacts_dir):
    page = report.write_report(experiment_dir)
    assert page == experiment_dir / "report.html"
    text = page.read_text()
    # metric table with CIs, paired comparison, loss curves, examples with the reference
    assert "base (95% CI)" in text and "tuned (95% CI)" in text and "tuned vs base (paired)" in text
    assert "p (paired)" in text and "Example predictions" in text and "reference" in text
    assert text.count('<img src="data:image/png;base64,') >= 2  # metrics bar chart + loss curves
    assert "http://" not in text and "https://" not in text  # nothing fetched from the network
    md = (experiment_dir / "report.md").read_text()
    for name in ("report_files/losses.png", "report_files/metrics_eval.png"):
        assert name in md and (experiment_dir / name).is_file()
    check_in_browser(page, artifacts_dir / "report.png")


def test_evaluation_and_run_folders(experiment_dir, tmp_path):
    """A single evaluation folder (`loralab eval`) and a single run folder (`loralab train`) report too."""
    ev = tmp_path / "eval-tuned"
    shutil.copytree(experiment_dir / "eval" / "tuned", ev)
    text = report.write_report(ev).read_text()
    assert "rougeL" in text and "95% CI low" in text and "prediction" in text
    run = tmp_path / "run"
    shutil.copytree(experiment_dir / "train", run)
    text = report.write_report(run).read_text()
    assert "best validation loss" in text and "Loss curves" in text


def test_nothing_to_report(tmp_path):
    with pytest.raises(LoralabError, match="nothing to report"):
        report.write_report(tmp_path)
    with pytest.raises(LoralabError, match="not a folder"):
        report.write_report(tmp_path / "missing")


def test_report_command(experiment_dir):
    from typer.testing import CliRunner

    from loralab.cli import app

    result = CliRunner().invoke(app, ["report", str(experiment_dir)])
    assert result.exit_code == 0 and f"wrote {experiment_dir / 'report.html'}" in result.output


def test_report_shows_exact_match_lengths_and_biggest_changes(experiment_dir):
    """Beside BLEU/ROUGE: exact match, lengths, max_new_tokens hits, and the samples that changed most."""
    report.write_report(experiment_dir)
    md = (experiment_dir / "report.md").read_text()
    assert "exact match % (95% CI)" in md and "generated / reference" in md and "hit max_new_tokens" in md
    assert "| exact_match |" in md and "| pred_words |" in md and "| hit_max_new_tokens |" in md
    assert "Biggest wins and losses of tuned vs base (per-sample rougeL)" in md
    base = [
        json.loads(line)
        for line in (experiment_dir / "eval" / "base" / "per_sample_scores.jsonl").read_text().splitlines()
    ]
    tuned = [
        json.loads(line)
        for line in (experiment_dir / "eval" / "tuned" / "per_sample_scores.jsonl").read_text().splitlines()
    ]
    better = sum(t["rougeL"] > b["rougeL"] for b, t in zip(base, tuned))
    assert f"tuned scores higher than base on {better} of {len(base)} samples" in md


def test_biggest_changes_orders_wins_and_losses():
    a = [{"rougeL": v} for v in (10, 50, 30, 30, 0)]
    b = [{"rougeL": v} for v in (40, 20, 30, 35, 90)]
    wins, losses = report.biggest_changes(a, b, n=2)
    assert wins == [4, 0] and losses == [1]  # sample 2 is a tie: neither
    assert report.biggest_changes(a, b, n=5)[0] == [4, 0, 3]
    assert report.biggest_changes(a, [{"other": 1}] * 5) == ([], [])


def test_wins_and_losses_table(tmp_path):
    def write(name, preds, scores):
        folder = tmp_path / name
        folder.mkdir()
        rows = [
            {
                "index": i,
                "prompt": f"<|start_header_id|>user<|end_header_id|>\n\nquestion {i}<|eot_id|>",
                "predict": p,
                "label": f"answer {i}",
                "rougeL": s,
                "exact_match": 100.0 if p == f"answer {i}" else 0.0,
            }
            for i, (p, s) in enumerate(zip(preds, scores))
        ]
        (folder / "per_sample_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    base = write("base", ["wrong 0", "answer 1", "meh 2"], [0.0, 100.0, 40.0])
    tuned = write("tuned", ["answer 0", "bad 1", "meh 2"], [100.0, 10.0, 40.0])
    page = report.Page("t", tmp_path)
    report.wins_and_losses_section(page, "base", "tuned", base, tuned)
    md = "\n".join(page.md)
    assert "tuned scores higher than base on 1 of 3 samples, lower on 1, the same on 1." in md
    assert "| 0 | question 0 | wrong 0 | answer 0 | answer 0 | 0.0 -> 100.0 | 0 -> 100 |" in md  # the win
    assert "| 1 | question 1 | answer 1 | bad 1 | answer 1 | 100.0 -> 10.0 | 100 -> 0 |" in md  # the loss
    assert "question 2" not in md
