"""Prepare: load the recipe's data sources, map them to TRL's conversational format, shrink images
to what the processor will use, split train/eval/test, and write Arrow into the run folder.

Runs on CPU, so that data problems surface before any GPU is allocated. Unusable rows are dropped
and counted by reason; too many (prepare.max_drop_fraction) fail the stage with one line.

    local:      python -m jobs.prepare --recipe recipes/tiny-demo.yaml
                vlmjobs run recipes/tiny-demo.yaml --stages prepare
    in cluster: python -m jobs.prepare            (the Job passes the resolved recipe in $VLMJOBS_RECIPE)

Output: <run>/prepare/{sft,dpo}/{train,eval,test}/ (datasets.save_to_disk) and _SUCCESS.json.
"""

from __future__ import annotations

from pathlib import Path

from jobs import contract, entry
from jobs import recipe as recipes


def main(recipe: str = "", force: bool = False, **overrides):
    cfg = recipes.load(recipe, overrides)
    stage = contract.begin("prepare", cfg.run_dir, cfg.stage_config("prepare"), force=force)
    if stage.skipped:
        return

    from datasets import DatasetDict

    from jobs import data, modeling, turns, video
    from jobs.families import get_family
    from jobs.formats import FORMATS

    # Images are shrunk to the processor's own size limit, so the processor decides what "too big" is.
    family = get_family(cfg.model.family)
    processor = modeling.load_processor(cfg.model)
    longest, shortest = family.max_image_edge(processor, cfg.prepare.image_scale)
    budget = family.pixel_budget(processor, cfg.prepare.image_scale)
    if budget:
        print(f"prepare: images shrunk to at most {budget:,} pixels (height x width), aspect ratio kept")
    else:
        bounds = [f"{side} side <= {limit} px" for side, limit in (("longest", longest), ("shortest", shortest)) if limit]
        print(f"prepare: images shrunk to {' and '.join(bounds) or 'their own size (the processor sets no limit)'}")

    if any(FORMATS[source.format].video_column for source in (cfg.data.sft, cfg.data.dpo) if source):
        print(video.describe(family, processor, cfg.prepare.video_fps))

    def shrink(image):
        return family.shrink(image, processor, cfg.prepare.image_scale)

    # A conversation the chat template refuses (Gemma 3's two user turns in a row) is a counted drop here, not a
    # crash in the training stage's collator
    rendering = family.rendering_processor(processor)

    def check(row):
        turns.check(rendering, row, family)

    rows, drops = {}, {}
    for kind in ("sft", "dpo"):
        source = getattr(cfg.data, kind)
        if source is None:
            continue
        splits = {"train": source.train_split, "eval": source.eval_split, "test": source.test_split}
        prepared = {}
        for split, name in splits.items():
            if name is None:
                continue
            where = f"data.{kind} ({source.path}, split {name})"
            raw = data.load_split(source, name, scratch=stage.scratch)
            if cfg.prepare.max_rows is not None:
                raw = raw.select(range(min(cfg.prepare.max_rows, len(raw))))
            decode_video = video.decoder(family, processor, fps=cfg.prepare.video_fps,
                                         folder=Path(source.path) if data.is_local(source) else None)
            prepared[split], dropped = data.convert(raw, source, shrink, check=check, num_proc=cfg.prepare.num_proc,
                                                    what=where, decode_video=decode_video,
                                                    max_images=family.max_images)
            data.check_drops(dropped, where, cfg.prepare)
            drops[f"{kind}/{split}"] = dropped.to_dict()
            print(f"prepare: {where}: kept {len(prepared[split])} of {dropped.rows} rows"
                  + (f"; left out {dropped.left_out_summary()}" if dropped.left_out else "")
                  + (f"; dropped {dropped.summary()}" if dropped.dropped else ""))

        # Held-out splits the source lacks are carved from train, as fractions of all of it.
        total = len(prepared["train"])
        for split in ("test", "eval"):
            if split not in prepared:
                held = round(total * getattr(cfg.prepare, f"{split}_fraction"))
                prepared["train"], prepared[split] = data.carve(prepared["train"], held, cfg.seed, f"data.{kind} ({source.path})")

        DatasetDict(prepared).save_to_disk(stage.work / kind)
        rows[kind] = {split: len(ds) for split, ds in prepared.items()}

    stage.finish(rows=rows, drops=drops)
    print(f"prepare: rows {rows}")


if __name__ == "__main__":
    entry.entrypoint(main)
