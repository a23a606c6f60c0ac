"""What a comparison leaves behind and reads: the report folder, results.json, the CLI, prompt sets, OCR, and the model
card's model-index."""

from __future__ import annotations

import html
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from flux_small_encoder.cli import main
from flux_small_encoder.evaluation.prompts import PROMPT_SETS, load_eval_prompts, quoted_text

RECORD_KEYS = {"encoder", "prompt", "seed", "psnr", "ssim", "embedding_cosine", "trajectory_error"}


class _Page(HTMLParser):
    """The text, image sources, links and scripts of a page."""

    def __init__(self):
        super().__init__()
        self.text, self.sources, self.links, self.scripts = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        elif tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """`compare --tiny`: a tiny random FLUX against a tiny student and the quanto-int8 teacher, through the CLI."""
    out = tmp_path_factory.mktemp("compare") / "report"
    assert main(["compare", "--tiny", "--out", str(out), "--seeds", "0,1",
                 "--cache-dir", str(out.parent / "cache")]) == 0
    return out


def test_index_lists_every_prompt_and_every_image_it_references_exists(report):
    page = _Page()
    page.feed((report / "index.html").read_text(encoding="utf-8"))
    text = " ".join(" ".join(page.text).split())
    prompts = [record["prompt"] for record in json.loads((report / "results.json").read_text())["records"]]
    assert prompts and all(prompt in text for prompt in set(prompts))
    # Every image and link is a relative path to a file of the folder: the report opens offline.
    assert page.sources and page.scripts == 0
    for reference in page.sources + page.links:
        assert "://" not in reference and not reference.startswith("/"), reference
        assert (report / reference).is_file(), reference
    encoders = ("teacher", "tiny-student", "teacher@quanto-int8")
    assert all(f"{name} (" in text for name in encoders)  # each in the summary table


def test_results_json_has_the_keys(report):
    results = json.loads((report / "results.json").read_text())
    encoders = [entry["encoder"] for entry in results["encoders"]]
    assert encoders == ["teacher", "tiny-student", "teacher@quanto-int8"]
    assert len(results["records"]) == 3 * 2 * len({r["prompt"] for r in results["records"]})
    for record in results["records"]:
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        for key in ("image", "teacher_image", "heatmap"):
            assert (report / record[key]).is_file()
        if quoted_text(record["prompt"]):
            assert {"ocr_accuracy", "teacher_ocr_accuracy"} <= set(record)
    for name in encoders:
        summary = results["summary"][name]
        assert set(summary["metrics"]["psnr"]) >= {"mean", "median", "worst"}
        assert {"commontext", "3d_spatial"} & set(summary["categories"])
        worst = [entry["ssim"] for entry in summary["worst_prompts"]]
        assert worst == sorted(worst)
    assert "lpips" in results["skipped_metrics"]
    for name in encoders:
        assert (report / "grids" / f"{name if name != 'teacher' else 'teacher-candidate'}.png").is_file()


def test_an_existing_report_is_kept_unless_overwrite(report, capsys):
    before = (report / "results.json").read_bytes()
    assert main(["compare", "--tiny", "--out", str(report)]) == 2
    assert "already holds a report: choose another --out, or pass --overwrite" in capsys.readouterr().err
    assert (report / "results.json").read_bytes() == before


def test_a_folder_holding_a_report_name_and_other_files_is_refused_even_with_overwrite(tmp_path, capsys):
    """index.html alone does not make a report: --overwrite would replace the whole folder, css/ and notes with it."""
    (tmp_path / "index.html").write_text("<p>my site</p>")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "css").mkdir()
    (tmp_path / "css" / "site.css").write_text("p {}")
    assert main(["compare", "--tiny", "--out", str(tmp_path), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path} holds css/, notes.txt, which a report does not: choose a new or empty folder for --out, "
        "or move what you want to keep out of it (nothing was written).\n"
    )
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        "css", "css/site.css", "index.html", "notes.txt"]


def test_a_report_folder_is_replaced_only_while_it_holds_nothing_else(report, tmp_path):
    from flux_small_encoder.evaluation.report import check_report_folder

    copy = tmp_path / "report"
    shutil.copytree(report, copy)
    check_report_folder(copy, overwrite=True)  # the report and nothing else: replaceable
    (copy / "images" / "teacher" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds images/teacher/notes.txt, which a report does not"):
        check_report_folder(copy, overwrite=True)
    (copy / "images" / "teacher" / "notes.txt").unlink()
    (copy / "results.json").write_text(json.dumps({"model": "mine"}))
    with pytest.raises(FileExistsError, match=r"holds no results.json written by compare, so it is not a report"):
        check_report_folder(copy, overwrite=True)


def test_an_empty_prompt_set_is_refused_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["compare", "--tiny", "--prompts", str(empty), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no prompts in") and error.count("\n") == 1
    assert not (tmp_path / "report").exists()


# --- prompt sets ----------------------------------------------------------------------------------------------------


def test_named_prompt_sets_are_shipped_with_their_categories():
    compbench = load_eval_prompts("compbench-val")
    categories = {"color", "shape", "texture", "spatial", "3d_spatial", "non_spatial", "numeracy", "complex"}
    assert {prompt.category for prompt in compbench} == categories and len(compbench) > 2000
    commontext = load_eval_prompts("commontext-test")
    assert len(commontext) == 1000 and all(prompt.quoted_text for prompt in commontext)
    assert set(PROMPT_SETS) == {"compbench-val", "commontext-test"}


def test_name_n_takes_a_seeded_sample_and_files_take_their_stem(tmp_path):
    sample = load_eval_prompts("compbench-val:40", seed=1)
    assert len(sample) == 40 and sample == load_eval_prompts("compbench-val:40", seed=1)
    assert sample != load_eval_prompts("compbench-val:40", seed=2)
    mine = tmp_path / "my_prompts.txt"
    mine.write_text("a red cube\n\na blue cube\n")
    prompts = load_eval_prompts(f"commontext-test:3,{mine}")
    assert [prompt.category for prompt in prompts] == ["commontext"] * 3 + ["my_prompts"] * 2
    with pytest.raises(ValueError, match="no prompt set or file 'compbench-test'"):
        load_eval_prompts("compbench-test:4")


def test_quoted_text():
    assert quoted_text("A poet presenting a board that says 'army'.") == "army"
    assert quoted_text('a sign reading "open late"') == "open late"
    assert quoted_text("a cat's sign that says 'don't stop'") == "don't stop"
    assert quoted_text("a red cube") is None


# --- OCR ------------------------------------------------------------------------------------------------------------


def test_ocr_reads_pillow_drawn_text_exactly_and_an_empty_image_scores_zero():
    from PIL import Image, ImageDraw, ImageFont

    from flux_small_encoder.evaluation.ocr import TextReader, character_accuracy

    image = Image.new("RGB", (320, 72), "white")
    ImageDraw.Draw(image).text((12, 18), "Hello World", fill="black", font=ImageFont.load_default(size=32))
    reader = TextReader()
    assert reader.read(np.array(image)) == "Hello World"
    assert reader.accuracy(np.array(image), "hello world") == 1.0
    blank = np.full((72, 320, 3), 255, dtype=np.uint8)
    assert reader.read(blank) == "" and reader.accuracy(blank, "hello world") == 0.0
    assert character_accuracy("radar", "rader") == pytest.approx(0.8)


def test_compare_without_rapidocr_reports_ocr_as_skipped_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if not installed: its import fails
    out = tmp_path / "report"
    assert main(["compare", "--tiny", "--encoders", "teacher", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache")]) == 0  # the default prompts quote text
    reason = "rapidocr-onnxruntime is not installed (pip install 'flux-small-encoder[eval]')"
    assert capsys.readouterr().out.splitlines()[0] == f"OCR skipped: {reason}"
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_metrics"]["ocr_accuracy"] == reason
    assert not any("ocr_accuracy" in record for record in results["records"])
    assert f"OCR char. accuracy skipped: {reason}." in html.unescape((out / "index.html").read_text())


# --- the model card -------------------------------------------------------------------------------------------------


def test_push_card_carries_the_comparison_as_model_index(report, tmp_path, student):
    from flux_small_encoder import model_card

    folder = tmp_path / "model"
    student.save_pretrained(folder)
    results = json.loads((report / "results.json").read_text())
    (folder / "results.json").write_text(json.dumps(results))
    card = model_card.model_card(folder, "me/tiny", results=model_card.read_results(folder))
    [entry] = card.data.to_dict()["model-index"]
    metrics = {metric["type"]: metric for metric in entry["results"][0]["metrics"]}
    assert {"psnr", "ssim", "embedding_cosine", "trajectory_error"} <= set(metrics)
    assert metrics["psnr"]["value"] == pytest.approx(results["summary"]["tiny-student"]["metrics"]["psnr"]["mean"],
                                                     rel=1e-3)
    assert "vs the T5 encoder of tiny" in metrics["psnr"]["name"]
    assert entry["results"][0]["dataset"]["name"] == "commontext-test:1+compbench-val:3"
    assert "## Fidelity to the teacher" in card.text
    # Two distilled candidates: which one is this folder? Refused, not guessed.
    results["encoders"].append({**results["encoders"][1], "encoder": "other"})
    with pytest.raises(ValueError, match="compares 2 distilled encoders"):
        model_card.model_card(folder, "me/tiny", results=results)


# --- a pipeline folder, and CLIP ------------------------------------------------------------------------------------


def tiny_clip(folder: Path) -> Path:
    """A tiny random transformers CLIP model and its processor, saved to `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flux_small_encoder.tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    config = CLIPConfig(
        text_config=dict(**common, vocab_size=600, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(**common, image_size=32, patch_size=8), projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer()).save_pretrained(folder)
    return folder


def test_compare_a_pipeline_folder_with_clip_scores(make_pipe, tmp_path):
    """`--model FOLDER`: the teacher is the folder's text_encoder_2 (teacher@METHOD reads it from there), and `--clip`
    scores candidate and teacher images with a local CLIP."""
    make_pipe().save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "report"
    assert main(["compare", "--model", str(tmp_path / "pipe"), "--encoders", "teacher,teacher@quanto-int8",
                 "--prompts", str(prompts), "--steps", "2", "--size", "32", "--max-sequence-length", "32",
                 "--dtype", "float32", "--clip", str(tiny_clip(tmp_path / "clip")), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(tmp_path / "pipe")
    assert {record["category"] for record in results["records"]} == {"prompts"}
    for record in results["records"]:
        assert 0 <= record["clip_score"] <= 100 and 0 <= record["teacher_clip_score"] <= 100
        if record["encoder"] == "teacher":
            assert record["clip_score"] == record["teacher_clip_score"]
    assert "clip_score" in results["reference"]["summary"]["metrics"]


@pytest.mark.parametrize("folder", ["encoder", "empty"])
def test_a_clip_folder_that_is_not_a_clip_model_is_one_line_before_loading(folder, student, tmp_path, capsys):
    """`--clip` given a saved encoder (or a folder without config.json) is refused from its config.json, before
    transformers prints a load report and fails on the processor."""
    from .test_cli import one_line_error

    clip = tmp_path / folder
    if folder == "encoder":
        student.save_pretrained(clip)
    else:
        clip.mkdir()
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red cube\n")
    capsys.readouterr()  # what saving the encoder printed
    assert main(["compare", "--tiny", "--encoders", "teacher", "--prompts", str(prompts), "--clip", str(clip),
                 "--out", str(tmp_path / "report")]) == 2
    line = one_line_error(capsys)
    model_type = json.loads((clip / "config.json").read_text())["model_type"] if folder == "encoder" else None
    problem = f"(its config says model_type {model_type!r})" if model_type else "it has no config.json"
    assert line.startswith(f"error: --clip {clip} is not a CLIP model") and problem in line
    assert "openai/clip-vit-large-patch14 downloaded with hf download" in line
    assert not (tmp_path / "report").exists()
