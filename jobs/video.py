"""Video rows: the frames prepare keeps of a video file, and how SFT's collator and evaluate hand them to the processor.

Prepare decodes each video with transformers' own loader (``video_utils.load_video``, backend PyAV, whose wheel
bundles FFmpeg) and keeps only the frames the family's video processor would sample (its ``sample_frames``: its own
``fps`` or ``num_frames``, else ``prepare.video_fps``, within its ``min_frames``/``max_frames``), each within the video
processor's pixel budget. A long video thus costs what its sampled frames cost, never its whole length: PyAV's reader
keeps only the frames it samples. The frames are stored as images with where they came from (the file's fps, its
frame count and the sampled indices), which the processor reads to space the frames in time (Qwen2.5-VL's
``second_per_grid_ts``).

TRL 1.16's vision collator reads ``images`` only; ``WithVideos`` hands the stored frames to the processor call that
encodes the prompts, with ``do_sample_frames=False``: they are sampled already. Evaluate's generation passes the same
(``processor_inputs``, from jobs.inference).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from jobs.formats import Drop

COLUMNS = ("videos", "video_metadata")  # prepared columns: frames per video, and where they came from


def decoder(family, processor, *, fps: float, folder: Path | None) -> Callable[[str], tuple[list, dict]]:
    """``decode(video file) -> (frames as PIL images, metadata)`` for this family, or one that drops every video row
    when the family takes no video. ``fps``: frames per second where the video processor sets neither fps nor
    num_frames (Qwen2.5-VL's sets none: its card samples at 2 fps through qwen-vl-utils). ``folder``: where a relative
    path is looked up (a local source's folder)."""
    if not family.takes_video:
        def refuse(_video):
            raise Drop(f"video row: the {family.name} family takes no video")
        return refuse
    video_processor = processor.video_processor
    sample = partial(video_processor.sample_frames, **sampling(video_processor, fps))

    def decode(video) -> tuple[list, dict]:
        from transformers.video_utils import load_video

        if not isinstance(video, str) or not video:
            raise Drop("video is not a file path")
        path = Path(video) if Path(video).is_absolute() or folder is None else folder / video
        if not path.is_file():
            raise Drop("video file not found")
        try:
            frames, metadata = load_video(str(path), backend="pyav", sample_indices_fn=sample)
        except Exception:  # PyAV's errors (InvalidDataError, ...) and a video too short to sample
            raise Drop("video does not decode or is too short to sample") from None
        return [shrink_frame(frame, video_processor) for frame in frames], {
            "fps": float(metadata.fps), "total_num_frames": int(metadata.total_num_frames),
            "frames_indices": [int(i) for i in metadata.frames_indices],
        }

    return decode


def sampling(video_processor, fps: float) -> dict:
    """The video processor's own fps or num_frames, else ``fps`` (prepare.video_fps)."""
    if getattr(video_processor, "num_frames", None):
        return {"num_frames": video_processor.num_frames}
    return {"fps": getattr(video_processor, "fps", None) or fps}


def describe(family, processor, fps: float) -> str:
    """prepare's line on what it keeps of a video."""
    if not family.takes_video:
        return f"prepare: video rows are dropped: the {family.name} family takes no video"
    video_processor = processor.video_processor
    (how, value), = sampling(video_processor, fps).items()
    kept = f"{value:g} frames a second" if how == "fps" else f"{value} frames"
    return (f"prepare: videos sampled at {kept} ({video_processor.min_frames} to {video_processor.max_frames}), frames "
            f"shrunk to at most {video_processor.size['longest_edge']:,} pixels")


def shrink_frame(frame, video_processor):
    """A frame (H, W, 3 array) as an image, shrunk to the video processor's pixel budget (size["longest_edge"]) the
    way its smart_resize would, so the processor resizes it no further; a frame within the budget is kept as is."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = Image.fromarray(frame)
    budget, (w, h) = video_processor.size["longest_edge"], image.size
    if w * h <= budget:
        return image
    factor = video_processor.patch_size * video_processor.merge_size
    try:
        height, width = smart_resize(h, w, factor=factor, min_pixels=video_processor.size["shortest_edge"], max_pixels=budget)
    except ValueError as e:  # an aspect ratio over 200, which the processor refuses too
        raise Drop(f"video frame {w}x{h}: {e}") from None
    return image.resize((width, height))


def processor_inputs(rows: list[dict]) -> dict:
    """The processor's video arguments for these rows' stored frames, in row order (none for rows without video): the
    frames with where they came from (the processor spaces them in time from it), already sampled. SFT's collator and
    evaluate's generation (jobs.inference) both encode video rows with these."""
    videos, metadata = [], []
    for row in rows:
        videos += [[frame.convert("RGB") for frame in frames] for frames in row.get("videos") or []]
        metadata += row.get("video_metadata") or []
    return {"videos": videos, "video_metadata": metadata, "do_sample_frames": False} if videos else {}


class WithVideos:
    """SFT's collator with video rows: TRL's vision collator, whose prompt encoding is given each row's stored frames.

    TRL encodes the prompts with ``processor(images=..., text=...)`` and the answers with ``processor(text=...)``;
    the processor it holds is swapped for one that adds ``videos=`` to the first of those calls."""

    def __init__(self, collator):
        self.collator = collator
        self.processor = _AddingVideos(collator.processor)
        collator.processor = self.processor

    def __call__(self, examples: list[dict]) -> dict:
        self.processor.pending = processor_inputs(examples)
        for example in examples:  # TRL's collator would take them for columns of its own
            example.pop("videos", None), example.pop("video_metadata", None)
        try:
            return self.collator(examples)
        finally:
            self.processor.pending = {}


class _AddingVideos:
    def __init__(self, processor):
        self._processor, self.pending = processor, {}

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        if self.pending and "images" in kwargs:  # the prompts' call; the answers' passes text alone
            kwargs |= self.pending
        return self._processor(*args, **kwargs)
