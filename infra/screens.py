"""Screenshots of both UIs from a headless Chromium, against a running stack: ``docs/screens/*.png``.

    nightshift stack up
    nightshift schedule --config configs/sst2.yaml &             # serves nightshift-pipeline/sst2
    prefect deployment run nightshift-pipeline/sst2 -p ...        # or the UI's run form; wait until it completes
    python -m infra.screens --recipe sst2                         # writes docs/screens/*.png

Four pictures, each of a page a person opens:

- ``prefect-run-form.png``: the deployment's custom run form (the recipe, field by field);
- ``prefect-run-graph.png``: the graph of the deployment's latest completed pipeline run;
- ``mlflow-runs.png``: the recipe's experiment with that run's parent run expanded into its child runs;
- ``mlflow-model.png``: the registered model's versions with their aliases.

The browser logs in as a person does: the Prefect UI keeps the auth string in its local storage
(what its login page stores); MLflow gets the basic-auth header on every request. The browser is
driven over the Chrome DevTools Protocol with ``websockets`` (installed with Prefect), so nothing
beyond a Chromium binary is needed (``apt-get install chromium``, or ``--chromium PATH``). Like
``infra.stack``, this talks HTTP to both servers and imports neither Prefect nor MLflow.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from infra.stack import stack_env

FLOW = "nightshift-pipeline"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "screens"
WINDOW = (1600, 1000)
WORKFLOW = "workflowType=machine_learning"  # MLflow's sidebar: model training, not its GenAI default
PAGE_TIMEOUT_S = 60.0
GRAPH_MIN_COLOURS = 500  # blank: ~170 (the controls, the frame); drawn (bars, labels, edges): ~2000


class ScreensError(Exception):
    """A precondition a person can fix (no stack, no deployment, no completed run, no browser), in one line."""


# ------------------------------------------------------------------------------------------ the servers


def basic(auth: str) -> str:
    """The Authorization header value for ``user:password``."""
    return "Basic " + base64.b64encode(auth.encode()).decode()


def api(url: str, auth: str, body: Mapping[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) and decode the JSON answer; raises ScreensError on an HTTP error."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Authorization", basic(auth))
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ScreensError(f"{url}: HTTP {exc.code} {exc.read()[:200]!r}") from exc


def find_targets(env: Mapping[str, str], recipe: str) -> dict[str, Any]:
    """Ids of what the pictures show: the deployment, its latest completed run, the MLflow experiment and run."""
    prefect_api, prefect_auth = env["PREFECT_API_URL"].rstrip("/"), env["PREFECT_API_AUTH_STRING"]
    mlflow, mlflow_auth = env["MLFLOW_TRACKING_URI"].rstrip("/"), (
        f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}")
    try:
        deployment = api(f"{prefect_api}/deployments/name/{FLOW}/{urllib.parse.quote(recipe)}", prefect_auth)
    except ScreensError as exc:
        raise ScreensError(f"no deployment {FLOW}/{recipe}: run `nightshift schedule --config configs/{recipe}.yaml` "
                           f"first ({exc})") from exc
    runs = api(f"{prefect_api}/flow_runs/filter", prefect_auth, {
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "END_TIME_DESC", "limit": 1})
    if not runs:
        raise ScreensError(f"{FLOW}/{recipe} has no completed run yet: trigger one (UI or `prefect deployment run`) "
                           "and wait for it")
    flow_run = runs[0]
    experiment = api(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                     f"{urllib.parse.quote(recipe)}", mlflow_auth)["experiment"]
    found = api(f"{mlflow}/api/2.0/mlflow/runs/search", mlflow_auth, {
        "experiment_ids": [experiment["experiment_id"]], "max_results": 1,
        "filter": f"tags.`prefect.flow_run_id` = '{flow_run['id']}' and tags.`nightshift.kind` = 'pipeline'"})
    if not found.get("runs"):
        raise ScreensError(f"flow run {flow_run['name']} has no MLflow parent run in experiment {recipe}")
    return {"deployment_id": deployment["id"], "flow_run_id": flow_run["id"], "flow_run_name": flow_run["name"],
            "experiment_id": experiment["experiment_id"], "parent_run_id": found["runs"][0]["info"]["run_id"],
            "model": recipe}


# ------------------------------------------------------------------------------------------ the browser


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium (or Chrome) binary: ``explicit``, else the first of BROWSERS on PATH."""
    for name in ([explicit] if explicit else BROWSERS):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise ScreensError("no Chromium found: `apt-get install chromium` (or pass --chromium PATH)")


class Page:
    """One browser tab over the DevTools Protocol: navigate, evaluate, wait for a condition, capture."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        # screenshots are megabytes of base64 in one message
        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._next = 0
        self.call("Page.enable")
        self.call("Network.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        self._next += 1
        self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=PAGE_TIMEOUT_S))
            if message.get("id") == self._next:
                if "error" in message:
                    raise ScreensError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ScreensError(f"script failed: {result['exceptionDetails'].get('text')}: {expression[:80]}")
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'", what=f"load of {url}")

    def wait(self, condition: str, what: str, timeout: float = PAGE_TIMEOUT_S) -> None:
        """Poll a JavaScript condition until it is true; raises naming ``what`` and the page's text."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"Boolean({condition})"):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 300) : ''")
                raise ScreensError(f"timed out waiting for {what}; the page shows: {text!r}")
            time.sleep(0.5)

    def wait_text(self, text: str, timeout: float = PAGE_TIMEOUT_S) -> None:
        self.wait(f"document.body && document.body.innerText.includes({json.dumps(text)})", f"{text!r}", timeout)

    def click_text(self, text: str, selector: str = "button, a, [role=button], [role=tab]") -> bool:
        """Click the first element matching ``selector`` whose visible text is ``text``; False when none is."""
        return bool(self.evaluate(
            f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});"
            " if (el) { el.scrollIntoView({block: 'center'}); el.click(); } return !!el; })()"))

    def headers(self, headers: Mapping[str, str]) -> None:
        self.call("Network.setExtraHTTPHeaders", headers=dict(headers))

    def screenshot(self, path: Path, settle_s: float = 1.5) -> Path:
        """Save the viewport as PNG after ``settle_s`` (animations, lazy charts)."""
        time.sleep(settle_s)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()


@contextlib.contextmanager
def browser(binary: str, window: tuple[int, int] = WINDOW) -> Iterator[Any]:
    """A headless Chromium with a throwaway profile; yields ``new_page()``; always killed at the end."""
    profile = Path(tempfile.mkdtemp(prefix="nightshift-chromium-"))
    args = [binary, "--headless=new", "--remote-debugging-port=0", "--remote-allow-origins=*",
            f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
            "--enable-unsafe-swiftshader",  # the Prefect run graph is WebGL; a software renderer draws it
            "about:blank"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    pages: list[Page] = []
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ScreensError(f"{binary} did not start its DevTools endpoint (exit {proc.poll()})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])

        def new_page() -> Page:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as response:
                target = json.loads(response.read())
            page = Page(target["webSocketDebuggerUrl"])
            page.call("Emulation.setDeviceMetricsOverride", width=window[0], height=window[1],
                      deviceScaleFactor=1, mobile=False)
            pages.append(page)
            return page

        yield new_page
    finally:
        for page in pages:
            page.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------ the pictures


def prefect_pages(new_page: Any, env: Mapping[str, str], targets: Mapping[str, Any], out: Path) -> list[Path]:
    """The deployment's run form and the run's graph, logged in with the auth string as the login page does."""
    ui = env["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    page = new_page()
    page.goto(f"{ui}/")
    token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    page.evaluate(f"localStorage.setItem('prefect-password', {json.dumps(token)})")
    saved = []

    page.goto(f"{ui}/deployments/deployment/{targets['deployment_id']}/run")
    page.wait_text("Parameters")
    page.wait_text("Epochs")
    # the form is long: show the train section, where the README's example changes epochs
    page.evaluate("(() => { const el = [...document.querySelectorAll('*')].find(e => e.children.length === 0 && "
                  "/^Train( \\(Optional\\))?$/.test(e.textContent.trim())); "
                  "if (el) el.scrollIntoView({block: 'start'}); })()")
    saved.append(page.screenshot(out / "prefect-run-form.png"))

    page.goto(f"{ui}/runs/flow-run/{targets['flow_run_id']}")
    page.wait_text(targets["flow_run_name"])
    page.wait("document.querySelector('canvas')", "the run graph's canvas")
    # the graph is drawn on a WebGL canvas, late on a busy machine: shoot until its area is not blank
    graph = out / "prefect-run-graph.png"
    for _ in range(6):
        page.screenshot(graph, settle_s=4.0)
        box = page.evaluate("(() => { const r = document.querySelector('canvas').getBoundingClientRect(); "
                            "return [r.left, r.top, r.right, r.bottom]; })()")
        if distinct_colours(graph, box) > GRAPH_MIN_COLOURS:
            break
    else:
        raise ScreensError("the run graph stayed blank (is WebGL available to the headless browser?)")
    saved.append(graph)
    return saved


def distinct_colours(png: Path, box: list[float]) -> int:
    """How many colours the picture has inside ``box`` (left, top, right, bottom): 1 or 2 when nothing is drawn."""
    from PIL import Image

    with Image.open(png) as image:
        region = image.convert("RGB").crop(tuple(int(v) for v in box))
        return len(region.getcolors(maxcolors=1 << 20) or [])


def mlflow_pages(new_page: Any, env: Mapping[str, str], targets: Mapping[str, Any], out: Path) -> list[Path]:
    """The experiment's runs with the parent expanded, and the registered model with its aliases."""
    ui = env["MLFLOW_TRACKING_URI"].rstrip("/")
    page = new_page()
    page.headers({"Authorization": basic(f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}")})
    saved = []

    # the links Nightshift writes ask for the model-training workflow (tracking.run_url); so does this page
    page.goto(f"{ui}/#/experiments/{targets['experiment_id']}/runs?{WORKFLOW}")
    page.wait_text(f"{targets['model']}-pipeline")
    close_assistant(page)
    # unfold the newest parent run (the first row) so its child runs show beneath it
    page.evaluate(f"(() => {{ const cell = [...document.querySelectorAll('a')].find(a => a.innerText.trim() === "
                  f"{json.dumps(targets['model'] + '-pipeline')}); let row = cell; "
                  "while (row && !row.querySelector('button')) row = row.parentElement; "
                  "const button = row && row.querySelector('button'); if (button) button.click(); })()")
    page.wait_text(f"{targets['model']}-train", timeout=20)
    saved.append(page.screenshot(out / "mlflow-runs.png", settle_s=2.0))

    page.goto(f"{ui}/#/models/{urllib.parse.quote(targets['model'])}?{WORKFLOW}")
    page.wait_text("champion")
    close_assistant(page)
    # the versions table (version, source run, aliases) first, above the model's description and tags
    page.evaluate("(() => { const el = [...document.querySelectorAll('*')].find(e => e.children.length === 0 && "
                  "e.textContent.trim() === 'Versions'); if (el) el.scrollIntoView({block: 'start'}); })()")
    saved.append(page.screenshot(out / "mlflow-model.png"))
    return saved


def close_assistant(page: Page) -> None:
    """Close MLflow's assistant panel, which opens by itself on a browser's first visit to a local server."""
    time.sleep(1.0)
    page.evaluate("(() => { const b = document.querySelector('button[aria-label=\"Close\"]'); if (b) b.click(); })()")


def take(recipe: str, out: Path, chromium: str | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """All four pictures of ``recipe``'s deployment, run and model; returns the files written."""
    env = dict(env) if env is not None else stack_env(timeout=5.0)
    if not env:
        raise ScreensError("no running, healthy stack under NIGHTSHIFT_HOME: run `nightshift stack up`")
    targets = find_targets(env, recipe)
    with browser(find_chromium(chromium)) as new_page:
        return prefect_pages(new_page, env, targets, out) + mlflow_pages(new_page, env, targets, out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.screens", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sst2", help="recipe name: deployment nightshift-pipeline/<recipe>, "
                                                         "experiment and registered model (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default docs/screens)")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: found on PATH)")
    args = parser.parse_args(argv)
    try:
        for path in take(args.recipe, args.out, args.chromium):
            print(path)
    except ScreensError as exc:
        print(f"screens: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
