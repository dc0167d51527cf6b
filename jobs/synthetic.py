"""Synthetic data in the real data sets' schemas, for tests and the demo.

Written as the hub lays data sets out (parquet with image bytes under ``data/``, splits declared in
the README's YAML), so ``datasets.load_dataset(folder)`` reads them exactly as it reads the hub.
Every answer follows from the picture (a bar's colour, how many bars, a bar's value, whether a colour is present),
so a model that learns shows it in the numbers. The data varies where real data does, so that a wrong number shows
(issue 26): images of different sizes; ChartQA values with a decimal, read approximately, where relaxed accuracy (5%)
and exact match disagree; preference pairs whose chosen and rejected answers differ in length (a bare "Yes" against
"No."); yes/no answers of both classes.

    ChartQA-shaped    image, query, label (list of strings), human_or_machine     splits train, val, test
    RLAIF-V-shaped    ds_name, image, question, chosen, rejected, origin_dataset,  split train
                      origin_split, idx, image_path
    messages          messages (role/content parts), images                       splits train, test
    preference-       chosen, rejected, images, prompt (messages, as              splits train, test
    messages          HuggingFaceH4/rlaif-v_formatted)
    open-r1           image, problem, solution, original_question,                split train
                      original_answer (lmms-lab/multimodal-open-r1-8k-verified)

and the benchmarks evaluate reads in their released files (jobs.benchmarks), laid out as their repositories:

    amber             data/query/query_discriminative.json, data/annotations.json, image/AMBER_<n>.jpg
    pope              output/coco/coco_pope_{adversarial,popular,random}.json (JSON lines), val2014/COCO_val2014_<n>.jpg

Benchmark questions come in pairs per image, first the colour it has ("yes"), then one it lacks ("no").

    vlmjobs synth-data --kind chartqa --out .cache/data/chartqa --rows 400
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from jobs.contract import UserError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
WIDTH, HEIGHT = 72, 72  # square, so that center-cropping processors (CLIP) keep every bar; larger than the tiny 32 px
# Each image's side, drawn per row: square, for the same reason, but of varying size as real charts are (what
# dynamic-resolution processors such as Qwen2-VL's turn into differing token counts).
SIDES = (56, 96)
MAX_BARS = 3
# About this share of the ChartQA rows ask a bar's value, one decimal on a 1-9 scale (ChartQA's answers are mostly
# numbers read off the chart): a model reads it approximately, and relaxed accuracy counts a reading within 5%.
VALUE_SHARE = 0.15


def chart(bars: list[tuple[str, int]], size: tuple[int, int] = (WIDTH, HEIGHT)) -> bytes:
    """A bar chart as PNG bytes: one bar per (colour, value 1..9, a whole number or not), left to right, on white."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    slot = width // len(bars)
    margin = max(1, min(4, slot // 4, height // 8))
    for i, (colour, value) in enumerate(bars):
        top = height - margin - int(value * (height - 2 * margin) / 9)
        draw.rectangle([i * slot + margin, top, (i + 1) * slot - margin, height - margin], fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _random_bars(rng: random.Random) -> list[tuple[str, int]]:
    colours = rng.sample(list(COLOURS), rng.randint(1, MAX_BARS))
    values = rng.sample(range(1, 10), len(colours))
    return list(zip(colours, values))


def chartqa_question(rng: random.Random) -> tuple[list[tuple[str, int]], str, str]:
    """A chart and a question about it: the colour of a lone bar, or how many bars there are."""
    if rng.random() < 0.5:
        bar = (rng.choice(list(COLOURS)), rng.randint(1, 9))
        return [bar], "What colour is the bar?", bar[0]
    bars = _random_bars(rng)
    return bars, "How many bars are there?", str(len(bars))


def _square(rng: random.Random) -> tuple[int, int]:
    side = rng.randint(*SIDES)
    return side, side


def value_question(rng: random.Random) -> tuple[list[tuple[str, float]], str, str]:
    """A lone bar and its value, 2.0 to 9.0 with one decimal: the readings next to it lie within 5% of it."""
    bar = (rng.choice(list(COLOURS)), rng.randint(20, 90) / 10)
    return [bar], "What is the value of the bar?", f"{bar[1]:.1f}"


def chartqa_rows(n: int, seed: int = 0, image_sides: tuple[int, int] | None = None) -> list[dict]:
    """ChartQA rows, each image square of a side in SIDES; ``image_sides`` (smallest, largest) draws each image's width
    and height from that range instead, of any aspect ratio (the bench's data)."""
    rng, sizes, values = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    rows = []
    for _ in range(n):
        bars, query, answer = chartqa_question(rng)
        if values.random() < VALUE_SHARE:  # its own stream: the other rows stay as they were without value questions
            bars, query, answer = value_question(values)
        size = (sizes.randint(*image_sides), sizes.randint(*image_sides)) if image_sides else _square(sizes)
        rows.append({"image": {"bytes": chart(bars, size), "path": None}, "query": query, "label": [answer],
                     "human_or_machine": rng.randint(0, 1)})
    return rows


def rlaif_v_rows(n: int, seed: int = 0, sentences: bool = False, chart_share: float = 0.15) -> list[dict]:
    """Yes/no questions about colours that may be absent, as RLAIF-V and AMBER ask about objects, the answer yes for
    about half. A yes is the bare word, a no has its full stop ("No."), so that the chosen and the rejected answer
    always differ in length (the full stop after "No" a model learns; which first word is right, it must see). Longer
    answers, where "No, there is no red bar." against "Yes" was tried, made the demo's DPO (raw log-probability sums
    compared) prefer the shorter answer instead of the right one.
    ``sentences``: the answers are descriptions of varying length, as RLAIF-V's are (the chosen one true, the rejected
    one not), for benchmarks; the charts and questions are the same as without. ``chart_share``: about this share of
    the rows ask a ChartQA question instead (the true answer chosen, a wrong one of its kind rejected), as RLAIF-V
    mixes many tasks; DPO on these keeps what SFT taught. The yes/no rows, in order, are the same whatever the share.
    Images are squares of varying side (SIDES)."""
    rng, wording, mixing = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    sizes = random.Random(seed + 3)
    rows = []
    for i in range(n):
        if mixing.random() < chart_share:
            rows.append(_chart_pair(i, mixing, _square(mixing)))  # from its own stream, as the yes/no rows are
            continue
        colour = "red"
        present = rng.random() < 0.5
        bars = _random_bars(rng)
        while any(c == colour for c, _ in bars) != present:
            bars = _random_bars(rng)
        yes, no = "Yes", "No"
        if sentences:
            truth = _description(colour, bars, present, wording)
            made_up = _description(colour, _random_bars(wording), not present, wording)
            yes, no = (truth, made_up) if present else (made_up, truth)
        else:  # a bare yes against a no with its full stop: the two always differ in length, by one token
            no = "No."
        rows.append({
            "ds_name": "synthetic-charts",
            "image": {"bytes": chart(bars, _square(sizes)), "path": None},
            "question": f"Is there a {colour} bar in the chart?",
            "chosen": yes if present else no,
            "rejected": no if present else yes,
            "origin_dataset": "vlmjobs.synthetic",
            "origin_split": "train",
            "idx": str(i),
            "image_path": f"synthetic/{i}.png",
        })
    return rows


def _chart_pair(i: int, rng: random.Random, size: tuple[int, int]) -> dict:
    bars, query, answer = chartqa_question(rng)
    kind = list(COLOURS) if query.startswith("What colour") else [str(k) for k in range(1, MAX_BARS + 1)]
    return {
        "ds_name": "synthetic-charts", "image": {"bytes": chart(bars, size), "path": None}, "question": query,
        "chosen": answer, "rejected": rng.choice([wrong for wrong in kind if wrong != answer]),
        "origin_dataset": "vlmjobs.synthetic", "origin_split": "train", "idx": str(i), "image_path": f"synthetic/{i}.png",
    }


def _description(colour: str, bars: list[tuple[str, int]], present: bool, rng: random.Random) -> str:
    """An answer that says whether ``colour`` is there and describes ``bars``, in one to four sentences."""
    said = f"Yes, there is a {colour} bar in the chart." if present else f"No, there is no {colour} bar in the chart."
    listed = ", ".join(f"a {c} bar of height {v}" for c, v in bars)
    sentences = [said, f"The chart has {len(bars)} bar{'s' * (len(bars) > 1)}: {listed}."]
    tallest = max(bars, key=lambda bar: bar[1])[0]
    extra = [f"The {tallest} bar is the tallest.", "The bars stand side by side on a white background.",
             "There is no title, legend or axis label."]
    return " ".join(sentences[: rng.randint(1, 2)] + rng.sample(extra, rng.randint(0, len(extra))))


def messages_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations with images in a column and {"type": "image"} placeholders in the messages."""
    rng, sizes = random.Random(seed), random.Random(seed + 1)
    rows = []
    for _ in range(n):
        bars, query, answer = chartqa_question(rng)
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": query}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "images": [{"bytes": chart(bars, _square(sizes)), "path": None}],
        })
    return rows


def multi_turn_messages_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations as HuggingFaceH4/llava-instruct-mix-vsft holds them (messages, images): one to three user/assistant
    turns, each a chart's question, its chart shown in the first user turn and, for some, in a later one too (a second
    image, of another size); others show none. Answers short and long (the chart described in a sentence or three)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages, images = [], []
        for turn in range(rng.randint(1, 3)):
            bars, query, answer = chartqa_question(rng)
            content = [{"type": "text", "text": query}]
            if turn == 0 or rng.random() < 0.5:
                side = rng.randint(24, 96)
                images.append({"bytes": chart(bars, (side, rng.randint(24, 96))), "path": None})
                content.insert(0, {"type": "image", "text": None})
            if rng.random() < 0.3:
                listed = ", ".join(f"a {colour} bar of height {value}" for colour, value in bars)
                answer = f"{answer}. The chart has {len(bars)} bar{'s' * (len(bars) > 1)}: {listed}."
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        rows.append({"messages": messages, "images": images})
    return rows


def preference_messages_rows(n: int, seed: int = 0) -> list[dict]:
    """RLAIF-V's questions in TRL's conversational preference format, as HuggingFaceH4/rlaif-v_formatted has them."""
    rows = []
    for row in rlaif_v_rows(n, seed):
        rows.append({
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": row["rejected"]}]}],
            "images": [row["image"]],
            "prompt": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": row["question"]}]}],
        })
    return rows


def open_r1_rows(n: int, seed: int = 0) -> list[dict]:
    """lmms-lab/multimodal-open-r1-8k-verified-shaped rows: a chart, a multiple-choice problem about it, and a solution
    that reasons in <think></think> and gives the choice's letter in <answer></answer>; a share of the solutions give
    the bare answer without tags (the format's reader takes the whole solution then), and one answer in a few is a long
    one, as free-text solutions are."""
    rng, sizes = random.Random(seed), random.Random(seed + 1)
    rows = []
    for _ in range(n):
        bars, query, answer = chartqa_question(rng)
        letters = "ABCD"
        wrong = [c for c in (list(COLOURS) if not answer.isdigit() else [str(i) for i in range(1, MAX_BARS + 2)]) if c != answer]
        options = rng.sample(wrong, 3) + [answer]
        rng.shuffle(options)
        letter = letters[options.index(answer)]
        problem = f"{query} Choose the correct answer from the options provided.\nChoices:\n" + "\n".join(
            f"{l}. {o}" for l, o in zip(letters, options))
        reasoning = f"The chart shows {len(bars)} bar{'s' if len(bars) > 1 else ''}: " + ", ".join(c for c, _ in bars) + "."
        if rng.random() < 0.2:
            solution = letter
        elif rng.random() < 0.1:
            solution = f"<think>{reasoning * 8}</think>\n<answer>{letter}</answer>"
        else:
            solution = f"<think>{reasoning}</think>\n<answer>{letter}</answer>"
        rows.append({"image": {"bytes": chart(bars, _square(sizes)), "path": None}, "problem": problem, "solution": solution,
                     "original_question": query, "original_answer": answer})
    return rows


def features(kind: str):
    from datasets import ClassLabel, Features, Image, List, Value

    text = Value("string")
    messages = List({"role": text, "content": List({"type": text, "text": text})})
    return {
        "chartqa": Features({"image": Image(), "query": text, "label": List(text), "human_or_machine": ClassLabel(names=["human", "machine"])}),
        "rlaif-v": Features({
            "ds_name": text, "image": Image(), "question": text, "chosen": text, "rejected": text,
            "origin_dataset": text, "origin_split": text, "idx": text, "image_path": text,
        }),
        "messages": Features({"messages": messages, "images": List(Image())}),
        "preference-messages": Features({"chosen": messages, "rejected": messages, "images": List(Image()), "prompt": messages}),
        "open-r1": Features({"image": Image(), "problem": text, "solution": text, "original_question": text,
                             "original_answer": text}),
    }[kind]


# Keyed by the source format (jobs.formats) whose schema the rows have.
ROWS = {"chartqa": chartqa_rows, "rlaif-v": rlaif_v_rows, "messages": messages_rows, "preference-messages": preference_messages_rows,
        "open-r1": open_r1_rows}
# Formats that read a subset of another's source: its rows
SAME_SCHEMA = {"rlaif-v-yes-no": "rlaif-v"}
# messages: HuggingFaceH4/llava-instruct-mix-vsft's train and test (issue 20's recipes read both)
SPLITS = {"chartqa": ("train", "val", "test"), "rlaif-v": ("train",), "messages": ("train", "test"),
          "preference-messages": ("train", "test"), "open-r1": ("train",)}


def _benchmark_questions(n: int, seed: int) -> list[tuple[int, bytes, str, str]]:
    """n questions, two per chart: (image number, JPEG bytes, question, "yes"/"no")."""
    from PIL import Image

    rng = random.Random(seed)
    questions = []
    for i in range((n + 1) // 2):
        bars = _random_bars(rng)
        present = rng.choice(bars)[0]
        absent = rng.choice([c for c in COLOURS if c not in {c for c, _ in bars}])
        buffer = io.BytesIO()
        Image.open(io.BytesIO(chart(bars))).convert("RGB").save(buffer, format="JPEG", quality=95)
        questions += [(i + 1, buffer.getvalue(), f"Is there a {present} bar in the chart?", "yes"),
                      (i + 1, buffer.getvalue(), f"Is there a {absent} bar in the chart?", "no")]
    return questions[:n]


def write_amber(out: str | Path, rows: int = 400, seed: int = 0) -> Path:
    """AMBER's discriminative files: a generative annotation per image first (ids 1..images), as AMBER numbers
    them, then a discriminative question per row, its annotation at position id - 1."""
    import json

    out = Path(out)
    questions = _benchmark_questions(rows, seed)
    images = max(number for number, *_ in questions)
    (out / "data" / "query").mkdir(parents=True, exist_ok=True)
    (out / "image").mkdir(parents=True, exist_ok=True)
    annotations = [{"id": i + 1, "type": "generative", "truth": ["bar"], "hallu": ["line"]} for i in range(images)]
    queries = []
    for number, jpeg, question, truth in questions:
        (out / "image" / f"AMBER_{number}.jpg").write_bytes(jpeg)
        queries.append({"id": len(annotations) + 1, "image": f"AMBER_{number}.jpg", "query": question})
        annotations.append({"id": len(annotations) + 1, "type": "discriminative-hallucination", "truth": truth})
    (out / "data" / "query" / "query_discriminative.json").write_text(json.dumps(queries, indent=4))
    (out / "data" / "annotations.json").write_text(json.dumps(annotations, indent=4))
    return out


POPE_SUBSETS = ("adversarial", "popular", "random")


def write_pope(out: str | Path, rows: int = 400, seed: int = 0) -> Path:
    """POPE's three COCO question files (JSON lines, though named .json) over one folder of images."""
    import json

    out = Path(out)
    (out / "output" / "coco").mkdir(parents=True, exist_ok=True)
    (out / "val2014").mkdir(parents=True, exist_ok=True)
    for s, subset in enumerate(POPE_SUBSETS):
        lines = []
        for number, jpeg, question, label in _benchmark_questions(rows, seed * 1000 + s):
            image = f"COCO_val2014_{s:06d}{number:06d}.jpg"
            (out / "val2014" / image).write_bytes(jpeg)
            lines.append(json.dumps({"question_id": len(lines) + 1, "image": image, "text": question, "label": label}))
        (out / "output" / "coco" / f"coco_pope_{subset}.json").write_text("\n".join(lines) + "\n")
    return out


BENCHMARKS = {"amber": write_amber, "pope": write_pope}


def write(kind: str, out: str | Path, rows: int = 400, seed: int = 0, image_sides: tuple[int, int] | None = None) -> Path:
    """Write a synthetic data set of ``kind`` (a source format, or a benchmark) into ``out``; held-out splits get
    rows/5 each. ``image_sides``: images of varying size (chartqa only, see chartqa_rows)."""
    if kind in BENCHMARKS:
        return BENCHMARKS[kind](out, rows, seed)
    kind = SAME_SCHEMA.get(kind, kind)
    if kind not in ROWS:
        raise UserError(f"--kind: {kind!r} is not one of {', '.join([*ROWS, *SAME_SCHEMA, *BENCHMARKS])}")
    if image_sides and kind != "chartqa":
        raise UserError(f"--image-sides: only chartqa images vary in size, not {kind}'s")
    options = {"image_sides": image_sides} if image_sides else {}
    splits = {}
    for i, split in enumerate(SPLITS[kind]):
        splits[split] = ROWS[kind](rows if split == "train" else max(1, rows // 5), seed=seed * 1000 + i, **options)
    return write_splits(kind, out, splits)


def write_splits(kind: str, out: str | Path, splits: dict[str, list[dict]]) -> Path:
    """Write rows (possibly hand-corrupted by a test) split by split, with the hub's README layout."""
    from datasets import Dataset

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        Dataset.from_list(rows, features=features(kind)).to_parquet(out / "data" / f"{split}-00000-of-00001.parquet")
    config = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in splits)
    (out / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{config}\n---\n# Synthetic {kind} data (vlmjobs)\n")
    return out


def corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: every word the synthetic data and chat templates use."""
    rng = random.Random(0)
    lines = [
        "What colour is the bar? How many bars are there? Is there a bar in the chart?",
        "Yes No yes no " + " ".join(COLOURS) + " " + " ".join(str(i) for i in range(10)),
        "USER: ASSISTANT: User: Assistant: system user assistant You are a helpful assistant.",
        "Answer with a single word or number, as short as possible.",
        "You are a Vision Language Model specialized in interpreting visual data from chart images.",
    ]
    for _ in range(200):
        _, query, answer = chartqa_question(rng)
        lines.append(f"{query} {answer} Is there a {rng.choice(list(COLOURS))} bar in the chart? Yes No")
    return lines
