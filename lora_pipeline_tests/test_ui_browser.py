"""The Dagster UI in a real browser: `dg dev` on a free loopback port over a temporary instance and data root,
driven by Playwright through Debian's Chromium (/usr/bin/chromium; `make test` installs it when missing).

One server serves every check (starting it is the expensive part). It runs over conftest's `demo_root`: the
demo partition is built, trained and evaluated there through the same instance while the server starts (or was,
by test_defs_training on the same worker: the tests share the `trained_demo` group). The data root holds only
the specs and recipe it needs and every partition is registered, so the sensors (on by default) find nothing to
do while the browser works. Screenshots go to $UI_SCREENSHOTS (`make screenshots` points it at docs/ui/) or the
test's temporary folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline_tests.helpers import DEMO_GROUP, DEMO_RECIPE, DEMO_V1, DEMO_V2, free_port

CHROMIUM = Path("/usr/bin/chromium")
ASSETS = ["source_batch", "dataset_snapshot", "caption_set", "dataset_report", "lora_epochs", "evaluation_grid"]
START_TIMEOUT_S = 180  # a loaded 2-core machine: the code server imports Dagster and the definitions

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium: `make test` installs it"),
    pytest.mark.xdist_group(DEMO_GROUP),
]


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
    """SIGKILL to `dg dev`'s whole process tree (webserver, daemon, code servers, run workers): the instance,
    data root and temporary folder (the code servers' sockets) are the test's own, so nothing needs a graceful
    stop (Ctrl-C took 7 s) and nothing outlives the test."""
    try:
        tree = [server.pid, *(c.pid for c in psutil.Process(server.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [server.pid]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def ui(request, demo_root, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(URL of a running `dg dev` over the trained demo, screenshot folder); its processes are stopped afterwards."""
    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as env:
        for key, value in demo_root.env().items():
            env.setenv(key, value)  # the server's, and the test's DagsterInstance.get()
        port = free_port()
        log = tmp / "dg-dev.log"
        dg = Path(sys.executable).with_name("dg")
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(dg), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO_ROOT / "workspace.yaml")],
                cwd=demo_root.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TMPDIR": str(tmp)},  # its code servers' sockets: in the test's folder
            )
        try:
            request.getfixturevalue("trained_demo")  # while the server starts, unless already trained
            url = f"http://127.0.0.1:{port}"
            _wait_until_loaded(url, server, log)
            _graphql(url, "mutation { setNuxSeen }")  # no "Join the Dagster community" dialog over the pages
            shots = Path(os.environ.get("UI_SCREENSHOTS") or tmp / "screenshots")
            shots.mkdir(parents=True, exist_ok=True)
            yield url, shots
        finally:
            _stop(server)


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


def test_the_ui_shows_the_graph_materializes_a_report_and_renders_the_pictures(ui, page, trained_demo):
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
    page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Select a partition or create one").click()
    page.keyboard.type(DEMO_V1)
    page.get_by_text(DEMO_V1, exact=True).filter(visible=True).last.click()
    page.keyboard.press("Escape")
    page.screenshot(path=shots / "2-materialize-dialog.png")
    dialog.get_by_role("button", name="Launch 1 run").click()
    page.get_by_text("Launched run").wait_for()
    inst = dg.DagsterInstance.get()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = inst.get_runs(dg.RunsFilter(created_after=launched_after, tags={"dagster/partition": DEMO_V1}))
        if runs and runs[0].is_finished:
            break
        time.sleep(1)
    assert runs and runs[0].status == dg.DagsterRunStatus.SUCCESS, runs
    _open(page, f"{url}/runs/{runs[0].run_id}")
    page.get_by_text("Success", exact=True).first.wait_for()
    page.screenshot(path=shots / "3-run-succeeded.png")

    # the report's contact sheet renders
    _open(page, f"{url}/assets/dataset_report?partition={DEMO_V1}")
    assert _rendered(page, _markdown_image(page, "contact_sheet", "contact sheet")) > 0
    page.screenshot(path=shots / "4-contact-sheet.png")
    page.keyboard.press("Escape")

    # the demo partition's epochs answer the provenance question on their page
    _open(page, f"{url}/assets/lora_epochs?partition={DEMO_V2}|{DEMO_RECIPE}")
    batches = page.locator("tr", has_text="source_batches")
    batches.get_by_text("batch:turntable-renders-2026-11").wait_for()
    page.locator("tr", has_text="provenance").first.scroll_into_view_if_needed()
    body = page.inner_text("body")
    assert "batch:curated-2026-10" in body and "base_model_hash" in body and "mlflow_run" in body
    page.screenshot(path=shots / "5-lora-epochs-provenance.png")

    # the demo partition's evaluation grid renders, and its page names the recommended epoch file
    _open(page, f"{url}/assets/evaluation_grid?partition={DEMO_V2}|{DEMO_RECIPE}")
    recommended = Path(trained_demo.evaluated.metadata("evaluation_grid")["recommended_file"]).name
    page.locator("tr", has_text="recommended_file").get_by_text(recommended, exact=False).wait_for()
    page.get_by_text("evals/<version>/<recipe>/", exact=False).first.wait_for()  # the description renders last
    body = page.inner_text("body")
    # the description as markdown: <version> and <recipe> kept (not read as HTML), the code span's backticks gone
    assert "evals/<version>/<recipe>/" in body and "`evals/" not in body
    page.screenshot(path=shots / "6-evaluation-grid-page.png")
    assert _rendered(page, _markdown_image(page, "grid_0", "prompt 0")) > 0
    page.screenshot(path=shots / "7-evaluation-grid.png")
    page.keyboard.press("Escape")



def test_a_batchs_page_shows_its_versions_and_loras_and_a_versions_page_its_batches(ui, page, trained_demo):
    """The lineage the asset graph cannot draw (defs/lineage_pages.py), rendered as markdown in the metadata: from
    a batch (its latest event) to the versions and the LoRA that took it, then, by the page's own link, to a
    version's page and exactly the batches it took."""
    url, shots = ui
    batch = "curated-2026-10"  # DEMO_V1's batch, in DEMO_V2 through DEMO_V1
    _open(page, f"{url}/assets/source_batch?view=events&partition={batch}")
    lineage = page.locator("tr", has_text=f"Versions that took {batch}")
    lineage.get_by_role("link", name=DEMO_V1, exact=True).first.wait_for()
    lineage.get_by_role("link", name=DEMO_RECIPE, exact=True).wait_for()  # the LoRA trained on DEMO_V2
    page.screenshot(path=shots / "8-batch-lineage.png")

    lineage.get_by_role("link", name=DEMO_V2, exact=True).click()  # the version's page
    page.wait_for_url(f"**/assets/dataset_snapshot?view=partitions&partition={DEMO_V2}")
    batches = page.locator("tr", has_text=f"Batches {DEMO_V2} took")
    batches.get_by_role("link").first.wait_for()
    names = set(batches.get_by_role("link").all_inner_texts())
    assert names == {batch, "turntable-renders-2026-11", DEMO_V1}, names  # its two batches, one through DEMO_V1
    page.screenshot(path=shots / "9-version-batches.png")


def _markdown_text(page, key: str) -> str:
    """The rendered text of a markdown metadata row: inline when short (the UI renders under 1,000 characters in
    the table), else in the dialog of its `[Show Markdown]`."""
    row = page.locator("tr", has_text=key).first
    row.wait_for()
    button = row.get_by_text("[Show Markdown]")
    if not button.count():
        return row.inner_text()
    button.first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("button", name="Close").wait_for()
    page.wait_for_timeout(400)  # the dialog's fade-in, so the screenshot shows it whole
    return dialog.inner_text()


def test_a_versions_page_shows_its_diff_against_its_parent(ui, page, trained_demo):
    """DEMO_V2 copies DEMO_V1 (its parent in snapshot.json) and adds the turntable renders: its `dataset_snapshot`
    page renders the diff against DEMO_V1 (counts and the added images, per batch) and its `caption_set` page the
    caption comparison, as `lora-pipeline diff` computes them."""
    from lora_pipeline.core.lineage.diff import diff_files, load_version

    url, shots = ui
    old, new = load_version(trained_demo.root, DEMO_V1), load_version(trained_demo.root, DEMO_V2)
    assert new.info.parents == [DEMO_V1]
    diff = diff_files(old, new)
    assert diff.added and diff.captions_compared  # the renders; both versions' captions recorded

    _open(page, f"{url}/assets/dataset_snapshot?view=partitions&partition={DEMO_V2}")
    text = _markdown_text(page, "changes_from_parent")
    assert f"Changes from {DEMO_V1} to {DEMO_V2}: {len(diff.added)} added, {len(diff.removed)} removed" in text
    assert "turntable-renders-2026-11" in text and diff.added[0].path in text  # per batch, and the images listed
    page.screenshot(path=shots / "10-version-diff.png")
    page.keyboard.press("Escape")

    _open(page, f"{url}/assets/caption_set?view=partitions&partition={DEMO_V2}")
    text = _markdown_text(page, "caption_changes_from_parent")
    assert f"{diff.unchanged} unchanged; {len(diff.captions_changed)} captions changed" in text  # compared
    page.screenshot(path=shots / "11-caption-changes.png")
    page.keyboard.press("Escape")
