"""Readers fuzzed with hypothesis (issue 19): every generated input is either read exactly as a
reference reader reads it, or refused with a LoraeError that names the file (and the line);
never a traceback, never a silently different value.

Runs are derandomized (the same examples on every machine) and bounded, so the whole file takes
well under a minute; inputs that once failed are kept as explicit examples (``@example``).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lorae.data.images import load_rgb_image
from lorae.data.text import _read_tsv
from lorae.errors import LoraeError

FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- TSV ------------------------------------------------------------------------------------

#: Field text: anything but the line breaks that end a row (tabs are included: a tab inside a
#: text splits it, which the reader must notice), NUL and non-ASCII digits included.
FIELD = st.text(
    alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
    max_size=12,
)
LABEL = st.one_of(st.integers(0, 3).map(str), FIELD)
ROW = st.one_of(
    st.tuples(FIELD, LABEL).map(lambda r: "\t".join(r)),
    st.lists(FIELD, min_size=0, max_size=4).map("\t".join),
)


def reference_tsv(text: str) -> tuple[list[tuple[str, int]], int | None]:
    """The rows a correct reader returns, and the line of the first row it must refuse
    (``None`` when every row is good). Header ``sentence<TAB>label``, no quoting."""
    rows: list[tuple[str, int]] = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n")[1:], start=2):
        if line == "":
            continue
        fields = line.split("\t")
        label = fields[1].strip() if len(fields) == 2 else ""
        if len(fields) != 2 or not re.fullmatch(r"[0-9]+", label):
            return rows, number
        rows.append((fields[0], int(label)))
    return rows, None


@FUZZ
@given(rows=st.lists(ROW, max_size=8), encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]))
@example(rows=["score\t1\t0"], encoding="utf-8")  # issue 19.3: was read as ("score", 1)
@example(rows=["x\t\u00b2"], encoding="utf-8")  # '²'.isdigit() is True; int('²') fails
@example(rows=["a\0b\t1"], encoding="utf-8")  # NUL: a character like any other
@example(rows=["caf\u00e9\t1"], encoding="latin-1")  # issue 19.5: UnicodeDecodeError
def test_tsv_rows_are_read_exactly_or_refused_by_line(rows: list[str], encoding: str) -> None:
    text = "sentence\tlabel\n" + "".join(row + "\n" for row in rows)
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        return  # not representable in that encoding: nothing to write
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.tsv"
        path.write_bytes(data)
        expected, bad_line = reference_tsv(data.decode("utf-8", errors="replace"))
        decodable = _decodes(data)
        try:
            table = _read_tsv(path, "sentence", "label")
        except LoraeError as error:
            message = str(error)
            assert str(path) in message
            if not decodable:
                assert "is not UTF-8" in message
            else:
                assert bad_line is not None, f"refused a good file: {message}"
                assert f"line {bad_line}" in message, (message, bad_line)
            return
        assert decodable and bad_line is None, "read a file that should have been refused"
        assert list(zip(table.texts, table.labels, strict=True)) == expected


def reference_named_tsv(text: str) -> tuple[list[tuple[str, str]], int | None]:
    """Like :func:`reference_tsv` for class-name labels: any non-empty label (stripped)."""
    rows: list[tuple[str, str]] = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n")[1:], start=2):
        if line == "":
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip():
            return rows, number
        rows.append((fields[0], fields[1].strip()))
    return rows, None


@FUZZ
@given(rows=st.lists(ROW, max_size=8))
@example(rows=["World\t Sports "])  # surrounding spaces are not part of the name
@example(rows=["x\t\u00a0"])  # a label of whitespace only is empty
def test_tsv_class_names_are_read_exactly_or_refused_by_line(rows: list[str]) -> None:
    data = ("sentence\tlabel\n" + "".join(row + "\n" for row in rows)).encode("utf-8")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.tsv"
        path.write_bytes(data)
        expected, bad_line = reference_named_tsv(data.decode("utf-8"))
        try:
            table = _read_tsv(path, "sentence", "label", labels="name")
        except LoraeError as error:
            assert str(path) in str(error)
            assert bad_line is not None and f"line {bad_line}" in str(error), (error, bad_line)
            return
        assert bad_line is None, "read a file that should have been refused"
        assert list(zip(table.texts, table.names, strict=True)) == expected


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- images ---------------------------------------------------------------------------------

MODES = {
    # mode: (numpy dtype, value range, 8-bit reference of a value array)
    "L": (np.uint8, (0, 255), lambda a: a),
    "I;16": (np.uint16, (0, 65535), lambda a: np.rint(a / 65535 * 255)),
    "I": (np.int32, (0, 65535), lambda a: np.rint(a / 65535 * 255)),
    "F": (np.float32, (0.0, 1.0), lambda a: np.rint(a.astype(np.float64) * 255)),
}


@FUZZ
@given(
    mode=st.sampled_from(sorted(MODES)),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
    cut=st.one_of(st.none(), st.floats(0.0, 0.99)),
)
def test_images_are_read_exactly_or_refused_naming_the_file(
    mode: str, size: tuple[int, int], seed: int, cut: float | None
) -> None:
    dtype, (low, high), reference = MODES[mode]
    rng = np.random.default_rng(seed)
    if dtype is np.float32:
        values = rng.uniform(low, high, size).astype(np.float32)
    else:
        values = rng.integers(low, high, size, endpoint=True).astype(dtype)
    suffix = ".png" if mode in ("L", "I;16") else ".tif"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image{suffix}"
        Image.fromarray(values).save(path)
        if cut is not None:
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * cut)])
        try:
            image = load_rgb_image(path)
        except LoraeError as error:
            assert str(path) in str(error)
            assert cut is not None, f"refused an intact {mode} image: {error}"
            return
        pixels = np.asarray(image)
        assert pixels.shape == (*size, 3)
        expected = reference(values.astype(np.float64)).astype(np.uint8)
        assert (pixels == expected[..., None]).all(), f"{mode} read as different values"


# --- WAV ------------------------------------------------------------------------------------


@FUZZ
@given(
    rate=st.sampled_from([8000, 11025, 16000, 22050, 44100]),
    channels=st.integers(1, 2),
    subtype=st.sampled_from(["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"]),
    frames=st.integers(1, 400),
    seed=st.integers(0, 2**16),
    cut=st.one_of(st.none(), st.floats(0.0, 0.99)),
)
# libsndfile read this half file as a 200-frame clip without an error
@example(rate=8000, channels=1, subtype="PCM_16", frames=400, seed=0, cut=0.5)
def test_wav_files_are_read_exactly_or_refused_naming_the_file(
    rate: int, channels: int, subtype: str, frames: int, seed: int, cut: float | None
) -> None:
    soundfile = pytest.importorskip("soundfile")
    pytest.importorskip("torchaudio")
    from lorae.data.esc50 import LogMelFeatures

    features = LogMelFeatures(rate, 8, 16, 0, 0, 0.0, 1.0)  # no resampling: exact comparison
    samples = np.random.default_rng(seed).uniform(-0.9, 0.9, (frames, channels))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.wav"
        soundfile.write(path, samples, rate, subtype=subtype)
        intact, _ = soundfile.read(path, dtype="float32", always_2d=True)
        if cut is not None:
            data = path.read_bytes()
            path.write_bytes(data[: int(len(data) * cut)])
        try:
            waveform = features.read(path)
        except LoraeError as error:
            assert str(path) in str(error)
            assert cut is not None, f"refused an intact {subtype} file: {error}"
            return
        expected = intact.mean(axis=1)
        assert waveform.shape == (1, expected.shape[0]), "a truncated clip was read as shorter"
        np.testing.assert_array_equal(waveform[0].numpy(), expected.astype(np.float32))
