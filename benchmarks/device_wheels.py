"""The Python packages the GPU benchmarks need on a lent machine that cannot reach an index.

    python3 benchmarks/device_wheels.py download {bench|drill} DIR   # here, online: wheels for Python 3.12, x86_64
    python3 benchmarks/device_wheels.py install DIR TARGET            # there: installs only what is missing

`bench` is what `train_throughput.py` and `flux_throughput.py` import beyond PyTorch and transformers (bitsandbytes
included, for the 8-bit optimizer's rows); `drill` adds the Dagster and MLflow stack `gpu_e2e.py` runs through,
without bitsandbytes (the drill's recipes do not use it) to stay within a call's 64 MiB. The versions are this
machine's installed ones (the venv `make install` built from pyproject.toml's pins), so the GPU runs the same
library code as the tests. `install` skips a wheel whose distribution the GPU machine already has at that version
and installs the rest with `--no-deps` into TARGET, which the command then puts first on PYTHONPATH (what the lists
leave out, the machine's PyTorch, transformers, numpy, pandas, stays as it is).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

BENCH = ("diffusers", "peft", "bitsandbytes", "pydantic", "pydantic-core", "pydantic-settings", "typing-inspection",
         "annotated-types", "python-dotenv", "prodigyopt", "lion-pytorch", "schedulefree", "dadaptation",
         "importlib-metadata", "zipp")
# What the drill imports (read off `gpu_e2e.py --smoke` on this machine) beyond the bench set and what a CUDA
# PyTorch image holds (numpy, pandas, matplotlib, scipy, Pillow, requests, jinja2, PyYAML, ...).
DRILL = tuple(name for name in BENCH if name != "bitsandbytes") + (
    "dagster", "dagster-pipes", "dagster-shared", "alembic", "mako", "sqlalchemy", "antlr4-python3-runtime",
    "coloredlogs", "humanfriendly", "docstring-parser", "structlog", "tabulate", "toposort", "tomlkit", "tomli",
    "universal-pathlib", "pathlib-abc", "watchdog", "rich", "markdown-it-py", "mdurl", "pygments",
    "mlflow", "mlflow-skinny", "mlflow-tracing", "cachetools", "cloudpickle", "databricks-sdk", "google-auth",
    "pyasn1", "pyasn1-modules", "fastapi", "starlette", "annotated-doc", "anyio", "h11", "uvicorn", "gitpython",
    "gitdb", "smmap", "opentelemetry-api", "opentelemetry-proto", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions", "protobuf", "sqlparse", "graphene", "graphql-core", "graphql-relay",
    "flask", "werkzeug", "itsdangerous", "blinker", "flask-cors", "huey", "skops", "prettytable", "wcwidth",
    "narwhals", "tzdata", "pytz", "click", "cryptography", "cffi", "pycparser")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(names: tuple[str, ...], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for name in names:
        pin = f"{name}=={importlib.metadata.version(name)}"
        binary = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), pin]
        if subprocess.run(binary, capture_output=True).returncode != 0:  # a source-only package (dadaptation)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), pin],
                           check=True)
    wheels = list(folder.glob("*.whl"))
    print(f"{len(wheels)} wheels, {sum(f.stat().st_size for f in wheels) / 2**20:.1f} MiB in {folder}")


def install(folder: Path, target: Path) -> None:
    missing = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            installed = importlib.metadata.version(_canonical(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            missing.append(wheel)
    print("installing:", " ".join(w.name.split("-")[0] for w in missing) or "nothing", flush=True)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, missing)], check=True)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "download" and argv[1] in ("bench", "drill"):
        download(BENCH if argv[1] == "bench" else DRILL, Path(argv[2]))
    elif len(argv) == 3 and argv[0] == "install":
        install(Path(argv[1]), Path(argv[2]))
    else:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
