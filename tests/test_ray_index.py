"""`soundtag index --engine ray` on a local 2-CPU Ray: the library it writes
equals the local engine's row for row, and an interrupted job resumes from
the Parquet shards it left without scoring their files again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from library_setup import CLIPS, demo_folder, exported_run

from soundtag.library import Library, ray_engine
from soundtag.library.engine import Job, Report, backend_for, describe, plan
from soundtag.predict import Tagger

ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra")
pytestmark = pytest.mark.usefixtures("single_torch_thread")
FIELDS = "path, name, folder, size, mtime_ns, ctime_ns, hash, duration, model, error, scores, embedding"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def table(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    rows = conn.execute(f"SELECT {FIELDS} FROM files ORDER BY path").fetchall()
    conn.close()
    return rows


def test_the_ray_engine_writes_the_local_engines_rows_and_resumes_from_its_shards(local_ray, tmp_path_factory,
                                                                                 tmp_path, monkeypatch):
    run = exported_run(tmp_path_factory)
    folder = demo_folder(tmp_path / "sounds")
    (folder / "notes.wav").write_text("not audio\n")
    (folder / "empty.ogg").write_bytes(b"")
    (folder / "loop.wav").symlink_to("loop.wav")
    local = Library.index(tmp_path / "local.sqlite", [run], folder, progress=False)

    # a job interrupted after its first shard: the shard is there, nothing merged
    db = tmp_path / "ray.sqlite"
    with Library(db, create=True) as lib:
        model = describe(Tagger.load([run], backend="onnx"), [run], backend_for([run], "auto"))
        jobs, _, _ = plan(lib.db, str(folder), model.id, Report())
    readable, _ = ray_engine._split(jobs)
    shards = db.with_name(db.name + ".shards") / model.id.rsplit(":", 1)[-1]
    first = readable[: len(readable) // 2]
    ray_engine._score_on_ray(first, [str(run)], "onnx", None, shards, False)

    scored: list[Job] = []
    score_on_ray = ray_engine._score_on_ray
    monkeypatch.setattr(ray_engine, "_score_on_ray", lambda todo, *a: (scored.extend(todo), score_on_ray(todo, *a)))
    resumed = Library.index(db, [run], folder, engine="ray", progress=False)
    assert {j.path for j in scored} == {j.path for j in readable[len(first):]}
    assert (resumed.added, resumed.failed) == (local.added, local.failed) == (len(CLIPS), resumed.failed)
    assert len(resumed.failed) == 3 and not shards.exists()
    assert table(db) == table(tmp_path / "local.sqlite")
