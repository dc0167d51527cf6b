"""AMBER's and POPE's released files read into evaluate rows field by field, and every way they can be wrong named in
one line (issue 26: mutants make mutate found surviving test_benchmarks.py). The files are written in the released
layouts by jobs.synthetic; what a row must hold is read straight from them, as the official scripts read them."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from jobs import benchmarks, synthetic
from jobs import recipe as recipes
from jobs.contract import UserError

WHERE = "evaluate.benchmarks[0]"


def amber(folder, **extra) -> recipes.Benchmark:
    entry = {"format": "amber", "path": str(folder / "data" / "query" / "query_discriminative.json"),
             "annotations": str(folder / "data" / "annotations.json"), "images": str(folder / "image")}
    return recipes.Benchmark(**(entry | extra))


def pope(folder) -> recipes.Benchmark:
    return recipes.Benchmark(format="pope", name="pope_random", path=str(folder / "output" / "coco" / "coco_pope_random.json"),
                             images=str(folder / "val2014"))


def prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}]


def small(image):
    return image.resize((8, 6))


def test_amber_rows_are_its_queries_with_the_annotation_at_position_id_minus_1(tmp_path):
    folder = synthetic.write("amber", tmp_path, rows=4)  # 2 images: generative annotations 1-2, queries 3-6
    with Image.open(folder / "image" / "AMBER_2.jpg") as colour:  # a greyscale JPEG, as some photographs are
        colour.convert("L").save(folder / "image" / "AMBER_2.jpg")
    queries = json.loads((folder / "data" / "query" / "query_discriminative.json").read_text())
    annotations = json.loads((folder / "data" / "annotations.json").read_text())
    rows = benchmarks.load(amber(folder, prompt_suffix="Answer with Yes or No."), WHERE, shrink=small)
    assert [(row["benchmark"], row["id"], row["label"]) for row in rows] == [
        ("amber", q["id"], annotations[q["id"] - 1]["truth"]) for q in queries]
    assert [row["prompt"] for row in rows] == [prompt(f"{q['query']} Answer with Yes or No.") for q in queries]
    assert [q["image"] for q in queries] == ["AMBER_1.jpg", "AMBER_1.jpg", "AMBER_2.jpg", "AMBER_2.jpg"]
    assert rows[0]["images"][0] is rows[1]["images"][0]  # each image opened and shrunk once
    assert all(len(row["images"]) == 1 and row["images"][0].size == (8, 6) and row["images"][0].mode == "RGB" for row in rows)
    with Image.open(folder / "image" / "AMBER_2.jpg") as original:
        assert list(rows[2]["images"][0].getdata()) == list(small(original.convert("RGB")).getdata())
    first = benchmarks.load(amber(folder, max_samples=3), WHERE)
    assert [row["id"] for row in first] == [3, 4, 5] and first[0]["prompt"] == prompt(queries[0]["query"])


def test_pope_rows_are_its_json_lines(tmp_path):
    folder = synthetic.write("pope", tmp_path, rows=3)
    lines = [json.loads(line) for line in (folder / "output" / "coco" / "coco_pope_random.json").read_text().splitlines()]
    rows = benchmarks.load(pope(folder), WHERE)
    assert [(row["benchmark"], row["id"], row["label"], row["prompt"]) for row in rows] == [
        ("pope_random", line["question_id"], line["label"], prompt(line["text"])) for line in lines]
    assert len(lines) == 3 and rows[0]["images"][0].size == Image.open(folder / "val2014" / lines[0]["image"]).size


def errors(bench) -> str:
    with pytest.raises(UserError) as error:
        benchmarks.load(bench, WHERE)
    return str(error.value)


def test_every_broken_amber_file_is_one_line_naming_the_recipe_key_and_the_file(tmp_path):
    folder = synthetic.write("amber", tmp_path, rows=2)
    query_file, annotation_file = folder / "data" / "query" / "query_discriminative.json", folder / "data" / "annotations.json"
    assert errors(amber(folder, annotations=None)) == (
        f"{WHERE}.annotations: AMBER needs its annotations.json (data/annotations.json of the AMBER repository)")
    assert errors(amber(folder, path=str(tmp_path / "gone.json"))) == f"{WHERE}.path: {tmp_path / 'gone.json'}: no such file"
    annotations = json.loads(annotation_file.read_text())
    annotation_file.write_text("[{")
    assert errors(amber(folder)).startswith(f"{WHERE}.annotations: {annotation_file} is not JSON (")
    annotation_file.write_text(json.dumps(annotations))

    def with_queries(queries) -> str:
        query_file.write_text(json.dumps(queries))
        return errors(amber(folder))

    assert with_queries([{"id": 3, "image": "AMBER_1.jpg"}]) == (
        f"{WHERE}.path: {query_file}: every query needs id, image and query; found {{'id': 3, 'image': 'AMBER_1.jpg'}}")
    # id 1 is position 0, a generative annotation; id 0 would be position -1, which Python reads as the last one
    assert with_queries([{"id": 1, "image": "AMBER_1.jpg", "query": "q"}]) == (
        f"{WHERE}.path: query 1 is not a discriminative yes/no question in {annotation_file}; use query_discriminative.json")
    assert with_queries([{"id": 0, "image": "AMBER_1.jpg", "query": "q"}]) == (
        f"{WHERE}.annotations: {annotation_file} has no annotation for id 0 at position -1")
    annotations[2]["truth"] = ["bar"]  # discriminative, but no yes/no truth
    annotation_file.write_text(json.dumps(annotations))
    assert with_queries([{"id": 3, "image": "AMBER_1.jpg", "query": "q"}]).startswith(f"{WHERE}.path: query 3 is not")


def test_every_broken_pope_file_or_image_is_one_line_naming_the_recipe_key(tmp_path):
    folder = synthetic.write("pope", tmp_path, rows=2)
    questions = folder / "output" / "coco" / "coco_pope_random.json"
    lines = questions.read_text().splitlines()
    questions.write_text(lines[0] + "\n" + json.dumps({"question_id": 2, "image": "x.jpg", "text": "q"}) + "\n")
    assert errors(pope(folder)) == (f"{WHERE}.path: {questions}: every line needs question_id, image, text and label; "
                                    "found {'question_id': 2, 'image': 'x.jpg', 'text': 'q'}")
    questions.write_text("\n".join(lines) + "\n")
    image = folder / "val2014" / json.loads(lines[0])["image"]
    image.write_bytes(b"not a jpeg")
    assert errors(pope(folder)).startswith(f"{WHERE}.images: {image} does not decode (")


@pytest.mark.parametrize("kind, answer, label, correct", [
    # AMBER inference.py: right only as exactly "Yes" to a yes truth or "No" to any other
    ("amber", "Yes", "yes", True), ("amber", "No", "no", True), ("amber", "yes", "yes", False),
    ("amber", "No", "yes", False), ("amber", "Yes", "no", False), ("amber", "No.", "no", False),
    # POPE evaluate.py: the answer as pope_answer reads it against the label, "no" the only negative one
    ("pope", "No, there is none.", "no", True), ("pope", "I think so", "yes", True), ("pope", "There is not.", "yes", False),
    ("pope", "Yes", "no", False),
])
def test_each_answer_is_judged_as_the_official_script_judges_it(kind, answer, label, correct):
    assert benchmarks.KINDS[kind].correct(answer, label) is correct


def test_each_benchmark_is_scored_by_its_official_rule():
    from jobs.metrics import amber_discriminative, pope_scores

    answers, labels = ["Yes", "No", "No.", "There is not"], ["yes", "no", "no", "yes"]
    assert benchmarks.KINDS["amber"].score(answers, labels) == amber_discriminative(answers, labels)
    assert benchmarks.KINDS["pope"].score(answers, labels) == pope_scores(answers, labels)
    assert set(benchmarks.KINDS["pope"].score(answers, labels)) == set(benchmarks.KINDS["pope"].metrics)
