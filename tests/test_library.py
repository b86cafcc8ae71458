"""The sound library (`soundtag.library`, `soundtag index/search/similar`):
every file of a folder tagged into SQLite, skipped when unchanged, re-scored
when changed, pruned when removed, broken entries recorded with their reason,
resumable after kill -9, and looked up by label and by embedding similarity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO
from library_setup import CLIPS, TEST_CLIP, demo_folder, exported_run

from soundtag.cli import main
from soundtag import workers
from soundtag.library import Library, LibraryError, engine
from soundtag.library.db import Database
from soundtag.library.engine import CHANGED
from soundtag.predict import Tagger

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return exported_run(tmp_path_factory)


@pytest.fixture(scope="module")
def tagger(run) -> Tagger:
    return Tagger.load([run], backend="onnx", threads=1)


def broken_entries(folder: Path) -> dict[str, str]:
    """Entries that cannot be tagged, by name, with a word their reason must hold."""
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("not audio at all\n" * 50)
    (folder / "loop.wav").symlink_to("loop.wav")
    (folder / "gone.ogg").symlink_to("nowhere.ogg")
    (folder / "more" / "up").symlink_to("..")
    return {"empty.wav": "empty", "notes.wav": "not readable as audio", "loop.wav": "symlink loop",
            "gone.ogg": "broken symlink", "more/up": "symlink loop"}


def generation(db: Path) -> int:
    database = Database(db)
    try:
        return database.generation
    finally:
        database.close()


def rows(db: Path) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    found = {r["name"]: r for r in conn.execute("SELECT * FROM files")}
    conn.close()
    return found


def test_every_file_is_tagged_as_the_tagger_tags_it_and_broken_ones_are_recorded(run, tagger, tmp_path):
    folder = demo_folder(tmp_path / "sounds")
    broken = broken_entries(folder)
    report = Library.index(tmp_path / "lib.sqlite", [run], folder, progress=False)
    assert (report.added, len(report.failed)) == (len(CLIPS), len(broken))
    found = rows(tmp_path / "lib.sqlite")
    assert len(found) == len(CLIPS) + len(broken)
    for name, word in broken.items():
        assert word in found[name]["error"] and found[name]["scores"] is None, name
    with Library(tmp_path / "lib.sqlite") as library:
        assert library.model.backend == "onnx" and library.model.classes == tagger.classes
        for name, row in found.items():
            if row["error"] is None:
                expected = tagger.tag(folder / name)
                assert np.allclose(np.frombuffer(row["scores"], "<f4"), expected.scores, atol=1e-6)
                assert np.allclose(np.frombuffer(row["embedding"], "<f4"), expected.embedding, atol=1e-5)
                assert row["duration"] == pytest.approx(expected.duration)
                assert row["size"] == (folder / name).stat().st_size and len(row["hash"]) == 32
        label = tagger.classes[int(np.argmax(np.frombuffer(next(iter(found.values()))["scores"] or
                                                           found["d000004.ogg"]["scores"], "<f4")))]
        hits = library.search(label, min_score=0.02)
        assert hits and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(h.score >= 0.02 for h in hits)
        with pytest.raises(LibraryError, match="unknown label 'Bagpipes'; labels in this library: "):
            library.search("Bagpipes")


def test_a_second_run_skips_unchanged_rescores_changed_and_prunes_removed(run, tmp_path, monkeypatch):
    folder = demo_folder(tmp_path / "sounds")
    db = tmp_path / "lib.sqlite"
    Library.index(db, [run], folder, progress=False)
    before = rows(db)
    first_generation = generation(db)
    opened: list[str] = []
    content_hash = engine.content_hash
    monkeypatch.setattr(engine, "content_hash", lambda path: opened.append(Path(path).name) or content_hash(path))
    again = Library.index(db, [run], folder, progress=False)
    assert (again.added, again.updated, again.unchanged, again.pruned) == (0, 0, len(CLIPS), 0)
    assert opened == []  # unchanged files are not even read
    assert rows(db)["d000004.ogg"]["indexed_at"] == before["d000004.ogg"]["indexed_at"]
    assert generation(db) == first_generation  # nothing changed: the vector files stay valid

    shutil.copy(DEMO / "audio_train" / "d000140.ogg", folder / "d000004.ogg")  # new content
    os.utime(folder / "d000013.ogg", ns=(0, 10**18))  # new times, same content
    (folder / "more" / "d000000.ogg").unlink()
    shutil.copy(DEMO / "audio_train" / "d000150.ogg", folder / "new.ogg")
    report = Library.index(db, [run], folder, progress=False)
    assert (report.added, report.updated, report.unchanged, report.pruned) == (1, 1, len(CLIPS) - 2, 1)
    assert set(opened) == {"d000004.ogg", "d000013.ogg", "new.ogg"}
    after = rows(db)
    assert "more/d000000.ogg" not in after and "new.ogg" in after
    assert after["d000004.ogg"]["hash"] != before["d000004.ogg"]["hash"]
    assert after["d000004.ogg"]["scores"] == after["more/d000140.ogg"]["scores"]
    assert after["d000013.ogg"]["mtime_ns"] == 10**18
    assert after["d000013.ogg"]["indexed_at"] == before["d000013.ogg"]["indexed_at"]  # not re-scored


@pytest.mark.parametrize("processes", [1, 2])
def test_indexing_resumes_after_kill_9_keeping_every_finished_file(run, tmp_path, processes):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        shutil.copy(DEMO / "audio_train" / CLIPS[i % len(CLIPS)], folder / f"{i:03d}.ogg")
    db = tmp_path / "lib.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "soundtag.cli", "-q", "index", str(run), str(folder), "--db",
                            str(db), "--threads", "1", "--processes", str(processes)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a loaded machine may take long to start Python and torch
        while _count(db) < 20 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = _children(job.pid)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait()
    kept = _count(db)
    assert 20 <= kept < 300, f"the indexer finished or never started ({kept} rows): {job.stderr.read()[-500:]}"
    assert len(workers) == (processes if processes > 1 else 0)
    _wait_gone(workers)  # worker processes end with the indexer
    report = Library.index(db, [run], folder, progress=False)
    assert report.added == 300 - kept and report.unchanged == kept
    found = rows(db)
    assert len(found) == 300 and all(r["error"] is None and r["embedding"] for r in found.values())


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _wait_gone(pids: list[int], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.05)
    assert not alive, f"worker processes {alive} outlived their parent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_large_index_is_shared_among_worker_processes_row_for_row_as_in_one(run, tmp_path, monkeypatch):
    folder = demo_folder(tmp_path / "sounds")
    broken = broken_entries(folder)
    Library.index(tmp_path / "one.sqlite", [run], folder, progress=False, processes=1)
    log = tmp_path / "pids"
    content_hash = engine.content_hash

    def noted(path: str) -> str:  # forked workers inherit the patched function
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return content_hash(path)
    monkeypatch.setattr(engine, "content_hash", noted)
    monkeypatch.setattr(workers, "PROCESS_FILES", 1)  # shares of one file
    report = Library.index(tmp_path / "two.sqlite", [run], folder, progress=False, threads=1, processes=2)
    assert (report.added, len(report.failed)) == (len(CLIPS), len(broken))
    readers = {int(line) for line in log.read_text().split()}
    assert readers and os.getpid() not in readers
    one, two = rows(tmp_path / "one.sqlite"), rows(tmp_path / "two.sqlite")
    assert set(one) == set(two)
    for name in one:
        for column in ("error", "hash", "duration", "size", "scores", "embedding"):
            assert one[name][column] == two[name][column], (name, column)


def _count(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM files WHERE model IS NOT NULL").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_an_unreadable_file_is_recorded_and_indexed_once_readable(run, tmp_path):
    """Root reads every file, so as root the indexer runs without the capabilities that allow it."""
    folder = demo_folder(tmp_path / "sounds", CLIPS[:2])
    private = folder / "private.ogg"
    shutil.copy(DEMO / "audio_train" / CLIPS[2], private)
    private.chmod(0)
    db = tmp_path / "lib.sqlite"
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux) to drop the file-override capabilities")
        drop = "-dac_override,-dac_read_search"
        subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-m",
                        "soundtag.cli", "-q", "index", str(run), str(folder), "--db", str(db)],
                       check=True, stdout=subprocess.DEVNULL)
    else:
        Library.index(db, [run], folder, progress=False)
    assert "permission denied" in rows(db)["private.ogg"]["error"]
    assert rows(db)["more/" + CLIPS[0]]["error"] is None
    private.chmod(0o644)
    report = Library.index(db, [run], folder, progress=False)
    assert report.failed == {} and report.updated == 1
    assert rows(db)["private.ogg"]["error"] is None


def test_a_file_that_changes_while_it_is_indexed_is_recorded_and_taken_next_time(run, tmp_path, monkeypatch):
    folder = demo_folder(tmp_path / "sounds", CLIPS[:3])
    target = folder / CLIPS[1]
    decode = Tagger.decode

    def decode_while_written(self, path, whole=True):
        result = decode(self, path, whole)
        if Path(path) == target:
            with open(target, "ab") as f:  # another program appends while the file is decoded
                f.write(b"\0" * 100)
        return result

    monkeypatch.setattr(Tagger, "decode", decode_while_written)
    first = Library.index(tmp_path / "lib.sqlite", [run], folder, progress=False)
    assert first.failed == {str(target): CHANGED}
    monkeypatch.undo()
    second = Library.index(tmp_path / "lib.sqlite", [run], folder, progress=False)
    assert (second.updated, second.failed) == (1, {})
    assert rows(tmp_path / "lib.sqlite")[CLIPS[1]]["size"] == target.stat().st_size


@pytest.fixture(scope="module")
def library(run, tmp_path_factory) -> Path:
    folder = demo_folder(tmp_path_factory.mktemp("lib") / "sounds")
    db = folder.parent / "lib.sqlite"
    Library.index(db, [run], folder, progress=False)
    return db


def test_similar_is_exact_cosine_and_the_approximate_index_agrees(library):
    with Library(library) as lib:
        ids, vectors = next(lib.db.embeddings(lib.model.id))
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for query in range(len(ids)):
            sims = unit @ unit[query]
            order = [int(ids[j]) for j in np.argsort(-sims, kind="stable") if j != query][:4]
            exact = lib.similar(int(ids[query]), k=4)
            assert [h.id for h in exact] == order
            assert [h.score for h in exact] == pytest.approx(sorted(sims, reverse=True)[1:5], abs=1e-5)
            assert {h.id for h in lib.similar(int(ids[query]), k=4, approximate=True)} == set(order)


def test_a_file_outside_the_library_is_embedded_on_the_fly(library, tmp_path):
    copy = tmp_path / "copy.ogg"
    shutil.copy(library.parent / "sounds" / CLIPS[1], copy)
    with Library(library) as lib:
        first = lib.similar(copy, k=3)[0]
        assert first.name == CLIPS[1] and first.score == pytest.approx(1.0, abs=1e-5)
        assert len(lib.similar(TEST_CLIP, k=3)) == 3


def test_the_lookups_see_files_added_since_the_last_lookup(run, library, tmp_path):
    db = tmp_path / "lib.sqlite"
    shutil.copy(library, db)
    folder = library.parent / "sounds"
    with Library(db) as lib:
        before = {h.id for h in lib.similar(1, k=100)}
    shutil.copy(DEMO / "audio_train" / "d000150.ogg", tmp_path / "extra.ogg")
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.move(tmp_path / "extra.ogg", extra / "extra.ogg")
    Library.index(db, [run], extra, progress=False)
    with Library(db) as lib:
        after = {h.id for h in lib.similar(1, k=100)}
        assert len(after - before) == 1 and lib.search(lib.labels()[0], 0.0, 1000)
    assert folder.is_dir()


def test_index_search_and_similar_commands(run, tmp_path, capsys):
    folder = demo_folder(tmp_path / "sounds", CLIPS[:4])
    (folder / "notes.wav").write_text("text\n")
    db = tmp_path / "lib.sqlite"
    assert main(["index", str(run), str(folder), "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "4 added" in out and "1 not taggable" in out and "notes.wav: not readable as audio" in out
    with Library(db) as lib:
        label = lib.labels()[0]
    assert main(["search", label, "--db", str(db), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["label"] == label and 1 <= len(found["results"]) <= 4
    assert main(["similar", str(found["results"][0]["id"]), "--db", str(db), "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert main(["similar", str(TEST_CLIP), "--db", str(db), "-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["search", "Cello", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no such library" in capsys.readouterr().err
