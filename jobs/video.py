"""Video rows: the frames prepare keeps of a video file, and how SFT's collator and evaluate hand them to the processor.

Prepare decodes each video with transformers' own loader (``video_utils.load_video``, backend PyAV, whose wheel
bundles FFmpeg) and keeps only the frames the family's video processor would sample (its ``sample_frames``: its own
``fps`` or ``num_frames``, else ``prepare.video_fps``, within its ``min_frames``/``max_frames``), each within the video
processor's pixel budget. A long video thus costs what its sampled frames cost, never its whole length: PyAV's reader
keeps only the frames it samples. The frames are stored as images with where they came from (the file's fps, its
frame count and the sampled indices), which the processor reads to space the frames in time (Qwen2.5-VL's
``second_per_grid_ts``).

TRL 1.16's vision collator reads ``images`` only; ``WithVideos`` hands the stored frames to the processor call that
encodes the prompts, with ``do_sample_frames=False``: they are sampled already. Evaluate's generation encodes its
prompts the same way (``encode``, from jobs.inference).
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
        return [shrink_frame(frame, family, video_processor) for frame in frames], {
            "fps": float(metadata.fps), "total_num_frames": int(metadata.total_num_frames),
            "frames_indices": [int(i) for i in metadata.frames_indices],
            "duration": float(metadata.duration),  # SmolVLM2's prompt states it ("a 0:00:03 [H:MM:SS] video")
        }

    return decode


def sampling(video_processor, fps: float) -> dict:
    """The video processor's own fps and num_frames, where it sets them (SmolVLM2's both: at most num_frames, fps a
    second; Qwen3-VL's fps), else ``fps`` (prepare.video_fps): the arguments its sample_frames takes, as the
    processor's apply_chat_template passes them."""
    own = {key: value for key in ("num_frames", "fps") if (value := getattr(video_processor, key, None))}
    return own or {"fps": fps}


def describe(family, processor, fps: float) -> str:
    """prepare's line on what it keeps of a video."""
    if not family.takes_video:
        return f"prepare: video rows are dropped: the {family.name} family takes no video"
    video_processor = processor.video_processor
    how = sampling(video_processor, fps)
    kept = " and ".join(([f"{how['fps']:g} frames a second"] if "fps" in how else [])
                        + ([f"at most {how['num_frames']} frames"] if "num_frames" in how else []))
    if getattr(video_processor, "min_frames", None):
        kept += f" ({video_processor.min_frames} to {video_processor.max_frames})"
    bound = (f"at most {video_processor.size['longest_edge']:,} pixels" if family.image_bound == "max_pixels"
             else f"a longest side of at most {video_processor.size['longest_edge']} px")
    return f"prepare: videos sampled at {kept}, frames shrunk to {bound}"


def shrink_frame(frame, family, video_processor):
    """A frame (H, W, 3 array) as an image, shrunk to the size the video processor's first resize gives it, so that it
    resizes it no further: for an area budget (Qwen's, size["longest_edge"] pixels) the size its smart_resize gives;
    for a longest side (SmolVLM2's, size["longest_edge"]) that side at the bound, the aspect ratio kept, as its resize
    does. A frame within the bound is kept as is."""
    from PIL import Image

    image, (w, h) = Image.fromarray(frame), frame.shape[1::-1]
    bound = video_processor.size["longest_edge"]
    if family.image_bound != "max_pixels":
        if max(w, h) <= bound:
            return image
        # SmolVLM's get_resize_output_image_size: the longest side at the bound, the other rounded up to even
        other = int(bound / (w / h)) if w >= h else int(bound * (w / h))
        other = max(other + other % 2, 1)
        return image.resize((bound, other) if w >= h else (other, bound))
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if w * h <= bound:
        return image
    factor = video_processor.patch_size * video_processor.merge_size
    try:
        height, width = smart_resize(h, w, factor=factor, min_pixels=video_processor.size["shortest_edge"], max_pixels=bound)
    except ValueError as e:  # an aspect ratio over 200, which the processor refuses too
        raise Drop(f"video frame {w}x{h}: {e}") from None
    return image.resize((width, height))


def row_videos(row: dict) -> tuple[list, list]:
    """A prepared row's videos (its stored frames, as RGB images) and their metadata."""
    return [[frame.convert("RGB") for frame in frames] for frames in row.get("videos") or []], list(row.get("video_metadata") or [])


TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # a processor's per-token outputs


def encode(processor, videos: list[tuple[list, list]], *, text: list[str], images=None, padding_side: str = "right",
           **kwargs):
    """``processor(text=..., images=..., videos=...)`` on a batch whose rows hold videos (``videos``: each row's
    ``row_videos``), each row encoded alone and the rows joined as the processor joins a batch: per-token outputs padded
    on ``padding_side``, the others (pixels, grids, times) one row's after another's, each padded to the largest
    (SmolVLM2's videos with empty frames, which its model drops). Alone, because transformers 5.23's SmolVLMProcessor
    gives every video of a batch the batch's longest frame count (its prompt said "three frames" of a video of two, and
    showed an empty one); a row encoded alone is what the card gives it. The frames are sampled already
    (do_sample_frames=False): the processor spaces them in time from their metadata."""
    import torch
    from transformers import BatchFeature

    rows = []
    for i, row_text in enumerate(text):
        frames, metadata = videos[i]
        row_images = [images[i]] if images is not None and images[i] else None
        extra = {"videos": frames, "video_metadata": metadata, "do_sample_frames": False} if frames else {}
        rows.append(processor(text=[row_text], images=row_images, **kwargs, **extra))
    length = max(row["input_ids"].shape[1] for row in rows)
    joined = {}
    for key in dict.fromkeys(key for row in rows for key in row.keys()):
        values = [row[key] for row in rows if key in row]
        if key in TOKEN_KEYS:
            fill = processor.tokenizer.pad_token_id if key == "input_ids" else 0
            pads = [value.new_full((1, length - value.shape[1]), fill) for value in values]
            joined[key] = torch.cat([torch.cat((pad, value) if padding_side == "left" else (value, pad), dim=1)
                                     for pad, value in zip(pads, values)])
            continue
        most = [max(sizes) for sizes in zip(*(value.shape[1:] for value in values))]
        padded = []
        for value in values:  # zeros after each trailing dimension, up to the largest row's
            widths = [w for size, top in zip(reversed(value.shape[1:]), reversed(most)) for w in (0, top - size)]
            padded.append(torch.nn.functional.pad(value, widths) if any(widths) else value)
        joined[key] = torch.cat(padded)
    return BatchFeature(joined)


class WithVideos:
    """SFT's collator with video rows: TRL's vision collator, whose prompt encoding is given each row's stored frames.

    TRL encodes the prompts with ``processor(images=..., text=...)`` and the answers with ``processor(text=...)``;
    the processor it holds is swapped for one that encodes the first of those calls with the rows' videos (``encode``)."""

    def __init__(self, collator):
        self.collator = collator
        self.processor = _AddingVideos(collator.processor)
        collator.processor = self.processor

    def __call__(self, examples: list[dict]) -> dict:
        videos = [row_videos(example) for example in examples]
        self.processor.pending = videos if any(frames for frames, _ in videos) else None
        for example in examples:  # TRL's collator would take them for columns of its own
            example.pop("videos", None), example.pop("video_metadata", None)
        try:
            return self.collator(examples)
        finally:
            self.processor.pending = None


class _AddingVideos:
    def __init__(self, processor):
        self._processor, self.pending = processor, None

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, *args, **kwargs):
        if self.pending and "images" in kwargs:  # the prompts' call; the answers' passes text alone
            return encode(self._processor, self.pending, *args, **kwargs)
        return self._processor(*args, **kwargs)
