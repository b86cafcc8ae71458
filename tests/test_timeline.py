"""Long recordings (`soundtag.timeline`): a 40-odd-second recording made of
held-out demo clips and silences, scored window by window; events merged from
hand-made timelines; the plot; and `soundtag tag --long`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import PNG_MAGIC, decode, held_out, shared_run, write_wav

from soundtag import features
from soundtag.cli import main
from soundtag.errors import ConfigError
from soundtag.predict import Tagger
from soundtag.timeline import Timeline, timeline

RATE = 44100
FPS = RATE / 512



pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, private_cache):
    return shared_run(tmp_path_factory, "cnn6")


@pytest.fixture(scope="module")
def tagger(run) -> Tagger:
    return Tagger.load([run])


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """(path, wave, segments): held-out clips of known classes, 0.5 s of silence
    after each, until the recording lasts 42 s."""
    part = held_out()
    pieces, segments, t = [], [], 0.0
    gap = np.zeros(RATE // 2, np.float32)
    for i, f in enumerate(part.files):
        wave = decode(f, RATE)
        segments.append((t, t + len(wave) / RATE, part.labels(i)[0]))
        pieces += [wave, gap]
        t += (len(wave) + len(gap)) / RATE
        if t >= 42:
            break
    wave = np.concatenate(pieces)
    path = write_wav(tmp_path_factory.mktemp("long") / "long.wav", wave, RATE)
    return path, wave, segments


@pytest.fixture(scope="module")
def line(tagger, recording) -> Timeline:
    return timeline(tagger, recording[0], window=2.0, hop=1.0)


def test_the_recording_is_long_and_made_of_known_clips(recording):
    path, wave, segments = recording
    assert len(wave) / RATE >= 40
    assert len(segments) >= 20
    assert len({label for _, _, label in segments}) >= 10


def test_windows_start_every_hop_and_cover_the_recording(line, recording):
    _, wave, _ = recording
    frames = 1 + len(wave) // 512
    size, step = round(2.0 * FPS), round(1.0 * FPS)
    regular = np.arange(0, frames - size + 1, step)
    expected = regular if regular[-1] == frames - size else np.r_[regular, frames - size]
    np.testing.assert_allclose(line.starts, expected / FPS)
    assert line.window == size / FPS
    # the last window ends with the last frame
    assert line.starts[-1] + line.window == pytest.approx(frames / FPS)
    assert line.scores.shape == (len(line.starts), len(line.classes))
    np.testing.assert_allclose(line.scores.sum(1), 1.0, atol=1e-5)


def test_each_window_scores_like_its_stretch_of_audio_alone(line, tagger, recording):
    _, wave, _ = recording
    cfg = tagger.feature_configs[0]
    spec = features.compute(wave, cfg)
    picks = [0, 7, len(line.starts) // 2, len(line.starts) - 1]
    size = round(2.0 * FPS)
    clips = [{cfg: spec[:, round(line.starts[i] * FPS):][:, :size]} for i in picks]
    np.testing.assert_allclose(line.scores[picks], tagger.score_clips(clips), atol=1e-5)


def test_windows_over_different_clips_score_differently(line):
    assert np.abs(line.scores - line.scores.mean(0)).max() > 1e-3


def test_table_has_start_end_and_a_column_per_class(line):
    table = line.table()
    assert list(table.columns) == ["start", "end", *line.classes]
    assert len(table) == len(line.starts)
    np.testing.assert_allclose(table.start, line.starts)
    np.testing.assert_allclose(table.end - table.start, line.window)
    np.testing.assert_allclose(table[line.classes].to_numpy(), line.scores)


def test_events_of_a_real_recording(line):
    events = line.events(0.0)  # every window of every class is a hit: one event per class
    assert list(events.columns) == ["start", "end", "label", "score"]
    assert sorted(events.label) == sorted(line.classes)
    assert (events.start == 0).all()
    np.testing.assert_allclose(events.end, line.starts[-1] + line.window)
    np.testing.assert_allclose(events.sort_values("label").score, line.scores.max(0)[np.argsort(line.classes)])
    assert line.events(1.01).empty


def hand_made() -> Timeline:
    scores = np.array([
        # a    b    c
        [0.9, 0.1, 0.2],
        [0.8, 0.6, 0.2],
        [0.1, 0.6, 0.3],
        [0.6, 0.7, 0.2],
        [0.2, 0.1, 0.2],
        [0.5, 0.1, 0.2],
    ])
    return Timeline(np.arange(6) * 1.0, 2.0, scores, ["a", "b", "c"])


def rows(events: pd.DataFrame) -> list[tuple]:
    return [(float(s), float(e), str(label), round(float(p), 6)) for s, e, label, p in events.itertuples(index=False)]


def test_events_merge_consecutive_windows_above_the_threshold():
    events = hand_made().events(0.5)
    assert rows(events) == [
        (0.0, 3.0, "a", 0.9),   # windows 0-1
        (1.0, 5.0, "b", 0.7),   # windows 1-3
        (3.0, 5.0, "a", 0.6),   # window 3
        (5.0, 7.0, "a", 0.5),   # window 5: a score equal to the threshold counts
    ]


def test_events_with_a_threshold_per_class():
    events = hand_made().events(np.array([0.85, 0.65, 0.25]))
    assert rows(events) == [(0.0, 2.0, "a", 0.9), (2.0, 4.0, "c", 0.3), (3.0, 5.0, "b", 0.7)]


def test_no_events_below_every_threshold():
    events = hand_made().events(0.95)
    assert events.empty and list(events.columns) == ["start", "end", "label", "score"]


def test_plot_writes_a_png(line, tmp_path):
    path = line.plot(tmp_path / "t.png", top=5)
    assert path == tmp_path / "t.png" and path.read_bytes()[:8] == PNG_MAGIC


def test_a_recording_shorter_than_a_window_is_one_window(tagger, tmp_path):
    wave = decode(held_out().files[0], RATE)[: RATE // 2]
    short = timeline(tagger, write_wav(tmp_path / "s.wav", wave, RATE), window=2.0, hop=1.0)
    assert list(short.starts) == [0.0] and short.scores.shape == (1, len(tagger.classes))


@pytest.mark.parametrize("window, hop", [(0.0, 1.0), (2.0, -1.0)])
def test_window_and_hop_must_be_positive(tagger, recording, window, hop):
    with pytest.raises(ConfigError):
        timeline(tagger, recording[0], window=window, hop=hop)


def test_tag_long_writes_timeline_events_and_plot(run, recording, tmp_path, capsys):
    path = recording[0]
    short = held_out().files[0]
    out = tmp_path / "timelines"
    assert main(["tag", str(run), str(path), str(short), "--long", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{path}: ") and "timeline:" in printed
    table = pd.read_csv(out / "long.timeline.csv")
    assert list(table.columns[:2]) == ["start", "end"] and len(table.columns) == 25
    assert len(table) >= 39
    events = pd.read_csv(out / "long.events.csv")
    assert list(events.columns) == ["start", "end", "label", "score"]
    assert (out / "long.timeline.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in out.iterdir()) == ["long.events.csv", "long.timeline.csv", "long.timeline.png"]
