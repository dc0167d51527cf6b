"""The tests' tiny models, kept between sessions (tiny.cached): keyed by what they are built from, whole when two
processes build at once, and never served once something has written into one."""

from __future__ import annotations

import json

from jobs import tiny


def test_a_cached_model_is_built_once_and_rebuilt_when_a_file_of_it_changed(tmp_path):
    folder = tiny.cached("llava", tmp_path)
    assert folder == tmp_path / tiny.build_key() / "llava"
    config = (folder / "config.json").read_text()
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    assert tiny.cached("llava", tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime_ns == weights

    (folder / "config.json").write_text(json.dumps({**json.loads(config), "image_token_id": 3}))  # a test's write
    assert tiny.cached("llava", tmp_path) == folder
    assert (folder / "config.json").read_text() == config, "the changed model was served"
    assert [p.name for p in folder.parent.iterdir()] == ["llava"], "the staging and set-aside folders are gone"


def test_the_key_changes_with_the_source_the_model_is_built_from(tmp_path, monkeypatch):
    key = tiny.build_key()
    changed = tmp_path / "tiny.py"
    changed.write_text(open(tiny.__file__).read().replace("VOCAB_SIZE = 600", "VOCAB_SIZE = 601"))
    monkeypatch.setattr(tiny, "__file__", str(changed))
    assert tiny.build_key() != key


def test_two_processes_building_at_once_both_get_the_whole_model(tmp_path, monkeypatch):
    """The loser of the race (its rename finds the winner's folder in place) serves the winner's model."""
    build = tiny.build

    def build_while_another_process_finishes_first(family, out, **kwargs):
        monkeypatch.setattr(tiny, "build", build)
        winner.append(tiny.cached(family, tmp_path))
        return build(family, out, **kwargs)

    winner = []
    monkeypatch.setattr(tiny, "build", build_while_another_process_finishes_first)
    folder = tiny.cached("qwen2_vl", tmp_path)
    assert winner == [folder] and tiny._intact(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["qwen2_vl"]
