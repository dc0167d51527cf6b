"""Published hallucination benchmarks as evaluate data sources: their released files, read as their official
scripts read them, scored as those scripts score them (``jobs.metrics``). A recipe names them in
``evaluate.benchmarks``; their metrics are reported as ``<name>_<metric>`` (``amber_f1``, ``pope_random_yes_ratio``).

AMBER, discriminative task (github.com/junyangwang0410/AMBER; images from the link in its README):
    path         data/query/query_discriminative.json   [{"id": 1005, "image": "AMBER_1.jpg", "query": "Is the sky ..."}]
    annotations  data/annotations.json                  [{"id": 1, "type": "generative", "truth": [...], ...}, ...,
                                                         {"id": 1005, "type": "discriminative-attribute-state", "truth": "yes"}]
                 (inference.py reads the annotation of id i at position i - 1, and so do we, checking the id)
    images       the folder holding AMBER_1.jpg ...
POPE (github.com/RUCAIBox/POPE, over COCO val2014):
    path         output/coco/coco_pope_{adversarial,popular,random}.json   one JSON object a line:
                 {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a ...?", "label": "yes"}
    images       the COCO val2014 folder

Rows come out as evaluate's other rows do: a user turn with the image and the question (plus the benchmark's
``prompt_suffix``), the image shrunk as prepare shrinks training images; and the benchmark's name, the question's
id and its gold answer (``label``).
A missing or malformed file or image is a user error naming the recipe key and the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.contract import UserError
from jobs.metrics import METRICS


@dataclass(frozen=True)
class Kind:
    read: Callable  # (Benchmark, where) -> [(id, image file name, question, label)]
    score: Callable[[list[str], list[str]], dict]  # (answers, labels) -> metrics, as the official script
    correct: Callable[[str, str], bool]  # (answer, label) -> whether the official script counts it right
    description: str
    metrics: dict[str, str]  # the keys of score's result, as the official script prints them: their definitions


def _load_json(path: str | Path, where: str, *, lines: bool = False):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: {path} is not {'JSON lines' if lines else 'JSON'} ({e})") from None


def read_amber(bench, where: str) -> list[tuple]:
    if not bench.annotations:
        raise UserError(f"{where}.annotations: AMBER needs its annotations.json (data/annotations.json of the AMBER repository)")
    queries = _load_json(bench.path, f"{where}.path")
    annotations = _load_json(bench.annotations, f"{where}.annotations")
    rows = []
    for query in queries:
        try:
            number, image, question = int(query["id"]), str(query["image"]), str(query["query"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}.path: {bench.path}: every query needs id, image and query; found {query!r:.80}") from None
        truth = annotations[number - 1] if 0 < number <= len(annotations) else None
        if not isinstance(truth, dict) or truth.get("id") != number:
            raise UserError(f"{where}.annotations: {bench.annotations} has no annotation for id {number} at position {number - 1}")
        if not str(truth.get("type", "")).startswith("discriminative") or truth.get("truth") not in ("yes", "no"):
            raise UserError(f"{where}.path: query {number} is not a discriminative yes/no question in {bench.annotations}; "
                            "use query_discriminative.json")
        rows.append((number, image, question, truth["truth"]))
    return rows


def read_pope(bench, where: str) -> list[tuple]:
    rows = []
    for question in _load_json(bench.path, f"{where}.path", lines=True):
        try:
            rows.append((question["question_id"], str(question["image"]), str(question["text"]), str(question["label"])))
        except (KeyError, TypeError):
            raise UserError(f"{where}.path: {bench.path}: every line needs question_id, image, text and label; "
                            f"found {question!r:.80}") from None
    return rows


def _amber_correct(answer: str, label: str) -> bool:
    return answer == ("Yes" if label == "yes" else "No")


def _pope_correct(answer: str, label: str) -> bool:
    from jobs.metrics import pope_answer

    return pope_answer(answer) == ("no" if label == "no" else "yes")


def _amber_score(answers, labels):
    from jobs.metrics import amber_discriminative

    return amber_discriminative(answers, labels)


def _pope_score(answers, labels):
    from jobs.metrics import pope_scores

    return pope_scores(answers, labels)


KINDS = {
    "amber": Kind(read_amber, _amber_score, _amber_correct,
                  "AMBER discriminative task (junyangwang0410/AMBER inference.py)", {
        "accuracy": "answers exactly `Yes` where the truth is yes or `No` where it is not, over all questions",
        "precision": "answered `No` where the truth is no, over the answers `No` (no is the positive class: "
                     "saying no to what is not there)",
        "recall": "answered `No` where the truth is not yes, over those questions",
        "f1": "from precision and recall rounded to 0.1%, as the script prints it",
    }),
    "pope": Kind(read_pope, _pope_score, _pope_correct, "POPE (RUCAIBox/POPE evaluate.py)", {
        "accuracy": "answers read right (no when the first sentence has the word no or not, else yes), over all "
                    "questions",
        "precision": "answers read yes where the label is yes, over the answers read yes",
        "recall": "answers read yes where the label is yes, over the yes labels",
        "f1": "of precision and recall, yes being the positive class",
        "yes_ratio": "answers read yes, over all questions (0.5 is balanced)",
    }),
}


def load(bench, where: str, shrink=lambda image: image) -> list[dict]:
    """The benchmark's questions as evaluate rows (the first ``bench.max_samples``); each image opened once."""
    from PIL import Image

    questions = KINDS[bench.format].read(bench, where)
    if bench.max_samples:
        questions = questions[: bench.max_samples]
    images: dict[str, object] = {}
    rows = []
    for number, name, question, label in questions:
        if name not in images:
            path = Path(bench.images) / name
            try:
                with Image.open(path) as opened:
                    images[name] = shrink(opened.convert("RGB"))
            except FileNotFoundError:
                raise UserError(f"{where}.images: {path}: no such image (question {number})") from None
            except OSError as e:
                raise UserError(f"{where}.images: {path} does not decode ({e})") from None
        text = f"{question} {bench.prompt_suffix}" if bench.prompt_suffix else question
        rows.append({
            "benchmark": bench.key, "id": number, "label": label, "images": [images[name]],
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}],
        })
    return rows


def benchmark_metrics(benchmarks) -> tuple[str, ...]:
    """The names the recipe's evaluate.benchmarks are reported under."""
    return tuple(f"{bench.key}_{name}" for bench in benchmarks for name in KINDS[bench.format].metrics)


def metric_definitions(benchmarks) -> dict[str, str]:
    """Every metric evaluate can report for these benchmarks, with its definition (report.json's ``definitions``)."""
    definitions = {name: text for names in METRICS.values() for name, text in names.items()}
    for bench in benchmarks:
        kind = KINDS[bench.format]
        definitions |= {f"{bench.key}_{name}": f"{kind.description}: {text}" for name, text in kind.metrics.items()}
    return definitions
