"""Sample records (trainer/samples_log.py) and `megatron-pgpo visualize`: exact numbers in, exact numbers out."""
import colorsys
import html
import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from megatron_pgpo.trainer.samples_log import (SAMPLE_RECORD_KEYS, read_sample_records, sample_steps,
                                               samples_path, write_sample_records)
from megatron_pgpo.visualize import VisualizationError, visualize

TOKENS = ["<think>", " The", " square", " is", "\n", "</think>", "\\boxed{", "blue", "}", "<|im_end|>"]
# S spans eight decades; "blue" (index 7) is the most image-dependent token, " is" has S = 0 exactly.
SCORES = [2.5e-7, 1e-6, 0.031, 0.0, 3e-5, 1.2e-7, 0.0004, 3.75, 0.12, 1e-8]
# PGPO-like weights summing to the length (10): below 1 suppressed, above 1 boosted, "blue" the largest.
WEIGHTS = [0.25, 0.5, 1.5, 0.0, 0.75, 0.25, 1.0, 3.125, 1.875, 0.75]
GRPO_TOKENS = ["a & b", "<", ">", " ", "&amp;", "\u00e9t\u00e9", "\"quoted\""]


def make_records():
    assert math.isclose(sum(WEIGHTS), len(WEIGHTS))
    pgpo = {"prompt_index": 0, "group_advantage": 1.1547005383792517, "reward": 1.0, "accuracy": 1.0,
            "format": 1.0, "question": "What colour is the <square> & its border?", "answer": "blue",
            "tokens": TOKENS, "token_ids": np.arange(100, 110), "scores": SCORES, "weights": WEIGHTS}
    grpo = {"prompt_index": 1, "group_advantage": -0.5773502691896258, "reward": 0.1, "accuracy": 0.0,
            "format": 1.0, "question": None, "answer": "42", "tokens": GRPO_TOKENS,
            "token_ids": [7, 8, 9, 10, 11, 12, 13], "scores": [1e-3, 2e-3, 1e-5, 0.5, 1e-6, 0.25, 1e-4],
            "weights": [1.0] * 7}
    return [pgpo, grpo]


def expected(record, step):
    out = {"step": step, **record}
    out["token_ids"] = [int(t) for t in record["token_ids"]]
    return out


# ------------------------------------------------------------------------------------------ samples_log

def test_records_round_trip_exactly_and_rewrite_atomically(tmp_path):
    run = tmp_path / "run"
    first = make_records()
    path = write_sample_records(str(run), 3, first)
    assert path == samples_path(str(run), 3) == run / "samples" / "step_00000003.jsonl"
    back = read_sample_records(str(run), 3)
    assert back == [expected(r, 3) for r in first]
    assert list(back[0])[:len(SAMPLE_RECORD_KEYS)] == list(SAMPLE_RECORD_KEYS)
    assert back[0]["scores"][7] == 3.75 and back[0]["scores"][0] == 2.5e-7  # exact floats, not rounded
    assert [type(t) for t in back[0]["token_ids"]] == [int] * 10
    # one JSON object per response line
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2

    # a second step, then rewriting step 3 (a resumed run repeats it) replaces it; append keeps the old ones
    write_sample_records(str(run), 7, first[:1])
    write_sample_records(str(run), 3, first[1:])
    assert read_sample_records(str(run), 3) == [expected(first[1], 3)]
    write_sample_records(str(run), 3, first[:1], append=True)
    assert read_sample_records(str(run), 3) == [expected(first[1], 3), expected(first[0], 3)]
    assert sample_steps(str(run)) == [3, 7]
    assert [r["step"] for r in read_sample_records(str(run))] == [3, 3, 7]
    assert sorted(os.listdir(run / "samples")) == ["step_00000003.jsonl", "step_00000007.jsonl"]  # no temp files

    # tensors and non-finite values: NaN is written as null (JSON has no NaN)
    torch = pytest.importorskip("torch")
    record = dict(first[0], scores=torch.tensor([float("nan")] + SCORES[1:], dtype=torch.float64),
                  weights=torch.tensor(WEIGHTS, dtype=torch.float64), token_ids=torch.arange(10))
    write_sample_records(str(run), 9, [record])
    (back,) = read_sample_records(str(run), 9)
    assert back["scores"] == [None] + SCORES[1:] and back["weights"] == WEIGHTS
    assert back["token_ids"] == list(range(10))


def test_invalid_records_raise_clear_errors(tmp_path):
    run = str(tmp_path / "run")
    good = make_records()[0]
    with pytest.raises(ValueError, match=r"equal lengths.*tokens=10, token_ids=10, scores=9, weights=10"):
        write_sample_records(run, 1, [dict(good, scores=SCORES[:-1])])
    with pytest.raises(ValueError, match=r"sample record 1 \(prompt_index 0\) lacks \['weights'\]"):
        write_sample_records(run, 1, [good, {k: v for k, v in good.items() if k != "weights"}])
    with pytest.raises(ValueError, match="has step 2 but is written for step 1"):
        write_sample_records(run, 1, [dict(good, step=2)])
    with pytest.raises(ValueError, match="tokens must be strings"):
        write_sample_records(run, 1, [dict(good, tokens=list(range(10)))])
    with pytest.raises(ValueError, match="sample record 0"):
        write_sample_records(run, 1, [dict(good, token_ids=[0.5] * 10)])
    assert not (tmp_path / "run" / "samples" / "step_00000001.jsonl").exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match="no samples for step 4 .*steps with samples: none"):
        read_sample_records(run, 4)


# -------------------------------------------------------------------------------------------- visualize

class _Spans(HTMLParser):
    """Collects each token span of the S and weight rows: (row, title, background, text)."""

    def __init__(self):
        super().__init__()
        self.row, self.spans, self.depth, self.current, self.counts = None, [], 0, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        cls = (attrs.get("class") or "").split()
        if tag == "div" and "row" in cls:
            self.row = cls[1]
        if tag == "rect" and "bin" in cls:
            self.counts.append(int(attrs["data-count"]))
        if tag == "span":
            if self.current is not None:
                self.depth += 1
            elif "tok" in cls and self.row is not None:
                background = dict(p.split(":") for p in attrs["style"].split(";"))["background"]
                self.current = [self.row, attrs["title"], background, ""]

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            if self.depth:
                self.depth -= 1
            else:
                self.spans.append(tuple(self.current))
                self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current[3] += data


def _saturation(hex_color):
    r, g, b = (int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hsv(r, g, b)[1]


def _rgb(hex_color):
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    records = make_records()
    write_sample_records(str(run), 2, [dict(records[1], prompt_index=0)])
    write_sample_records(str(run), 4, records)
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step in range(1, 5):
            f.write(json.dumps({"step": step, "time": 0.0, "vd/score_mean": 0.1 * step,
                                "reward/accuracy": 0.25 * step}) + "\n")
    return run


def test_html_shows_every_token_with_exact_values_and_colours(run_dir, tmp_path):
    result = visualize(str(run_dir), str(tmp_path / "out"), png=False)  # default: the latest step (4)
    assert result.steps == [4] and result.num_responses == 2 and result.num_tokens == 17
    page = result.html_path.read_text(encoding="utf-8")
    assert result.html_path == tmp_path / "out" / "visual_dependency.html"
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")

    for tok in TOKENS + GRPO_TOKENS:
        if "\n" not in tok:
            assert html.escape(tok) in page
    assert "<|im_end|>" not in page and "<think>" not in page and "a & b" not in page
    assert "What colour is the &lt;square&gt; &amp; its border?" in page

    parser = _Spans()
    parser.feed(page)
    records = make_records()
    for row in ("S", "weight"):
        spans = [s for s in parser.spans if s[0] == row]
        assert len(spans) == 17  # both responses, every token, once per row
        for (_, title, _, text), tok, tid, s, w in zip(
                spans, TOKENS + GRPO_TOKENS, [*range(100, 110), *records[1]["token_ids"]],
                SCORES + records[1]["scores"], WEIGHTS + records[1]["weights"]):
            assert title.splitlines() == [repr(tok), f"S = {s!r}", f"weight = {w!r}", f"token id = {tid}",
                                          title.splitlines()[-1]]
            if tok and "\n" not in tok:
                assert text == tok
    assert [s[3] for s in parser.spans if s[0] == "S"][4] == "\u21b5\n"  # a newline token is visible and breaks

    s_colors = [s[2] for s in parser.spans if s[0] == "S"]
    saturation = [_saturation(c) for c in s_colors]
    all_scores = SCORES + records[1]["scores"]
    assert saturation.index(max(saturation)) == all_scores.index(max(all_scores)) == 7
    assert s_colors[3] == "#ffffff"  # S = 0 is the page's minimum: white
    # monotone: a larger S is never lighter
    by_score = [sat for _, sat in sorted(zip(all_scores, saturation))]
    assert by_score == sorted(by_score)

    w_colors = [s[2] for s in parser.spans if s[0] == "weight"]
    r, g, b = _rgb(w_colors[7])
    assert r > 150 and g < 60 and b < 60  # the largest weight: full red
    r, g, b = _rgb(w_colors[3])
    assert b > r  # weight 0: blue
    assert w_colors[6] == "#ffffff" and set(w_colors[10:]) == {"#ffffff"}  # weight 1.0 (and GRPO's) is white

    # the histogram covers every token of the chosen step, in the page and in the result
    assert sum(result.hist_counts) == 17 == sum(parser.counts)
    assert parser.counts == result.hist_counts and len(result.hist_edges) == len(result.hist_counts) + 1
    assert result.hist_edges[0] == -8 and result.hist_counts[:2] == [1, 1]  # S = 0 at -8; S = 1e-8 at -7.7
    assert result.hist_edges[-1] == 1  # log10(3.75) = 0.57 -> the last whole decade ends at 1
    assert 'class="metric"' in page and "mean visual dependency S" in page


def test_png_is_a_valid_image_and_steps_are_selectable(run_dir, tmp_path):
    from PIL import Image

    result = visualize(str(run_dir), str(tmp_path / "out"), steps="all", max_responses=1)
    assert result.steps == [2, 4] and result.num_responses == 3 and result.num_shown == 1
    assert sum(result.hist_counts) == result.num_tokens == 24
    with Image.open(result.png_path) as image:
        image.verify()
    with Image.open(result.png_path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
    page = result.html_path.read_text(encoding="utf-8")
    assert "Responses (1 of 3)" in page and page.count('<div class="card') == 1
    assert visualize(str(run_dir), str(tmp_path / "o2"), steps=2, png=False).num_tokens == 7
    with pytest.raises(VisualizationError, match="no samples for step 3 .*steps with samples: 2, 4"):
        visualize(str(run_dir), str(tmp_path / "o3"), steps=[3])


def test_empty_run_dir_says_what_to_do(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(VisualizationError, match=r"no sample records in .*logging\.samples_every > 0"):
        visualize(str(tmp_path / "run"))
    with pytest.raises(VisualizationError, match="does not exist"):
        visualize(str(tmp_path / "missing"))


def test_cli(run_dir, tmp_path):
    cli = [sys.executable, "-m", "megatron_pgpo.cli", "visualize"]
    out = tmp_path / "cli_out"
    proc = subprocess.run([*cli, str(run_dir), "--step", "4", "--out", str(out), "--max-responses", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step 4: 2 responses (1 shown), 17 tokens" in proc.stdout
    assert (out / "visual_dependency.html").stat().st_size > 0 and (out / "visual_dependency.png").stat().st_size > 0
    assert "Responses (1 of 2)" in (out / "visual_dependency.html").read_text(encoding="utf-8")

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([*cli, str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "logging.samples_every" in proc.stderr and "Traceback" not in proc.stderr


def test_benchmark_series_get_their_own_panel():
    from megatron_pgpo.visualize.html_page import _metric_panels

    metrics = {"eval/accuracy": [(1, 0.5)], "eval/geo3k/avg@8": [(1, 0.4), (2, 0.5)],
               "eval/mathverse/avg@8": [(2, 0.3)], "eval/geo3k/pass@8": [(1, 0.9)]}
    panels = dict(_metric_panels(metrics))
    assert [label for label, _, _ in panels["benchmarks (avg@k)"]] == ["geo3k", "mathverse"]
    assert panels["benchmarks (avg@k)"][0][2] == [(1, 0.4), (2, 0.5)]
    assert [label for label, _, _ in panels["accuracy"]] == ["held-out"]
