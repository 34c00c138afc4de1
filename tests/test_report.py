"""The evaluation's report: one writer (e2_jax/evaluation/report.py) for report.json, report.md
and a self-contained report.html, loaded in a real browser (headless Chromium) where one is
installed."""

import json
import re
import shutil

import numpy as np

from e2_jax import main
from e2_jax.evaluation import report
from tests.browser import images_loaded
from tests.test_train import tiny_config


def test_markdown_and_html_from_one_set_of_blocks(tmp_path):
    table = report.Table(("model", "SumR"), (("E² <b>", "350.0"),))
    assert table.markdown() == "| model | SumR |\n|---|---|\n| E² <b> | 350.0 |\n"
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0] = 255
    page = report.html_page("A & B", [report.Text("hello", 1), table, report.Gallery(
        "top 2", (report.Figure(report.png(pixels), "right", True), report.Figure(report.png(pixels), "wrong")))])
    assert "<title>A &amp; B</title>" in page and "E² &lt;b&gt;" in page  # escaped
    assert page.count("src='data:image/png;base64,") == 2 and page.count("class='marked'") == 1
    assert not re.search(r"src=['\"](?!data:)", page) and "<script" not in page  # nothing to fetch, no script
    written = report.write(tmp_path / "out", {"sumr": 350.0}, table.markdown(), page=("A & B", []))
    assert sorted(written) == ["html", "json", "md"]
    assert json.loads(written["json"].read_text()) == {"sumr": 350.0}
    assert report.png(np.zeros((400, 200, 3), np.uint8), size=100)[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_a_page_with_pictures_that_a_browser_loads(synth_tiny, trained_tiny, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained_tiny[0], workdir)
    main.run(tiny_config(synth_tiny, **{"eval.sample_negatives": 8}), workdir, mode="evaluate")
    printed = capsys.readouterr().out
    assert re.search(r"report with pictures: .*report\.html \([\d.]+ s\)", printed), printed
    page = (workdir / "eval" / "report.html").read_text()
    saved = json.loads((workdir / "eval" / "report.json").read_text())
    examples = saved["examples"]
    assert len(examples["queries"]) == 4 and len(examples["misses"]) == 4
    assert all(len(e["top"]) == 5 for e in examples["queries"])
    # The tables, each example query's 5 images (its own framed when found), the misses, the maps.
    assert "<table>" in page and "| full_candidate |" not in page and "<td>full_candidate</td>" in page
    assert "The worst misses" in page and "Where the selection tokens look" in page
    found = sum(any(j == e["product"] for j, _ in e["top"]) for e in examples["queries"] + examples["misses"])
    images = page.count("<img ")
    assert images >= 8 * 5 + 8 - found  # top 5 of each, plus the own image of each not found
    assert not re.search(r"src=['\"](?!data:)", page)  # self-contained
    assert images_loaded(page, tmp_path) == (images, images)
