"""Loading a data source through ``datasets.load_dataset`` and turning it into prepared splits.

Hub ids and local folders take the same path. Images are decoded here, row by row, so that an
image that does not decode is a counted drop instead of a crash in the middle of training.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jobs.contract import UserError
from jobs.formats import FORMATS, Drop, LeftOut
from jobs.progress import Progress
from jobs.recipe import Prepare, Source

DROP = "_drop"  # column carrying a row's drop reason ("" for a kept row) between convert and filter
LEFT_OUT = "left out: "  # a drop reason's prefix for a row outside the format's subset (formats.LeftOut)
SHOWN_ROWS = 3  # row indices named per drop reason


@dataclass
class Drops:
    rows: int = 0
    reasons: Counter = field(default_factory=Counter)  # unusable rows, by reason
    examples: dict[str, list[int]] = field(default_factory=dict)
    left_out: Counter = field(default_factory=Counter)  # rows outside the format's subset, by reason

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values())

    @property
    def usable(self) -> int:
        """The rows the format takes: the unusable ones are counted against these."""
        return self.rows - sum(self.left_out.values())

    def add(self, index: int, reason: str) -> None:
        if reason.startswith(LEFT_OUT):
            self.left_out[reason.removeprefix(LEFT_OUT)] += 1
            return
        self.reasons[reason] += 1
        if len(self.examples.setdefault(reason, [])) < SHOWN_ROWS:
            self.examples[reason].append(index)

    def summary(self) -> str:
        return ", ".join(
            f"{reason} x{count} (rows {', '.join(map(str, self.examples[reason]))}{', ...' if count > SHOWN_ROWS else ''})"
            for reason, count in self.reasons.most_common()
        )

    def left_out_summary(self) -> str:
        return ", ".join(f"{reason} x{count}" for reason, count in self.left_out.most_common())

    def to_dict(self) -> dict:
        return {"rows": self.rows, "dropped": self.dropped, "reasons": dict(self.reasons), "examples": self.examples,
                "left_out": dict(self.left_out)}


def is_local(source: Source) -> bool:
    return Path(source.path).exists()


def load_split(source: Source, split: str, *, scratch: Path):
    """One split of a source, images left undecoded so that a broken one is a drop, not a crash.

    A local source is read into ``scratch`` rather than the shared datasets cache, whose key for
    local files can outlive their content: a regenerated folder would come back stale.
    """
    import datasets
    from datasets import load_dataset

    fmt = FORMATS[source.format]
    cache_dir = str(scratch) if is_local(source) else None
    try:
        ds = load_dataset(source.path, source.name, revision=source.revision, split=split, cache_dir=cache_dir)
    except Exception as e:
        from jobs import hub

        # Not found, gated, unreachable: one line naming the data set and the fix (datasets' own not-found is a FileNotFoundError)
        problem = None if is_local(source) else hub.problem(e, "data set", source.path, source.revision)
        if problem is not None:
            raise problem from None
        if isinstance(e, FileNotFoundError):
            raise UserError(f"data source {source.path}: not found ({e})") from None
        if isinstance(e, ValueError):  # unknown split, bad slice, unknown config
            raise UserError(f"data source {source.path} split {split!r}: {e}") from None
        raise
    missing = [c for c in fmt.columns if c not in ds.column_names]
    if missing:
        raise UserError(
            f"data source {source.path} split {split!r}: format {source.format} needs columns {', '.join(fmt.columns)}; "
            f"missing {', '.join(missing)} (it has {', '.join(ds.column_names)})"
        )
    image = ds.features[fmt.image_column] if fmt.image_column else None
    if isinstance(image, datasets.Image):
        ds = ds.cast_column(fmt.image_column, datasets.Image(decode=False))
    elif isinstance(image, (datasets.List, datasets.Sequence)) and isinstance(image.feature, datasets.Image):
        ds = ds.cast_column(fmt.image_column, datasets.List(datasets.Image(decode=False)))
    return ds.select_columns(list(fmt.columns))


def convert(ds, source: Source, shrink, *, check=None, num_proc: int = 1, what: str = "", decode_video=None,
            max_images: int | None = None):
    """Map source rows to conversational rows; returns (kept rows, Drops). ``check(row)`` may raise Drop for a
    converted row (prepare: the chat template's verdict, jobs.turns.check); a row with more than ``max_images``
    images (the family's limit) is dropped. Prints a progress line at each tenth of the rows and at least every minute,
    from the worker that holds the first rows. ``decode_video`` (``jobs.video.decoder``) turns a video file into its
    kept frames and their metadata, for formats with videos."""
    fmt = FORMATS[source.format]
    workers = max(num_proc, 1)
    progress = Progress(f"prepare: {what or source.path}", len(ds), every=60.0)
    seen = {"rows": 0, "reports": False}

    def one(row, index):
        seen["rows"] += 1
        if seen["rows"] == 1:
            seen["reports"] = index == 0
        if seen["reports"]:
            progress.update(min(seen["rows"] * workers, len(ds)), " converted" if workers == 1 else f" converted (about: {workers} workers)")
        try:
            raw = row[fmt.image_column] if fmt.image_column else []
            raw = raw if isinstance(raw, list) else [raw]
            if max_images is not None and len(raw) > max_images:
                plural = "s" if max_images > 1 else ""
                raise Drop(f"more than {max_images} image{plural} (the model family reads at most that many)")
            images = [_encode(shrink(_decode(image))) for image in raw]
            out = fmt.convert({**row, "images": images}, source.system_prompt)  # a malformed row drops before its videos decode
            if check is not None:
                check(out)
            videos = {}
            if fmt.video_column:
                decoded = [decode_video(video) for video in row[fmt.video_column] or []]
                videos = {"videos": [[_encode(frame) for frame in frames] for frames, _ in decoded],
                          "video_metadata": [metadata for _, metadata in decoded]}
            return {**_empty(fmt.kind, fmt.video_column), **out, "images": images, **videos, DROP: ""}
        except LeftOut as e:
            return {**_empty(fmt.kind, fmt.video_column), "images": [], DROP: LEFT_OUT + str(e)}
        except Drop as e:
            return {**_empty(fmt.kind, fmt.video_column), "images": [], DROP: str(e)}

    converted = ds.map(
        one, with_indices=True, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
        features=_features(fmt.kind, videos=bool(fmt.video_column)), desc=f"{source.format} rows",
    )
    drops = Drops(rows=len(converted))
    for index, reason in enumerate(converted[DROP]):
        if reason:
            drops.add(index, reason)
    kept = converted.filter(lambda reason: not reason, input_columns=DROP).remove_columns(DROP)
    return kept, drops


def check_drops(drops: Drops, where: str, prepare: Prepare) -> None:
    """Too many unusable rows fail the stage; rows a format leaves out by design (formats.LeftOut) do not count, but a
    source with none of the format's rows fails too."""
    if drops.rows == 0:
        raise UserError(f"{where}: no rows")
    if drops.usable == 0:
        raise UserError(f"{where}: the format takes none of the {drops.rows} rows: {drops.left_out_summary()}")
    if drops.dropped == drops.usable:
        raise UserError(f"{where}: all {drops.usable} rows unusable: {drops.summary()}")
    if drops.dropped / drops.usable > prepare.max_drop_fraction:
        raise UserError(
            f"{where}: {drops.dropped} of {drops.usable} rows unusable ({drops.dropped / drops.usable:.1%} > "
            f"prepare.max_drop_fraction {prepare.max_drop_fraction:.1%}): {drops.summary()}"
        )


def carve(train, held: int, seed: int, what: str):
    """Split ``held`` rows off ``train`` as a held-out split; returns (train, held_out)."""
    held = max(1, held)
    if held >= len(train):
        raise UserError(f"{what}: {len(train)} training rows are too few to hold {held} out for evaluation")
    parts = train.train_test_split(test_size=held, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _decode(image: dict):
    from PIL import Image

    if image is None:
        raise Drop("missing image")
    data = image.get("bytes") if isinstance(image, dict) else None
    try:
        if data is None and isinstance(image, dict) and image.get("path"):
            data = open(image["path"], "rb").read()
        if not data:
            raise Drop("missing image")
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
    except Drop:
        raise
    except Exception:
        raise Drop("image does not decode") from None
    if decoded.width < 1 or decoded.height < 1:
        raise Drop("image is empty")
    decoded.info["source_format"] = decoded.format
    return decoded


def _encode(image) -> dict:
    """Keep JPEGs JPEG (re-encoding them as PNG would inflate the prepared data), everything else PNG."""
    fmt = "JPEG" if image.info.get("source_format") == "JPEG" and image.mode in ("RGB", "L") else "PNG"
    if image.mode not in ("RGB", "L", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return {"bytes": buffer.getvalue(), "path": None}


def _empty(kind: str, videos: str | None = None) -> dict:
    empty = {"prompt": [], "completion": [], "answers": []} if kind == "sft" else {"prompt": [], "chosen": [], "rejected": []}
    return empty | ({"videos": [], "video_metadata": []} if videos else {})


def _features(kind: str, videos: bool = False):
    from datasets import Features, Image, List, Value

    message = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    columns = {"images": List(Image()), "prompt": message}
    if kind == "sft":
        columns |= {"completion": message, "answers": List(Value("string"))}
    else:
        columns |= {"chosen": message, "rejected": message}
    if videos:  # each video's kept frames, and the file's fps, frame count, duration and the indices kept (jobs.video)
        metadata = {"fps": Value("float64"), "total_num_frames": Value("int64"), "frames_indices": List(Value("int64")),
                    "duration": Value("float64")}
        columns |= {"videos": List(List(Image())), "video_metadata": List(metadata)}
    return Features({**columns, DROP: Value("string")})
