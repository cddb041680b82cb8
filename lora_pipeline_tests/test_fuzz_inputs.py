"""Hypothesis fuzz tests of two more inputs (issue 27): loss masks (any bytes, headers claiming any size, real
images of any mode and size, as a mask file or an alpha channel) and the arguments and environment of the
`python -m lora_pipeline.runs.exec` wrapper. A mask check returns findings of one line each, never raises, never
decodes more than the pixel limit; the wrapper either finds the command or refuses in one UserError line.
`make fuzz` runs them with the config fuzz tests (test_schema.py's `run_fuzz` shares the time out)."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from lora_pipeline.core.datasets.masks import mask_problems
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.settings import env_name
from lora_pipeline.runs.exec import prepare
from lora_pipeline_tests.test_schema import (
    EXAMPLES_PER_RUN,
    ODD_TEXT,
    PER_EXAMPLE_SECONDS,
    fuzz_settings,
    run_fuzz,
)

MAX_PIXELS = 1_000_000
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def png_headers(draw: st.DrawFn) -> bytes:
    """A PNG whose header claims any size, bit depth and colour type, and whose pixel data is short or random."""
    width, height = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
    ihdr = struct.pack(">IIBBBBB", width, height, draw(st.sampled_from([1, 2, 4, 8, 16, 3])),
                       draw(st.sampled_from([0, 2, 3, 4, 6, 5])), 0, 0, draw(st.integers(0, 1)))
    body = zlib.compress(draw(st.binary(max_size=64))) if draw(st.booleans()) else draw(st.binary(max_size=64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@st.composite
def real_images(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    image = Image.new(mode, size, draw(st.integers(0, 255)) if mode not in ("RGB", "RGBA", "CMYK", "LA") else None)
    buf = io.BytesIO()
    fmt = draw(st.sampled_from(["PNG", "TIFF", "GIF", "BMP", "WEBP"] if mode in ("L", "RGB", "RGBA", "P") else
                               ["PNG", "TIFF"]))
    try:
        image.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot store: the raw bytes instead
        return image.tobytes()[:2000]
    data = buf.getvalue()
    if draw(st.booleans()):  # cut short
        data = data[: draw(st.integers(0, len(data)))]
    return data


mask_bytes = st.one_of(st.binary(max_size=200), png_headers(), real_images())


def test_fuzz_masks(tmp_path_factory):
    folder, counter = tmp_path_factory.mktemp("fuzz-masks"), [0]
    image, mask = folder / "i.png", folder / "i.mask.png"

    @fuzz_settings()
    @given(mask_bytes, mask_bytes, st.booleans(), st.one_of(st.none(), st.tuples(st.integers(1, 80),
                                                                                 st.integers(1, 80))))
    def one(image_data: bytes, mask_data: bytes, alpha: bool, size: tuple[int, int] | None) -> None:
        image.write_bytes(image_data)
        mask.write_bytes(mask_data)
        started = time.monotonic()
        found = mask_problems(image, None if alpha else mask, alpha, size, MAX_PIXELS)
        assert time.monotonic() - started < PER_EXAMPLE_SECONDS
        for code, message in found:
            assert code.startswith("mask_") and message and len(message.splitlines()) == 1, (code, message)
        counter[0] += 1

    run_fuzz(one, counter, "masks")
    assert counter[0] >= EXAMPLES_PER_RUN


HOSTS = ["127.0.0.1", "localhost", "", "[::1]", "999.1.1.1", "a b", "%", ":", "[", "127.0.0.1:1"]
urls = st.one_of(
    st.text(max_size=40), st.sampled_from(ODD_TEXT),
    st.builds(lambda scheme, user, host, port, path: f"{scheme}://{user}{host}{port}{path}",
              st.sampled_from(["postgresql", "postgresql+psycopg2", "postgres", "mysql", "", "http", "postgresql+"]),
              st.sampled_from(["", "postgres@", "@", "a:b@", "%zz@"]), st.sampled_from(HOSTS),
              st.one_of(st.just(""), st.sampled_from([":1", ":5432", ":0", ":99999", ":x", ":-1"])),
              st.one_of(st.just(""), st.just("/postgres"), st.text(max_size=10).map(lambda t: "/" + t))),
)
words = st.one_of(st.sampled_from(["--", "--postgres", "-y", "true", "env", "sh", "/bin/true", "no-such-cmd",
                                   "./x", "", " ", "--postgres=x"]), st.text(max_size=12))


@pytest.fixture
def exec_env(tmp_path, monkeypatch) -> Path:
    """A Dagster home whose dagster.yaml reads two variables; each example sets or unsets them."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url:\n      env: {env_name('dagster_pg_url')}\n"
        f"execution:\n  config:\n    backend:\n      env: {env_name('celery_backend')}\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_fuzz_exec_arguments(exec_env, monkeypatch):
    counter = [0]

    @fuzz_settings()
    @given(st.lists(st.one_of(words, urls), max_size=6), st.booleans(), st.one_of(st.none(), urls),
           st.one_of(st.none(), st.sampled_from(["", " ", "redis://127.0.0.1:6379/0"])))
    def one(args: list[str], separated: bool, instance_url: str | None, backend: str | None) -> None:
        if separated:  # most real lines have the separator somewhere
            args = [*args[: len(args) // 2], "--", *args[len(args) // 2:]]
        for field, value in (("dagster_pg_url", instance_url), ("celery_backend", backend)):
            if value is None or "\x00" in value:
                monkeypatch.delenv(env_name(field), raising=False)
            else:
                monkeypatch.setenv(env_name(field), value)
        args = [a.replace("\x00", "") for a in args]
        started = time.monotonic()
        try:
            executable, command = prepare(args)
        except UserError as exc:
            assert len(str(exc).splitlines()) == 1 and str(exc).strip(), repr(str(exc))
        else:
            assert os.access(executable, os.X_OK) and command == args[args.index("--") + 1:]
        assert time.monotonic() - started < PER_EXAMPLE_SECONDS + 3  # a Postgres check may wait for its timeout
        counter[0] += 1

    run_fuzz(one, counter, "exec arguments")
    assert counter[0] >= EXAMPLES_PER_RUN
