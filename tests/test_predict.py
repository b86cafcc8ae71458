"""Scoring with trained runs (`soundtag.predict`), on real demo clips: test-time
augmentation views, score combination, the tagger against hand-made forward
passes, run ensembles, unreadable and resampled inputs, broken run folders, and
the `predict` / `tag` commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file
import soxr
import torch
import yaml
from helpers import bad_files, copy_run, decode, held_out, shared_run, spec_of, train_tiny, write_wav


from soundtag import predict, workers
from soundtag import config
from soundtag.cli import main
from soundtag.errors import ConfigError, SoundtagError
from soundtag.features import FeatureConfig
from soundtag.outputs import top_k
from soundtag.predict import TTA, Tagger, combine, ordered_map
from soundtag.scorer import RunScorer, torch_network
from soundtag.store import extract, one_torch_thread
from soundtag.task import Task
from soundtag.run import Run, RunError, tensors_digest

FPS = 44100 / 512  # frames per second of the default feature config


# ---------------------------------------------------------------- fixtures



pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, private_cache):
    return shared_run(tmp_path_factory, "cnn6")


@pytest.fixture(scope="module")
def run_b(tmp_path_factory, private_cache):
    return shared_run(tmp_path_factory, "mobilenet")


@pytest.fixture(scope="module")
def cfg(run_a) -> FeatureConfig:
    return Run.open(run_a).config.features


@pytest.fixture(scope="module")
def model_a(run_a) -> torch.nn.Module:
    return Run.open(run_a).load_model(0)


@pytest.fixture(scope="module")
def tagger_a(run_a) -> Tagger:
    return Tagger.load([run_a])


@pytest.fixture(scope="module")
def held_files() -> list:
    return held_out().files


@pytest.fixture(scope="module")
def specs(held_files, cfg) -> list[np.ndarray]:
    """Features of the first 12 held-out clips."""
    return [spec_of(f, cfg) for f in held_files[:12]]


@pytest.fixture(scope="module")
def long_spec(held_files, cfg) -> np.ndarray:
    """A real clip of at least 201 frames, cut to exactly 201."""
    for f in held_files:
        spec = spec_of(f, cfg)
        if spec.shape[1] >= 201:
            return spec[:, :201]
    pytest.fail("no held-out demo clip is 201 frames long")


def softmax_forward(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Softmax scores of a batch [n, 1, F, T], by hand."""
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))[0]
    return torch.softmax(logits.double(), dim=1).numpy()


# ---------------------------------------------------------------- TTA views


def test_full_mode_is_one_view_of_the_whole_clip(long_spec):
    views = TTA("full").views(long_spec, FPS)
    assert len(views) == 1
    assert views[0].shape == (1, 1, *long_spec.shape)
    np.testing.assert_array_equal(views[0][0, 0], long_spec)


def test_crops_have_each_length_at_evenly_spaced_offsets(long_spec):
    tta = TTA("crops", lengths=(0.5, 1.5), offsets=3)
    views = tta.views(long_spec, FPS)
    assert [v.shape for v in views] == [(3, 1, 64, 43), (3, 1, 64, 129)]
    for v, size in zip(views, (43, 129)):
        last = 201 - size
        for view, start in zip(v[:, 0], (0, last // 2, last)):
            np.testing.assert_array_equal(view, long_spec[:, start : start + size])
    # the last crop of every length ends flush with the clip
    assert all(np.array_equal(v[-1, 0], long_spec[:, -v.shape[-1]:]) for v in views)


def test_crops_never_repeat_an_offset(long_spec):
    clip = long_spec[:, :45]  # two frames longer than a 0.5 s crop
    (views,) = TTA("crops", lengths=(0.5,), offsets=5).views(clip, FPS)
    assert 1 < len(views) <= 3
    flat = views.reshape(len(views), -1)
    assert len(np.unique(flat, axis=0)) == len(views)


def test_crops_of_a_short_clip_wrap_it(long_spec):
    clip = long_spec[:, :30]
    views = TTA("crops", lengths=(1.0, 0.2), offsets=5).views(clip, FPS)
    assert [v.shape for v in views] == [(1, 1, 64, 86), (5, 1, 64, 17)]
    np.testing.assert_array_equal(views[0][0, 0], clip[:, np.arange(86) % 30])


def test_tiles_cover_the_clip_and_the_last_is_flush_with_its_end(long_spec):
    (tiles,) = TTA("tiles", tile=1.0, hop=0.5).views(long_spec, FPS)
    starts = [0, 43, 86, 115]  # every 43 frames, then one ending at frame 201
    assert tiles.shape == (len(starts), 1, 64, 86)
    for tile, start in zip(tiles[:, 0], starts):
        np.testing.assert_array_equal(tile, long_spec[:, start : start + 86])
    covered = np.zeros(201, bool)
    for s in starts:
        covered[s : s + 86] = True
    assert covered.all()


def test_tiles_on_the_hop_grid_add_no_extra_tile(long_spec):
    clip = long_spec[:, :172]  # 86 + 2 × 43 frames
    (tiles,) = TTA("tiles", tile=1.0, hop=0.5).views(clip, FPS)
    assert len(tiles) == 3
    np.testing.assert_array_equal(tiles[-1, 0], clip[:, 86:])


def test_a_clip_shorter_than_a_tile_is_wrapped_into_one_tile(long_spec):
    clip = long_spec[:, :50]
    (tiles,) = TTA("tiles", tile=2.0, hop=1.0).views(clip, FPS)
    assert tiles.shape == (1, 1, 64, 172)
    np.testing.assert_array_equal(tiles[0, 0], clip[:, np.arange(172) % 50])


@pytest.mark.parametrize("kwargs", [{"mode": "sliding"}, {"mean": "median"}, {"offsets": 0},
                                    {"hop": 0.0}, {"tile": -1.0}, {"lengths": ()}])
def test_invalid_tta_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        TTA(**kwargs)


# ---------------------------------------------------------------- combine / activate


def test_weighted_arithmetic_mean():
    scores = np.random.default_rng(0).random((3, 4, 5))
    weights = np.array([1.0, 2.0, 5.0])
    expected = sum(w * s for w, s in zip(weights, scores)) / weights.sum()
    np.testing.assert_allclose(combine(scores, "arithmetic", weights), expected, rtol=1e-6)
    np.testing.assert_allclose(combine(scores), scores.mean(0), rtol=1e-6)


def test_weighted_geometric_mean():
    scores = np.random.default_rng(1).random((3, 4, 5)) + 0.01
    weights = np.array([1.0, 2.0, 5.0])
    expected = np.prod([s ** (w / weights.sum()) for w, s in zip(weights, scores)], axis=0)
    np.testing.assert_allclose(combine(scores, "geometric", weights), expected, rtol=1e-5)
    np.testing.assert_allclose(combine(scores, "geometric"), np.cbrt(scores.prod(0)), rtol=1e-5)


def test_geometric_mean_of_a_zero_score_stays_finite():
    scores = np.array([[[0.0, 0.5]], [[0.5, 0.5]]])
    out = combine(scores, "geometric")
    np.testing.assert_allclose(out, [[np.sqrt(1e-7 * 0.5), 0.5]], rtol=1e-5)


def test_unknown_mean_is_a_config_error():
    with pytest.raises(ConfigError, match="median"):
        combine(np.ones((2, 1, 3)), "median")


def test_activate_softmax_and_sigmoid():
    logits = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    soft = Task(False).activate(logits)
    np.testing.assert_allclose(soft, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(Task(True).activate(logits), 1 / (1 + np.exp(-logits)), rtol=1e-5)


# ---------------------------------------------------------------- the tagger against hand-made passes


def test_full_mode_equals_each_clip_scored_alone_when_a_batch_has_equal_lengths(tagger_a, model_a, specs, cfg):
    clips = [s[:, :80] for s in specs if s.shape[1] >= 80][:5]
    assert len(clips) >= 3
    scores = tagger_a.score_clips([{cfg: c} for c in clips])
    expected = np.concatenate([softmax_forward(model_a, c[None, None]) for c in clips])
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)


def test_full_mode_keeps_the_input_order_over_clips_of_very_different_lengths(tagger_a, model_a, specs, cfg):
    # lengths more than 10 % apart are never batched together, so no clip is padded
    clips = [np.tile(spec, (1, 8))[:, :n] for spec, n in zip(specs, (250, 40, 150, 60, 100))]
    scores = tagger_a.score_clips([{cfg: c} for c in clips])
    expected = np.concatenate([softmax_forward(model_a, c[None, None]) for c in clips])
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_score_each_batches_only_equal_lengths_so_each_clip_scores_as_alone(tagger_a, specs, cfg):
    # 100 and 105 frames are within 10 %: `score` pads the shorter in one batch, `score_each` never does
    clips = [{cfg: np.tile(s, (1, 8))[:, :n]} for s, n in zip(specs, (100, 105, 100))]
    alone = [tagger_a.score([c]) for c in clips]
    scores, embeddings = tagger_a.score_each(clips)
    np.testing.assert_allclose(scores, np.concatenate([s for s, _ in alone]), atol=1e-6)
    np.testing.assert_allclose(embeddings, np.concatenate([e for _, e in alone]), atol=1e-5)
    _, padded = tagger_a.score(clips)
    assert np.abs(padded[0] - alone[0][1][0]).max() > 1e-3  # what score_each avoids


def test_crops_score_is_the_mean_of_the_per_view_scores(run_a, model_a, long_spec, cfg):
    tagger = Tagger.load([run_a], tta=TTA("crops", lengths=(0.5, 1.5), offsets=3))
    views = [long_spec[:, s : s + 43] for s in (0, 79, 158)] + [long_spec[:, s : s + 129] for s in (0, 36, 72)]
    per_view = np.concatenate([softmax_forward(model_a, v[None, None]) for v in views])
    np.testing.assert_allclose(tagger.score_clips([{cfg: long_spec}])[0], per_view.mean(0), atol=1e-5)


def test_tiles_score_is_the_mean_of_the_per_tile_scores(run_a, model_a, long_spec, cfg):
    tiles = np.stack([long_spec[:, s : s + 86] for s in (0, 43, 86, 115)])[:, None]
    per_tile = softmax_forward(model_a, tiles)
    arithmetic = Tagger.load([run_a], tta=TTA("tiles", tile=1.0, hop=0.5))
    np.testing.assert_allclose(arithmetic.score_clips([{cfg: long_spec}])[0], per_tile.mean(0), atol=1e-5)
    geometric = Tagger.load([run_a], tta=TTA("tiles", tile=1.0, hop=0.5, mean="geometric"))
    expected = np.exp(np.log(per_tile).mean(0))
    np.testing.assert_allclose(geometric.score_clips([{cfg: long_spec}])[0], expected, atol=1e-5)


def test_a_run_scores_with_the_views_its_config_names_unless_told_others(tmp_path, private_cache, long_spec,
                                                                         cfg):
    views = TTA("tiles", tile=1.0, hop=0.5)
    run = train_tiny(tmp_path / "run", epochs=1, tta={"mode": "tiles", "tile": 1.0, "hop": 0.5})
    clip = [{cfg: long_spec}]
    own, whole = Tagger.load([run.folder]).score_clips(clip), Tagger.load([run.folder], tta=TTA()).score_clips(clip)
    np.testing.assert_allclose(own, Tagger.load([run.folder], tta=views).score_clips(clip), atol=1e-6)
    assert np.abs(own - whole).max() > 1e-4
    # the held-out scores written at training (so the out-of-fold figure and thresholds) are views' scores too
    table = run.read_clips()
    held = [table.files[i] for i in np.flatnonzero(table.validation(0))]
    stored = extract(held, cfg, progress=False)
    expected, _ = RunScorer(run, [torch_network(run.load_model(0))], views).score(
        [{cfg: stored[i]} for i in range(len(held))])
    np.testing.assert_allclose(run.fold_scores(0), expected, atol=1e-5)


@pytest.mark.parametrize("tta, words", [
    ({"mode": "crops", "offsets": 2.5}, "offsets must be a whole number"), ({"offsets": True}, "offsets"),
    ({"mode": "tiles", "tile": 600, "hop": 0.001}, "each moment"), ({"mode": "crops", "lengths": [300, 300]},
                                                                    "3000 s of crops a clip"),
    ({"lengths": 2}, "tta.lengths must be a list"), ({"tiel": 2}, "unknown option.*tiel.*valid: hop"),
    ({"mode": "slices"}, "unknown TTA mode")])
def test_a_bad_tta_in_a_config_is_refused_before_training(tta, words):
    with pytest.raises(ConfigError, match=words):
        config.resolve("fast", overrides={"tta": tta}).validate()


def test_without_tta_the_command_line_scores_with_each_runs_own_views(run_a):
    from soundtag import cli
    args = cli.build_parser().parse_args(["predict", str(run_a), "A", "--out", "o"])
    assert cli.views_from(args) is None
    args = cli.build_parser().parse_args(["predict", str(run_a), "A", "--out", "o", "--tta", "tiles", "--tile", "3"])
    assert cli.views_from(args) == TTA("tiles", tile=3.0)


def test_tag_files_equals_scoring_the_computed_features(tagger_a, held_files, cfg):
    files = held_files[:4]
    scores, errors = tagger_a.tag_files(files, workers=1, progress=False)
    assert errors == {}
    expected, _ = tagger_a.score_each([{cfg: spec_of(f, cfg)} for f in files])  # each at its own length
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_tagging_in_chunks_on_two_threads_equals_scoring_all_at_once(run_a, held_files, cfg, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(predict, "CHUNK", 3)  # several chunks, one cut short by the unreadable file
    files = [*held_files[:4], bad_files(tmp_path)["text"], *held_files[4:9]]
    tagger = Tagger.load([run_a], threads=2)
    torch.set_num_threads(2)  # the module's tests run torch on one thread; see that tagging gives 2 back
    try:
        scores, errors = tagger.tag_files(files, workers=2, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert list(errors) == [4] and np.isnan(scores[4]).all()
    good = [f for i, f in enumerate(files) if i != 4]
    expected, _ = Tagger.load([run_a], threads=1).score_each([{cfg: spec_of(f, cfg)} for f in good])
    np.testing.assert_allclose(np.delete(scores, 4, axis=0), expected, atol=1e-6)


def _recording_pids(monkeypatch, folder: Path, pause: float = 0.0) -> Path:
    """Make every clip's features note the process that computes them, its torch
    threads and its scorer's (forked workers inherit the patched function), in
    a file of `folder`; `pause`: seconds each clip then takes."""
    log = folder / "pids"
    compute = predict.clip_features

    def noted(path, configs):
        owner = workers._owner
        threads = owner.scorer.threads if owner is not None else 0
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {torch.get_num_threads()} {threads}\n")
        time.sleep(pause)
        return compute(path, configs)
    monkeypatch.setattr(predict, "clip_features", noted)
    return log


def _pids(log: Path) -> set[int]:
    return {int(line.split()[0]) for line in log.read_text().splitlines()} if log.exists() else set()


def test_a_large_job_is_shared_among_worker_processes_and_scored_as_in_one(run_a, held_files, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(workers, "PROCESS_FILES", 2)  # shares of two files
    bad = bad_files(tmp_path)
    # an unreadable file second in its share, and a share of unreadable files only
    files = [*held_files[:5], bad["text"], bad["empty"], bad["missing"], *held_files[5:14]]
    expected, expected_embeddings, expected_errors = Tagger.load([run_a], threads=2, processes=1).score_files(
        files, progress=False)
    log = _recording_pids(monkeypatch, tmp_path)
    torch.set_num_threads(2)  # what the workers inherit
    try:
        with Tagger.load([run_a], threads=2, processes=2) as tagger:
            scores, embeddings, errors = tagger.score_files(files, progress=False)
    finally:
        torch.set_num_threads(1)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert {int(pid) for pid, _, _ in lines} - {os.getpid()} and all(int(pid) != os.getpid() for pid, _, _ in lines)
    assert all((torch_threads, scorer_threads) == ("1", "1") for _, torch_threads, scorer_threads in lines)
    assert list(errors) == [5, 6, 7] and errors == expected_errors
    assert np.isnan(scores[5:8]).all() and np.isnan(embeddings[5:8]).all()
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    np.testing.assert_allclose(embeddings, expected_embeddings, atol=1e-5)


def test_tagging_does_not_depend_on_how_the_job_is_shared_out(run_a, held_files):
    """Each file is scored at its own length: one process (chunks of 128) and two (shares of 32) agree."""
    assert len(held_files) >= 2 * workers.PROCESS_FILES
    one, _ = Tagger.load([run_a], threads=2, processes=1).tag_files(held_files, progress=False)
    with Tagger.load([run_a], threads=2, processes=2) as tagger:
        two, _ = tagger.tag_files(held_files, progress=False)
        assert tagger._pool is not None
    np.testing.assert_allclose(two, one, atol=1e-6)


def test_a_small_job_or_one_process_is_tagged_in_this_process(run_a, held_files, tmp_path, monkeypatch):
    log = _recording_pids(monkeypatch, tmp_path)
    small = held_files[: 2 * workers.PROCESS_FILES - 1]  # short of 32 files for each of two processes
    with Tagger.load([run_a], threads=2) as tagger:
        tagger.tag_files(small, progress=False)
        assert tagger._pool is None
    monkeypatch.setattr(workers, "PROCESS_FILES", 1)
    with Tagger.load([run_a], threads=2, processes=1) as tagger:
        tagger.tag_files(held_files[:4], progress=False)
        assert tagger._pool is None
    with Tagger.load([run_a], threads=2) as tagger:
        tagger.tag_files(held_files[:4], workers=1, progress=False)  # feature threads asked for: here
        assert tagger._pool is None
    assert _pids(log) == {os.getpid()}


def test_worker_processes_are_kept_for_the_next_job_and_stop_on_close(run_a, held_files, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "PROCESS_FILES", 1)
    log = _recording_pids(monkeypatch, tmp_path)
    tagger = Tagger.load([run_a], threads=1, processes=2)
    tagger.tag_files(held_files[:6], progress=False)
    first = _pids(log)
    pool = tagger._pool
    tagger.tag_files(held_files[6:12], progress=False)
    assert tagger._pool is pool and _pids(log) == first  # the same processes, no new ones
    processes = list(pool._pool._processes.values())
    tagger.close()
    assert tagger._pool is None and not any(p.is_alive() for p in processes)


def test_a_worker_process_that_dies_fails_the_job_with_one_clear_error_and_the_next_job_runs(
        run_a, held_files, monkeypatch):
    monkeypatch.setattr(workers, "PROCESS_FILES", 1)
    with Tagger.load([run_a], threads=1, processes=2) as tagger:
        expected, _ = tagger.tag_files(held_files[:6], progress=False)
        victim = next(iter(tagger._pool._pool._processes.values()))
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        with pytest.raises(SoundtagError, match="a worker process died .* while tagging 6 files"):
            tagger.tag_files(held_files[:6], progress=False)
        assert tagger._pool is None
        again, _ = tagger.tag_files(held_files[:6], progress=False)  # on fresh processes
    np.testing.assert_allclose(again, expected, atol=1e-6)


def test_closing_a_tagger_during_a_job_on_another_thread_fails_that_job_instead_of_hanging(run_a, held_files,
                                                                                         tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "PROCESS_FILES", 1)
    _recording_pids(monkeypatch, tmp_path, pause=0.1)  # 24 files of 0.1 s each on two workers
    tagger = Tagger.load([run_a], threads=1, processes=2)
    outcome: list[BaseException | None] = []

    def job() -> None:
        try:
            tagger.tag_files(held_files[:24], progress=False)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=job)
    thread.start()
    time.sleep(0.5)
    tagger.close()
    thread.join(60)
    assert not thread.is_alive(), "the job hung after close()"
    assert isinstance(outcome[0], SoundtagError) and "stopped during the job" in str(outcome[0])


def test_a_dropped_tagger_stops_its_workers(run_a, held_files, monkeypatch):
    monkeypatch.setattr(workers, "PROCESS_FILES", 1)
    tagger = Tagger.load([run_a], threads=1, processes=2)
    tagger.tag_files(held_files[:4], progress=False)
    processes = list(tagger._pool._pool._processes.values())
    del tagger  # no close(): nothing else refers to the tagger, so its workers go with it
    deadline = time.monotonic() + 30
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in processes)


def test_predict_takes_the_number_of_processes(run_a):
    from soundtag import cli
    args = cli.build_parser().parse_args(["predict", str(run_a), "A", "--out", "o", "--processes", "1"])
    with cli.load_tagger(args) as tagger:
        assert tagger.processes == 1
    args = cli.build_parser().parse_args(["predict", str(run_a), "A", "--out", "o", "--threads", "3"])
    with cli.load_tagger(args) as tagger:
        assert tagger.processes == 3


def test_ordered_map_keeps_the_order_and_bounds_the_work_in_flight():
    lock, state = threading.Lock(), {"running": 0, "most": 0}

    def slow_square(x: int) -> int:
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        time.sleep(0.002 * (x % 3))
        with lock:
            state["running"] -= 1
        return x * x

    taken = []

    def items():
        for x in range(40):
            taken.append(x)
            yield x

    for y, (x, square) in enumerate(zip(range(40), ordered_map(slow_square, items(), threads=3, ahead=5))):
        assert square == x * x
        assert len(taken) <= y + 5  # never more than `ahead` items taken beyond those consumed
    assert 1 < state["most"] <= 3


def test_torch_runs_on_one_thread_while_any_caller_tags_and_gets_its_setting_back_after_the_last():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = one_torch_thread(), one_torch_thread()
        first.__enter__()
        second.__enter__()
        assert torch.get_num_threads() == 1
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 1  # the second caller is still tagging
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_ordered_map_passes_an_error_on():
    def fails_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(ValueError, match="three"):
        list(ordered_map(fails_on_three, range(10), threads=2))


# ---------------------------------------------------------------- ensembles


@pytest.fixture(scope="module")
def clip_feats(specs, cfg):
    return [{cfg: s} for s in specs[:6]]


def test_weighted_ensemble_is_the_weighted_mean_of_each_runs_scores(run_a, run_b, clip_feats):
    alone_a = Tagger.load([run_a]).score_clips(clip_feats)
    alone_b = Tagger.load([run_b]).score_clips(clip_feats)
    assert not np.allclose(alone_a, alone_b, atol=1e-3)  # two different runs
    ensemble = Tagger.load([run_a, run_b], weights=[3.0, 1.0]).score_clips(clip_feats)
    np.testing.assert_allclose(ensemble, (3 * alone_a + alone_b) / 4, atol=1e-6)


def test_geometric_ensemble(run_a, run_b, clip_feats):
    alone_a = Tagger.load([run_a]).score_clips(clip_feats).astype(np.float64)
    alone_b = Tagger.load([run_b]).score_clips(clip_feats).astype(np.float64)
    tagger = Tagger.load([run_a, run_b], weights=[1.0, 3.0], mean="geometric")
    expected = np.exp((np.log(alone_a) + 3 * np.log(alone_b)) / 4)
    np.testing.assert_allclose(tagger.score_clips(clip_feats), expected, rtol=1e-4)


def test_one_weight_per_run_is_required(run_a, run_b):
    with pytest.raises(ConfigError, match="weights"):
        Tagger.load([run_a, run_b], weights=[1.0])


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [2.0, -1.0]])
def test_weights_must_be_non_negative_with_a_positive_total(run_a, run_b, weights, clip_feats):
    with np.errstate(all="ignore"), pytest.raises(ConfigError, match="weight"):
        Tagger.load([run_a, run_b], weights=weights).score_clips(clip_feats)


def test_runs_over_different_classes_refuse_to_ensemble(run_a, run_b, tmp_path):
    other = copy_run(run_b, tmp_path / "renamed")
    info = json.loads((other / "run.json").read_text())
    info["classes"][0] = "Kazoo"
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="classes differ"):
        Tagger.load([run_a, other])


def test_unknown_backend_is_a_config_error(run_a):
    with pytest.raises(ConfigError, match="backend"):
        Tagger.load([run_a], backend="tensorrt")


def test_multi_label_runs_average_sigmoid_scores_over_tiles(tmp_path_factory, long_spec, cfg):
    run = shared_run(tmp_path_factory, "multilabel")
    model = Run.open(run).load_model(0)
    tiles = np.stack([long_spec[:, s : s + 86] for s in (0, 43, 86, 115)])[:, None]
    with torch.inference_mode():
        per_tile = torch.sigmoid(model(torch.from_numpy(tiles))[0]).numpy()
    tagger = Tagger.load([run], tta=TTA("tiles", tile=1.0, hop=0.5))
    assert tagger.multilabel
    np.testing.assert_allclose(tagger.score_clips([{cfg: long_spec}])[0], per_tile.mean(0), atol=1e-5)


# ---------------------------------------------------------------- awkward inputs


def test_unreadable_files_get_nan_rows_and_reasons(tagger_a, held_files, tmp_path):
    bad = bad_files(tmp_path)
    files = [held_files[0], bad["missing"], bad["empty"], bad["text"], held_files[1]]
    scores, errors = tagger_a.tag_files(files, workers=1, progress=False)
    assert sorted(errors) == [1, 2, 3]
    assert "not found" in errors[1]
    assert "empty" in errors[2]
    assert "not readable as audio" in errors[3]
    assert np.isnan(scores[1:4]).all()
    good, none = tagger_a.tag_files([held_files[0], held_files[1]], workers=1, progress=False)
    assert none == {}
    np.testing.assert_allclose(scores[[0, 4]], good, atol=1e-6)


def test_only_unreadable_files(tagger_a, tmp_path):
    bad = bad_files(tmp_path)
    scores, errors = tagger_a.tag_files(list(bad.values()), workers=1, progress=False)
    assert scores.shape == (3, len(tagger_a.classes)) and np.isnan(scores).all()
    assert sorted(errors) == [0, 1, 2]


def test_audio_at_another_sample_rate_scores_like_the_original(tagger_a, held_files, tmp_path):
    files = held_files[:8]
    resampled = []
    for i, f in enumerate(files):
        wave = decode(f, 44100)
        resampled.append(write_wav(tmp_path / f"r{i}.wav", soxr.resample(wave, 44100, 22050), 22050))
    original, _ = tagger_a.tag_files(files, workers=1, progress=False)
    again, errors = tagger_a.tag_files(resampled, workers=1, progress=False)
    assert errors == {}
    own = np.abs(original - again).sum(1)
    others = np.abs(original[:, None] - original[None]).sum(-1)[~np.eye(len(files), dtype=bool)]
    # a resampled clip scores far closer to its original than two different clips do
    assert np.median(own) < 0.5 * np.median(others)
    top = np.sort(original, 1)
    sure = int(np.argmax(top[:, -1] - top[:, -2]))
    assert again[sure].argmax() == original[sure].argmax()


# ---------------------------------------------------------------- broken run folders


def _break(run: Path, how: str, dest: Path):
    if how == "not a run":
        dest.mkdir()
        (dest / "notes.txt").write_text("hello")
        return dest
    broken = copy_run(run, dest)
    if how == "no weights":
        (broken / "fold0" / "model.safetensors").unlink()
    elif how == "classes":
        info = json.loads((broken / "run.json").read_text())
        info["classes"] = info["classes"][:-1]
        (broken / "run.json").write_text(json.dumps(info))
    elif how == "n_mels":
        saved = yaml.safe_load((broken / "config.yaml").read_text())
        saved["features"]["n_mels"] = 128
        (broken / "config.yaml").write_text(yaml.safe_dump(saved))
    elif how == "unknown model":
        saved = yaml.safe_load((broken / "config.yaml").read_text())
        saved["model"]["name"] = "resnet99"
        (broken / "config.yaml").write_text(yaml.safe_dump(saved))
    elif how == "invalid yaml":
        (broken / "config.yaml").write_text("model: [unclosed\n  - {")
    elif how == "no classes":
        info = json.loads((broken / "run.json").read_text())
        del info["classes"]
        (broken / "run.json").write_text(json.dumps(info))
    elif how == "invalid json":
        (broken / "run.json").write_text("{not json")
    elif how in ("nan weights", "flipped byte", "truncated weights"):
        _damage(broken / "fold0" / "model.safetensors", how)
    return broken


def _damage(path: Path, how: str) -> None:
    if how == "nan weights":  # a diverged run: NaN weights with a matching checksum
        tensors = load_file(str(path))
        tensors["head.weight"][0, 0] = float("nan")
        save_file(tensors, str(path), metadata={"sha256": tensors_digest(tensors)})
    elif how == "flipped byte":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN = {"no weights": "no trained fold", "classes": "weights are for 23 classes but run.json lists 22",
          "not a run": "not a run folder", "n_mels": "do not fit",
          "unknown model": "unknown model 'resnet99'", "invalid yaml": "config.yaml: not valid YAML",
          "no classes": "run.json: incomplete", "invalid json": "run.json: unreadable",
          "nan weights": "NaN or inf", "flipped byte": "do not match their checksum",
          "truncated weights": "unreadable weights"}


@pytest.mark.parametrize("how", list(BROKEN))
def test_broken_runs_are_run_errors(run_a, tmp_path, how):
    broken = _break(run_a, how, tmp_path / "broken")
    with pytest.raises(RunError, match=BROKEN[how]):
        Tagger.load([broken])


@pytest.mark.parametrize("how", list(BROKEN))
def test_the_cli_reports_broken_runs_without_a_traceback(run_a, tmp_path, how, capsys, held_files):
    broken = _break(run_a, how, tmp_path / "broken")
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    shutil.copy(held_files[0], audio_dir)
    assert main(["predict", str(broken), str(audio_dir), "--out", str(tmp_path / "p.csv"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert BROKEN[how] in err and "Traceback" not in err
    assert main(["tag", str(broken), str(held_files[0])]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_a_missing_run_folder_is_a_run_error(tmp_path):
    with pytest.raises(SoundtagError):
        Tagger.load([tmp_path / "nowhere"])


# ---------------------------------------------------------------- the predict and tag commands


@pytest.fixture
def audio_folder(tmp_path, held_files) -> Path:
    folder = tmp_path / "audio"
    (folder / "sub").mkdir(parents=True)
    for f in held_files[:3]:
        shutil.copy(f, folder)
    shutil.copy(held_files[3], folder / "sub")
    (folder / "broken.wav").write_text("not audio\n")
    (folder / "readme.txt").write_text("not an audio suffix, ignored\n")
    return folder


def test_predict_a_folder_as_a_kaggle2018_submission(run_a, tagger_a, audio_folder, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert main(["predict", str(run_a), str(audio_folder), "--out", str(out), "--format", "kaggle2018",
                 "--workers", "1"]) == 0
    assert "5 files tagged, 1 unreadable" in capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False)
    files = sorted(f for f in audio_folder.rglob("*") if f.suffix in (".ogg", ".wav"))
    assert list(table.columns) == ["fname", "label"]
    assert table.fname.tolist() == [str(f.relative_to(audio_folder)) for f in files]
    scores, _ = tagger_a.tag_files(files, workers=1, progress=False)
    for name, label, row in zip(table.fname, table.label, top_k(scores, tagger_a.classes, 3)):
        if name == "broken.wav":
            assert label == ""
        else:
            assert label.split(" ") == [c for c, _ in row]
    sidecar = pd.read_csv(tmp_path / "sub.csv.errors.csv")
    assert sidecar.fname.tolist() == ["broken.wav"]
    assert "not readable as audio" in sidecar.error[0]


def test_predict_from_a_csv_list_keeps_its_order(run_a, tagger_a, held_files, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    names = []
    for f in reversed(held_files[:4]):
        shutil.copy(f, clips)
        names.append(f"clips/{f.name}")
    names.append("clips/gone.ogg")
    (tmp_path / "list.csv").write_text("fname\n" + "\n".join(names) + "\n")
    out = tmp_path / "tags.csv"
    assert main(["predict", str(run_a), str(tmp_path / "list.csv"), "--out", str(out), "--top-k", "2",
                 "--workers", "1"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert table.fname.tolist() == names
    assert list(table.columns) == ["fname", "label_1", "score_1", "label_2", "score_2", "error"]
    scores, _ = tagger_a.tag_files([tmp_path / n for n in names[:-1]], workers=1, progress=False)
    best = top_k(scores, tagger_a.classes, 2)
    assert table.label_1.tolist()[:-1] == [row[0][0] for row in best]
    np.testing.assert_allclose(table.score_1[:-1].astype(float), [row[0][1] for row in best], atol=1e-6)
    assert "not found" in table.error.iloc[-1] and table.label_1.iloc[-1] == ""


def test_predict_tags_uses_the_runs_tuned_thresholds(run_a, tagger_a, audio_folder, tmp_path):
    out = tmp_path / "tags.csv"
    assert main(["predict", str(run_a), str(audio_folder), "--out", str(out), "--format", "tags",
                 "--workers", "1"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    thresholds = Run.open(run_a).thresholds()
    files = sorted(f for f in audio_folder.rglob("*") if f.suffix in (".ogg", ".wav"))
    scores, errors = tagger_a.tag_files(files, workers=1, progress=False)
    for i, row in table.iterrows():
        expected = [c for j, c in enumerate(tagger_a.classes) if scores[i, j] >= thresholds[j]]
        assert (row.labels.split(",") if row.labels else []) == expected
        assert row.error == errors.get(i, "")
    assert table.error.str.contains("not readable as audio").sum() == 1


def test_predict_passes_ensemble_and_tta_options_to_the_tagger(run_a, run_b, audio_folder, tmp_path):
    out = tmp_path / "scores.csv"
    assert main(["predict", str(run_a), str(audio_folder), "--runs", str(run_b), "--weights", "3", "1",
                 "--tta", "tiles", "--tile", "1", "--tile-hop", "0.5", "--format", "kaggle2019",
                 "--out", str(out), "--workers", "1"]) == 0
    table = pd.read_csv(out)
    tagger = Tagger.load([run_a, run_b], weights=[3, 1], tta=TTA("tiles", tile=1.0, hop=0.5))
    files = sorted(f for f in audio_folder.rglob("*") if f.suffix in (".ogg", ".wav"))
    scores, errors = tagger.tag_files(files, workers=1, progress=False)
    assert list(table.columns) == ["fname", *tagger.classes]
    np.testing.assert_allclose(table[tagger.classes].to_numpy(), scores, atol=2e-6)
    assert list(errors) == [table.fname.tolist().index("broken.wav")]


def test_predict_unknown_format_is_an_error(run_a, audio_folder, tmp_path, capsys):
    assert main(["predict", str(run_a), str(audio_folder), "--out", str(tmp_path / "x"), "--format", "xml"]) == 2
    assert "unknown output format" in capsys.readouterr().err


def test_tag_prints_each_files_top_tags(run_a, tagger_a, held_files, tmp_path, capsys):
    files = [held_files[0], held_files[1], tmp_path / "missing.wav"]
    assert main(["tag", str(run_a), *map(str, files), "--top-k", "2", "--out", str(tmp_path / "t")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    scores, _ = tagger_a.tag_files(files[:2], workers=1, progress=False)
    for line, path, row in zip(lines, files, top_k(scores, tagger_a.classes, 2)):
        assert line == f"{path}: " + ", ".join(f"{c} {s:.2f}" for c, s in row)
    assert lines[2].startswith(f"{files[2]}: ") and "not found" in lines[2]
    assert not (tmp_path / "t").exists()  # short clips get no timeline
