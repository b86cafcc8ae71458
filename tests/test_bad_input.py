"""Bad input, generated here (no binary fixtures): broken, odd and hostile audio
files and label CSVs, through the commands people run on them.

Each audio kind is one file in a folder-per-class dataset beside a few good
clips; `features`, `predict` and `tag` each run once over the whole corpus and
every kind is then checked against that run: a bad file is named with its
reason and counted, valid-but-odd audio is processed, damage that still
decodes is a warning naming the file. Each label-CSV kind is its own small
dataset: one `error:` line naming the file and line, exit 2, or a warning and
the job goes on.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import PNG_MAGIC, error_line, shared_run
from soundtag import audio
from soundtag.cli import main, printable

RATE = 16000
ROOT_USER = os.geteuid() == 0


def tone(seconds: float = 1.0, rate: int = RATE, channels: int = 1, hz: float = 440.0) -> np.ndarray:
    """A decaying tone with a little noise, [frames, channels] float32."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * hz * t) * np.exp(-t % 1.0) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32)


def wav(path: Path, wave: np.ndarray | None = None, rate: int = RATE, subtype: str = "PCM_16", **kw) -> Path:
    sf.write(os.fsencode(path), tone() if wave is None else wave, rate, subtype=subtype, **kw)
    return path


def cut(path: Path, fraction: float) -> Path:
    """Keep the first `fraction` of the file's bytes."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    return path


def needs_format(name: str) -> None:
    if name not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {name}")


def encoded(fmt: str, subtype: str, seconds: float = 10.0, rate: int = 8000) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        needs_format(fmt)
        return wav(path, tone(seconds, rate), rate, subtype, format=fmt)
    return write


def truncated(write: Callable[[Path], Path], fraction: float) -> Callable[[Path], Path]:
    return lambda path: cut(write(path), fraction)


def ogg_cut_in_first_audio_page(path: Path) -> Path:
    """An OGG/Vorbis file cut just after its header pages: no audio decodes."""
    encoded("OGG", "VORBIS")(path)
    raw = path.read_bytes()
    audio_page = raw.index(b"OggS", raw.index(b"OggS", 1) + 1)  # after the identification and setup pages
    path.write_bytes(raw[: audio_page + 30])
    return path


def put(data: bytes) -> Callable[[Path], Path]:
    """A file holding `data`."""
    def write(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return write


def header_only(path: Path) -> Path:
    """A WAV's 44-byte header and nothing after it."""
    path.write_bytes(wav(path).read_bytes()[:44])
    return path


def symlink_loop(path: Path) -> Path:
    os.symlink(path.name, path)
    return path


def unreadable(path: Path) -> Path:
    if ROOT_USER:
        pytest.skip("running as root, whom mode bits do not stop; "
                    "test_unreadable_file_as_another_user covers this kind")
    wav(path).chmod(0)
    return path


def named(name: str | bytes) -> Callable[[Path], Path]:
    """A good clip under a given (odd) name; bytes for a name that is not UTF-8."""
    return lambda path: wav(path.parent / (os.fsdecode(name) if isinstance(name, bytes) else name))


@dataclass(frozen=True)
class Kind:
    """One kind of input: how to write it into a folder (returns the path), the
    reason a command skips it (a regex; None: processed) and the warnings naming it."""

    write: Callable[[Path], Path]
    reason: str | None = None
    warnings: tuple[str, ...] = ()
    listed: bool = True  # whether the dataset reader lists it (`features`)


AUDIO: dict[str, Kind] = {
    "empty": Kind(put(b""), r"empty file \(0 bytes\)"),
    "header-only-wav": Kind(header_only, r"truncated: the header promises 32000 bytes of audio, the file holds 0"),
    "truncated-wav": Kind(truncated(wav, 0.5), r"truncated: the header promises \d+ bytes"),
    "truncated-flac": Kind(truncated(encoded("FLAC", "PCM_16", 2.0), 0.5), "flac decoder lost sync"),
    "truncated-ogg-early": Kind(ogg_cut_in_first_audio_page,
                                "truncated: the Ogg stream ends early and none of its audio decodes"),
    "truncated-ogg-late": Kind(truncated(encoded("OGG", "VORBIS"), 0.6), None,
                               (r"truncated: the Ogg stream stops without its end-of-stream page; \d+\.\d+ s decoded",)),
    "truncated-mp3": Kind(truncated(encoded("MP3", "MPEG_LAYER_III"), 0.5), None,
                          (r"truncated: the header promises 10\.00 s, \d\.\d\d s decoded",
                           r"MP3 decoder: Warning: Xing stream size off")),
    "text-as-mp3": Kind(put(b"not audio at all\n" * 40), "no decodable MPEG audio frames", ("MP3 decoder: Note: ",)),
    "text-as-wav": Kind(put(b"fname,label\nthis is not audio\n" * 20), r"not readable as audio \(Format not recognised"),
    "png-as-wav": Kind(put(PNG_MAGIC + bytes(range(256)) * 4), r"not readable as audio \(Format not recognised"),
    "nan-float-wav": Kind(lambda p: wav(p, np.where(tone() > 0.4, np.nan, tone()), subtype="FLOAT"),
                          "contains NaN or infinite samples"),
    "inf-float-wav": Kind(lambda p: wav(p, np.where(tone() > 0.4, np.inf, tone()), subtype="FLOAT"),
                          "contains NaN or infinite samples"),
    "pcm-8-bit": Kind(lambda p: wav(p, subtype="PCM_U8")),
    "pcm-24-bit": Kind(lambda p: wav(p, subtype="PCM_24")),
    "pcm-32-bit": Kind(lambda p: wav(p, subtype="PCM_32")),
    "float-32-bit": Kind(lambda p: wav(p, subtype="FLOAT")),
    "float-64-bit": Kind(lambda p: wav(p, subtype="DOUBLE")),
    "8-khz": Kind(lambda p: wav(p, tone(1.0, 8000), 8000)),
    "192-khz": Kind(lambda p: wav(p, tone(0.5, 192000), 192000)),
    "6-channels": Kind(lambda p: wav(p, tone(channels=6))),
    "10-ms-clip": Kind(lambda p: wav(p, tone(0.01))),
    "20-minute-clip": Kind(lambda p: wav(p, tone(1200.0, 8000), 8000)),
    "digital-silence": Kind(lambda p: wav(p, np.zeros((RATE, 1), np.float32)), None,
                            (r"digital silence \(every sample is zero\)",)),
    "clipping": Kind(lambda p: wav(p, np.clip(20 * tone(), -1, 1))),
    "dc-offset": Kind(lambda p: wav(p, 0.4 + 0.5 * tone(), subtype="FLOAT")),
    "ogg": Kind(encoded("OGG", "VORBIS", 1.0)),
    "mp3": Kind(encoded("MP3", "MPEG_LAYER_III", 1.0)),
    "flac": Kind(encoded("FLAC", "PCM_24", 1.0)),
    "wav-named-flac": Kind(lambda p: wav(p.with_suffix(".flac"), format="WAV")),
    "non-utf8-name": Kind(named(b"caf\xe9 non-utf8.wav")),
    "unicode-name": Kind(named("naïve Ελληνικά 日本.wav")),
    "spaces-and-quotes": Kind(named("it's a \"quoted\" name, with spaces.wav")),
    "symlink": Kind(lambda p: (os.symlink("../good/g0.wav", p), p)[1]),
    "symlink-loop": Kind(symlink_loop, r"symlink loop|Too many levels of symbolic links"),
    "broken-symlink": Kind(lambda p: (os.symlink("nowhere.wav", p), p)[1],
                           r"broken symlink \(its target nowhere.wav does not exist\)|file not found"),
    "directory-named-wav": Kind(lambda p: (p.mkdir(), p)[1], "is a directory, not an audio file"),
    "fifo": Kind(lambda p: (os.mkfifo(p), p)[1], r"not a regular file \(a pipe, socket or device\)",
                 listed=False),
    "unreadable": Kind(unreadable, "permission denied|Permission denied"),
}
SUFFIX = {"truncated-flac": ".flac", "truncated-ogg-early": ".ogg", "truncated-ogg-late": ".ogg",
          "truncated-mp3": ".mp3", "text-as-mp3": ".mp3", "ogg": ".ogg", "mp3": ".mp3", "flac": ".flac"}


@dataclass
class Corpus:
    root: Path
    files: dict[str, Path]  # kind → path
    missing: dict[str, str]  # kind → why it could not be written here


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    warnings: list[str]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("bad-input").resolve() / "data"
    (root / "good").mkdir(parents=True)
    (root / "corpus").mkdir()
    for i, hz in enumerate((330.0, 440.0, 660.0, 880.0)):
        wav(root / "good" / f"g{i}.wav", tone(1.0, hz=hz))
    files, missing = {}, {}
    for name, kind in AUDIO.items():
        try:
            files[name] = kind.write(root / "corpus" / f"{name}{SUFFIX.get(name, '.wav')}")
        except pytest.skip.Exception as e:
            missing[name] = str(e)
    return Corpus(root, files, missing)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_run(tmp_path_factory, "cnn6")


def run_cli(argv: list[str]) -> Outcome:
    """`soundtag ARGV` with stdout and stderr as strict UTF-8 streams (a name that
    is not UTF-8 must be escaped to print) and the warnings it logs."""
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("soundtag")
    logger.addHandler(handler)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        logger.removeHandler(handler)
    text = [s.buffer.getvalue().decode() for s in (out, err)]
    return Outcome(code, text[0], text[1], [r.getMessage() for r in records])


@pytest.fixture(scope="module")
def features_run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    cache = tmp_path_factory.mktemp("bad-input-cache")
    return run_cli(["features", str(corpus.root), "--workers", "1", "--sample-rate", str(RATE),
                    "--cache-dir", str(cache)])


@pytest.fixture(scope="module")
def predict_run(corpus: Corpus, run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcome, dict]:
    out = tmp_path_factory.mktemp("bad-input-predict") / "tags.csv"
    outcome = run_cli(["predict", str(run), str(corpus.root), "--out", str(out), "--workers", "1",
                       "--threads", "1"])
    with open(out, newline="", encoding="utf-8") as f:
        rows = {row["fname"]: row for row in csv.DictReader(f)}
    return outcome, rows


@pytest.fixture(scope="module")
def tag_run(corpus: Corpus, run: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    paths = sorted(corpus.root.glob("good/*.wav")) + list(corpus.files.values())
    return run_cli(["tag", str(run), *map(str, paths), "--threads", "1", "--long", "3600",
                    "--out", str(tmp_path_factory.mktemp("bad-input-timelines"))])


def kind_file(corpus: Corpus, name: str) -> Path:
    if name in corpus.missing:
        pytest.skip(corpus.missing[name])
    return corpus.files[name]


def shown(path: Path | str) -> list[str]:
    """The ways a file name may be printed: \\xNN or \\udcNN escapes for bytes that are not UTF-8."""
    return list(dict.fromkeys([printable(str(path)), str(path).encode("utf-8", "backslashreplace").decode()]))


def check_warnings(kind: Kind, path: Path, outcome: Outcome) -> None:
    for warning in kind.warnings:
        assert any(str(path) in w and re.search(warning, w) for w in outcome.warnings), outcome.warnings


def skipped_lines(out: str) -> dict[str, str]:
    """`  skipped PATH: REASON` lines as {PATH: REASON}."""
    return dict(re.findall(r"^  skipped (.+?): (.+)$", out, re.M))


# ---------------------------------------------------------------- audio, through the commands


@pytest.mark.parametrize("name", AUDIO)
def test_features_skips_bad_files_with_their_reason_and_processes_the_rest(name, corpus, features_run):
    kind, path = AUDIO[name], kind_file(corpus, name)
    outcome = features_run
    assert outcome.code == 0, outcome.err
    listed = [k for k in corpus.files if AUDIO[k].listed]
    bad = [k for k in listed if AUDIO[k].reason]
    assert re.search(rf"^{4 + len(listed)} clips \(.*; {len(bad)} skipped; ", outcome.out, re.M), outcome.out
    skipped = skipped_lines(outcome.out)
    if not kind.listed:
        assert any(str(path) in w and re.search(kind.reason, w) for w in outcome.warnings), outcome.warnings
    elif kind.reason:
        assert re.search(kind.reason, skipped[printable(str(path))]), skipped
    else:
        assert printable(str(path)) not in skipped
    check_warnings(kind, path, outcome)


@pytest.mark.parametrize("name", AUDIO)
def test_predict_keeps_a_row_per_file_with_the_reason_it_is_unreadable(name, corpus, predict_run):
    kind, path = AUDIO[name], kind_file(corpus, name)
    outcome, rows = predict_run
    assert outcome.code == 0, outcome.err
    bad = [k for k in corpus.files if AUDIO[k].reason]
    assert f"{len(rows)} files tagged, {len(bad)} unreadable; written: " in outcome.out
    row = rows[printable(str(path.relative_to(corpus.root)))]
    skipped = skipped_lines(outcome.out)
    if kind.reason:
        assert re.search(kind.reason, row["error"]) and not row["label_1"], row
        assert re.search(kind.reason, skipped[printable(str(path))]), skipped
    else:
        assert row["error"] == "" and row["label_1"] and 0 <= float(row["score_1"]) <= 1, row
    check_warnings(kind, path, outcome)


@pytest.mark.parametrize("name", AUDIO)
def test_tag_prints_each_files_tags_or_the_reason_it_has_none(name, corpus, tag_run):
    kind, path = AUDIO[name], kind_file(corpus, name)
    assert tag_run.code == 0, tag_run.err
    said = next(line.removeprefix(f"{s}: ") for line in tag_run.out.splitlines() for s in shown(path)
                if line.startswith(f"{s}: "))
    if kind.reason:
        assert re.search(kind.reason, said), said
    else:
        assert re.fullmatch(r"(\S+ \d\.\d\d, ){2}\S+ \d\.\d\d", said), said
    check_warnings(kind, path, tag_run)


def test_unreadable_file_as_another_user(tmp_path):
    """Root reads any file whatever its mode, so as root the check runs in a
    child process that has switched to user nobody."""
    if not ROOT_USER:
        with pytest.raises(audio.AudioError, match=r"permission denied \(the file is not readable\)"):
            audio.load(unreadable(tmp_path / "locked.wav"))
        return
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        path = wav(folder / "locked.wav")
        path.chmod(0)
        said = as_nobody(lambda: audio.load(path))
    finally:
        path.unlink()
        folder.rmdir()
    assert said == f"{path}: permission denied (the file is not readable)"


def as_nobody(action: Callable[[], object]) -> str:
    """The AudioError `action` raises in a forked child running as user nobody."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, whatever happens
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                action()
                said = "no error"
            except audio.AudioError as e:
                said = str(e)
        except OSError as e:
            said = f"cannot switch: {e}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    if said.startswith("cannot switch: "):
        pytest.skip(f"running as root and unable to drop the privilege ({said})")
    return said


# ---------------------------------------------------------------- label CSVs


def label_csv(root: Path, body: bytes, name: str = "labels.csv") -> Path:
    """A csv-layout dataset of two good clips and the label file `body`."""
    (root / "audio").mkdir(parents=True)
    for i in range(2):
        wav(root / "audio" / f"c{i}.wav", tone(0.5, hz=300.0 + 200 * i))
    (root / name).write_bytes(body)
    return root / name


def kaggle2018(root: Path, test_csv: bytes) -> Path:
    """A 2018-layout dataset whose test CSV is `test_csv`."""
    for part in ("audio_train", "audio_test"):
        (root / part).mkdir(parents=True)
        wav(root / part / "c0.wav", tone(0.5))
    (root / "train.csv").write_text("fname,label,manually_verified\nc0.wav,Bell,1\n")
    (root / "test.csv").write_bytes(test_csv)
    return root / "test.csv"


GOOD_ROWS = b"fname,label\nc0.wav,dog\nc1.wav,cat\n"
CSV_ERRORS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "duplicate-rows": (lambda r: label_csv(r, GOOD_ROWS + b"c0.wav,dog\n"),
                       r"line 4: duplicate fname 'c0.wav' \(first on line 2\)"),
    "unknown-label": (lambda r: kaggle2018(r, b"fname,label\nc0.wav,Zither\n"),
                      r"line 2: label 'Zither' is not one of the 1 classes of the training set"),
    "missing-label-column": (lambda r: label_csv(r, b"fname,notes\nc0.wav,loud\n"), r": no label column; "),
    "latin-1-bytes": (lambda r: label_csv(r, GOOD_ROWS + b"caf\xe9.wav,dog\n"),
                      r"line 4: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
    "wrong-field-count": (lambda r: label_csv(r, GOOD_ROWS + b"c2.wav,dog,extra\n"),
                          r"line 4: 3 fields, the header has 2"),
    "header-only": (lambda r: label_csv(r, b"fname,label\n"), r": no rows after the header line"),
    "empty-csv": (lambda r: label_csv(r, b""), r": empty file, expected a header line"),
    "repeated-column": (lambda r: label_csv(r, b"fname,label,fname\nc0.wav,dog,x\n"),
                        r"line 1: column 'fname' appears twice in the header"),
    "nul-byte": (lambda r: label_csv(r, GOOD_ROWS + b"c\0.wav,dog\n"), r"line 4: contains a NUL byte"),
}
CSV_WARNINGS: dict[str, tuple[bytes, str | None]] = {
    "byte-order-mark": (b"\xef\xbb\xbf" + GOOD_ROWS, "starts with a byte-order mark"),
    "crlf-line-ends": (GOOD_ROWS.replace(b"\n", b"\r\n"), None),
    "stray-whitespace": (b"fname , label\nc0.wav, dog\nc1.wav,cat \n", "line 2: stray whitespace around 'dog'"),
}


@pytest.mark.parametrize("name", CSV_ERRORS)
def test_broken_label_csv_is_one_error_line_naming_file_and_line(name, tmp_path, capsys):
    write, message = CSV_ERRORS[name]
    path = write(tmp_path / "data")
    assert main(["features", str(path.parent), "--workers", "1", "--cache-dir", str(tmp_path / "c")]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}") and re.search(message, line), line


@pytest.mark.parametrize("name", CSV_WARNINGS)
def test_odd_label_csv_is_read_with_a_warning(name, tmp_path, capsys, caplog):
    body, warning = CSV_WARNINGS[name]
    path = label_csv(tmp_path / "data", body)
    assert main(["features", str(path.parent), "--workers", "1", "--sample-rate", str(RATE),
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert re.search(r"^2 clips \(.*; 0 skipped; ", capsys.readouterr().out, re.M)
    about = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert any(re.search(warning, w) for w in about) if warning else not about, about


# ---------------------------------------------------------------- options and config files


@pytest.mark.parametrize("argv", [
    ["train", "D", "--out", "R", "--threads", "-1"],
    ["train", "D", "--out", "R", "--batch-size", "100000"],
    ["train", "D", "--out", "R", "--epochs", "0"],
    ["predict", "R", "A", "--out", "o", "--tta-lengths", "nan"],
    ["predict", "R", "A", "--out", "o", "--tta-lengths", "1e6"],
    ["predict", "R", "A", "--out", "o", "--tile", "inf"],
    ["predict", "R", "A", "--out", "o", "--tta-offsets", "1000"],
    ["predict", "R", "A", "--out", "o", "--top-k", "0"],
    ["predict", "R", "A", "--out", "o", "--workers", "0"],
    ["tag", "R", "f.wav", "--top-k", "-2"],
    ["tag", "R", "f.wav", "--window", "0"],
    ["tag", "R", "f.wav", "--hop", "0"],
    ["features", "D", "--workers", "-3"],
])
def test_out_of_range_option_is_one_error_line_naming_it(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    line = error_line(capsys)
    assert f"argument {argv[-2]}: must be " in line and f"not {argv[-1]!r}" in line, line


@pytest.mark.parametrize("option, value, message", [
    ("--trim-db", "-10", "trim_db (--trim-db) must be a positive number of dB below the peak, not -10.0"),
    ("--trim-db", "nan", "trim_db (--trim-db) must be a positive number of dB below the peak, not nan"),
    ("--trim-db", "inf", "trim_db (--trim-db) must be a positive number of dB below the peak, not inf"),
    ("--sample-rate", "1000000", "sample_rate must be at most 768000, not 1000000"),
    ("--n-fft", "1048576", "n_fft must be at most 65536, not 1048576"),
    ("--hop-length", "100000", "hop_length must be at most 65536, not 100000"),
    ("--n-mels", "100000", "n_mels must be at most 1024, not 100000"),
])
def test_feature_option_out_of_range_is_one_error_line(option, value, message, corpus, tmp_path, capsys):
    assert main(["features", str(corpus.root), option, value, "--cache-dir", str(tmp_path)]) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--tta", "crops", "--tta-offsets", "100", "--tta-lengths", "10"], "1000 s of crops a clip"),
    (["--tta", "tiles", "--tile", "60", "--tile-hop", "0.5"], "scores each moment 120 times"),
    (["--tile", "3", "--tta-offsets", "2"], "--tta-offsets, --tile shape the views of --tta; give --tta"),
])
def test_test_time_views_of_one_clip_are_bounded(extra, message, corpus, tmp_path, capsys):
    argv = ["predict", str(tmp_path / "no-run"), str(corpus.root / "good"), "--out", str(tmp_path / "o.csv")]
    assert main(argv + extra) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("layout", ["empty folder", "no audio", "csv of missing files"])
def test_predict_on_nothing_to_tag_is_an_error(layout, run, tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    if layout == "no audio":
        (source / "notes.txt").write_text("no clips here")
    if layout == "csv of missing files":
        source = source / "files.csv"
        source.write_text("fname\na.wav\nb.wav\n")
    assert main(["predict", str(run), str(source), "--out", str(tmp_path / "o.csv")]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {source}: ") and ("no audio files" in line or "none of its 2 files" in line)
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("text, message", [
    ("epochs: many\n", r"config\.epochs must be a whole number, not 'many'"),
    ("batch_size: 2.5\n", r"config\.batch_size must be a whole number, not 2\.5"),
    ("bf16: 1\n", r"config\.bf16 must be true or false, not 1"),
    ("optim: {lr: .nan}\n", r"config\.optim\.lr must be a finite number, not nan"),
    ("train_folds: [0, one]\n", r"config\.train_folds must be a list of items each a whole number or null"),
    ("features: {fmin: 30000}\n", r"config\.features: need 0 ≤ fmin < fmax"),
    ("optim: 3\n", r"config\.optim: expected a mapping of options, not 3"),
    ("epochs: [1\n", r" line 2: not valid YAML \(expected ',' or '\]', but got '<stream end>'\)"),
    ("- a\n- b\n", r": expected a mapping of options, not \['a', 'b'\]"),
])
def test_config_file_mistake_is_one_error_line_naming_file_and_option(text, message, tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "data"), "--out", str(out), "--config", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}") and re.search(message, line), line
    assert not out.exists()


def test_config_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_bytes(b"epochs: 3\nmodel: {name: caf\xe9}\n")
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(path)]) == 2
    assert error_line(capsys) == f"error: {path} line 2: not UTF-8 text; save the file as UTF-8"


def test_mp3_decoder_messages_are_warnings_naming_the_file(corpus, capfd, caplog):
    """mpg123 prints on stderr without saying which file it means."""
    path = kind_file(corpus, "truncated-mp3")
    assert len(audio.load(path, RATE)) > 0
    assert "Xing" not in capfd.readouterr().err
    assert any(r.getMessage().startswith(f"{path}: MP3 decoder: Warning: Xing") for r in caplog.records)
