"""The Dagster UI in a real browser: `dg dev` on a free loopback port over a temporary instance and data root,
driven by Playwright through Debian's Chromium (/usr/bin/chromium; `make test` installs it when missing).

One server serves every check (starting it is the expensive part). Before it starts, the demo partition is
built, trained and evaluated through the same instance (in this process, as the CLI does, with a one-epoch
variant of the demo recipe so the test stays short). The data root holds only the specs and recipe it needs,
so the sensors (on by default) find nothing to do while the browser works. Screenshots go to
$UI_SCREENSHOTS (`make screenshots` points it at docs/ui/) or the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from lora_pipeline import dagster_runs
from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.defs import partitions
from lora_pipeline.defs.partitions import training_key
from lora_pipeline_tests.helpers import committed_data

CHROMIUM = Path("/usr/bin/chromium")
V1, V2, RECIPE = "hardware-design-aesthetic-v1", "hardware-design-aesthetic-v2", "demo-tiny"
ASSETS = ["source_batch", "dataset_snapshot", "caption_set", "dataset_report", "lora_epochs", "evaluation_grid"]
START_TIMEOUT_S = 180  # a loaded 2-core machine: the code server imports Dagster and the definitions

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium: `make test` installs it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
LOCATIONS += "locationOrLoadError { __typename ... on PythonError { message } } } } } }"


def _wait_until_loaded(url: str, server: subprocess.Popen, log: Path) -> None:
    """Until the code location is loaded (a load error or an exited server fails the test with its log)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dg dev exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            entries = _graphql(url, LOCATIONS)["data"]["workspaceOrError"]["locationEntries"]
        except (OSError, KeyError, TypeError, ValueError):
            entries = []
        for entry in entries:
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                pytest.fail(f"code location failed to load: {loaded['message']}")
            if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
                return
        time.sleep(1)
    pytest.fail(f"code location not loaded after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    """Ctrl-C to `dg dev` (it stops its webserver, daemon and code servers), then SIGKILL to whatever of its
    process tree is left (run workers included), so nothing outlives the test."""
    try:
        tree = [server.pid, *(c.pid for c in psutil.Process(server.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [server.pid]
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.wait(timeout=10)


def _prepare(data: Path, home: Path, tiny_model) -> None:
    """The committed samples (two specs, the demo recipe cut to one epoch) and the instance in `home` with the
    partitions registered."""
    for part in ("sources", "specs", "recipes"):
        (data / part).mkdir(parents=True)
    for batch in (committed_data() / "sources").iterdir():
        shutil.copytree(batch, data / "sources" / batch.name)
    for version in (V1, V2):
        shutil.copy(committed_data() / "specs" / f"{version}.yaml", data / "specs")
    recipe = yaml.safe_load((committed_data() / "recipes" / f"{RECIPE}.yaml").read_text())
    recipe.update(epochs=1, sample_steps=1, sample_prompts=recipe["sample_prompts"][:1], eval_weights=[1.0])
    (data / "recipes" / f"{RECIPE}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (data / "models").mkdir()
    os.symlink(tiny_model("tiny-sd"), data / "models" / "tiny-sd")
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    inst = dagster_runs.instance()  # partitions known before the server's sensors look: they find nothing new
    partitions.register(inst, partitions.source_batches, sorted(p.name for p in (data / "sources").iterdir()))
    partitions.register(inst, partitions.dataset_versions, [V1, V2])
    partitions.register(inst, partitions.recipes, [RECIPE])


def _build_and_train() -> None:
    """While the server starts: the two versions built, the demo partition trained and evaluated."""
    inst = dagster_runs.instance()
    for version in (V1, V2):
        dagster_runs.run_job("build_dataset_job", version, inst, quiet=True)
    dagster_runs.run_job("train_job", training_key(V2, RECIPE), inst, quiet=True)
    dagster_runs.run_job("evaluate_job", training_key(V2, RECIPE), inst, quiet=True)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_model) -> Iterator[tuple[str, Path]]:
    """(URL of a running `dg dev`, screenshot folder); the server and its children are stopped afterwards."""
    tmp = tmp_path_factory.mktemp("ui")
    data, home = tmp / "data", tmp / "dagster_home"
    home.mkdir()
    saved = {k: os.environ.get(k) for k in ("LORA_PIPELINE_DATA", "DAGSTER_HOME")}
    os.environ.update(LORA_PIPELINE_DATA=str(data), DAGSTER_HOME=str(home))
    server = None
    try:
        _prepare(data, home, tiny_model)
        port = _free_port()
        log = tmp / "dg-dev.log"
        dg = Path(sys.executable).with_name("dg")
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(dg), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO_ROOT / "workspace.yaml")],
                cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ.copy(),
            )
        url = f"http://127.0.0.1:{port}"
        _build_and_train()
        _wait_until_loaded(url, server, log)
        shots = Path(os.environ.get("UI_SCREENSHOTS") or tmp / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield url, shots
    finally:
        if server is not None:
            _stop(server)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- the browser ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)  # a loaded machine: the UI's first queries take seconds
            yield page
        finally:
            browser.close()


def _open(page, url: str) -> None:
    page.goto(url)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    skip = page.get_by_role("button", name="Skip")  # the community dialog, on a new instance's first visits
    with contextlib.suppress(PlaywrightTimeout):  # not shown: nothing to dismiss
        skip.click(timeout=3_000)


def _rendered(page, img) -> int:
    """The natural width of an `img` once the browser has decoded it (0 would be a broken picture)."""
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    return img.evaluate("img => img.naturalWidth")


def _markdown_image(page, key: str, alt: str):
    """Open the `[Show Markdown]` of a metadata row and return the dialog's picture."""
    page.locator("tr", has_text=key).get_by_text("[Show Markdown]").first.click()
    page.get_by_role("dialog").get_by_role("button", name="Close").wait_for()
    page.wait_for_timeout(400)  # the dialog's fade-in, so the screenshot shows it whole
    return page.get_by_role("dialog").locator(f"img[alt^='{alt}']")


def test_the_ui_shows_the_graph_materializes_a_report_and_renders_the_pictures(ui, page):
    import dagster as dg

    url, shots = ui
    _open(page, f"{url}/asset-groups")
    for group in ("datasets", "training"):  # groups start collapsed: open each in the graph
        node = page.get_by_text(group, exact=True).filter(visible=True).nth(1)  # the first is the sidebar's
        node.wait_for()
        node.dblclick()
    for asset in ASSETS:
        page.get_by_text(asset, exact=True).filter(visible=True).first.wait_for()
    page.screenshot(path=shots / "1-asset-graph.png")

    # dataset_report: the Materialize dialog, one partition picked, launched; the run succeeds
    launched_after = datetime.datetime.now(datetime.UTC)
    _open(page, f"{url}/assets/dataset_report")
    assert "`datasets/<version>/`" not in page.inner_text("body")  # descriptions render as text, not HTML
    page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    page.keyboard.type(V1)
    page.get_by_text(V1, exact=True).filter(visible=True).last.click()
    page.keyboard.press("Escape")
    page.screenshot(path=shots / "2-materialize-dialog.png")
    dialog.get_by_role("button", name="Launch 1 run").click()
    page.get_by_text("Launched run").wait_for()
    inst = dg.DagsterInstance.get()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = inst.get_runs(dg.RunsFilter(created_after=launched_after, tags={"dagster/partition": V1}))
        if runs and runs[0].is_finished:
            break
        time.sleep(1)
    assert runs and runs[0].status == dg.DagsterRunStatus.SUCCESS, runs
    _open(page, f"{url}/runs/{runs[0].run_id}")
    page.get_by_text("Success", exact=True).first.wait_for()
    page.screenshot(path=shots / "3-run-succeeded.png")

    # the report's contact sheet renders
    _open(page, f"{url}/assets/dataset_report?partition={V1}")
    assert _rendered(page, _markdown_image(page, "contact_sheet", "contact sheet")) > 0
    page.screenshot(path=shots / "4-contact-sheet.png")
    page.keyboard.press("Escape")

    # the demo partition's epochs answer the provenance question on their page
    _open(page, f"{url}/assets/lora_epochs?partition={V2}|{RECIPE}")
    batches = page.locator("tr", has_text="source_batches")
    batches.get_by_text("batch:turntable-renders-2026-11").wait_for()
    page.locator("tr", has_text="provenance").first.scroll_into_view_if_needed()
    body = page.inner_text("body")
    assert "batch:curated-2026-10" in body and "base_model_hash" in body and "mlflow_run" in body
    page.screenshot(path=shots / "5-lora-epochs-provenance.png")

    # the demo partition's evaluation grid renders, and its page names the recommended epoch file
    _open(page, f"{url}/assets/evaluation_grid?partition={V2}|{RECIPE}")
    body = page.inner_text("body")
    assert "evals/<version>/<recipe>/" in body and f"{V2}-{RECIPE}-e001.safetensors" in body
    page.screenshot(path=shots / "6-evaluation-grid-page.png")
    assert _rendered(page, _markdown_image(page, "grid_0", "prompt 0")) > 0
    page.screenshot(path=shots / "7-evaluation-grid.png")
    page.keyboard.press("Escape")
