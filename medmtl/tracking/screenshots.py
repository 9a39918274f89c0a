"""See a tracked run as a reviewer does: ``mlflow ui`` on a store, pages rendered by headless Chromium, PNGs.

    python -m medmtl.tracking.screenshots STORE --out DIR [--run-id ID] [--model NAME] [--port N]

``STORE`` is a SQLite tracking URI (``sqlite:///.../mlflow.db``), the database file, or the folder holding
``mlflow.db`` (artifacts beside it in ``artifacts/``, as medmtl writes them). The script starts ``mlflow ui``
from this interpreter's environment (:mod:`medmtl.procenv`) on 127.0.0.1, and saves, for the newest
finished run (or ``--run-id``):

* ``1_runs.png``: the experiment's run list;
* ``2_run_overview.png``, ``3_run_model_metrics.png``, ``4_run_artifacts.png``: the run page's tabs;
* ``5_logged_model.png``: the logged model's page;
* ``6_model_version.png``: the page of the newest version registered from the run.

MLflow's UI is a single-page app that fetches its data after load: Chromium (Debian's ``chromium``
package; ``apt-get install -y chromium``) runs headless, driven over the DevTools protocol on a pipe
(no driver library), and each screenshot is taken once the page shows the text that proves it rendered
(the run name, "Description", the metric names) and no spinner is left. The script closes MLflow's chat
panel (it opens itself on a first local visit), expands the run description and filters the model
metrics to ``val/`` (the curves a reviewer judges convergence on). Every URL opens in the model-training view
(``workflowType=machine_learning``, :mod:`medmtl.tracking.links`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medmtl.procenv import interpreter_env, interpreter_tool
from medmtl.tracking.links import WORKFLOW_PARAM

__all__ = ["store_paths", "pages", "Browser", "find_chromium", "main"]

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def store_paths(store: str) -> tuple[str, Path]:
    """``(sqlite tracking URI, artifact folder)`` of a store given as URI, database file or folder."""
    path = Path(store[len("sqlite:///"):]) if store.startswith("sqlite:///") else Path(store)
    db = path / "mlflow.db" if path.is_dir() else path
    if not db.is_file():
        raise FileNotFoundError(f"{store}: no MLflow SQLite database there (expected mlflow.db); run `medmtl demo` first")
    return f"sqlite:///{db.resolve()}", db.resolve().parent / "artifacts"


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium binary: ``explicit``, else Debian's install locations; a clear error when missing."""
    for cand in ([explicit] if explicit else list(CHROMIUM_CANDIDATES)):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError("Chromium not found (looked in " + ", ".join([explicit] if explicit else CHROMIUM_CANDIDATES)
                            + "); install it with `apt-get update && apt-get install -y chromium`, or pass --chromium PATH")


def pages(tracking_uri: str, *, run_id: str | None = None, model_name: str | None = None) -> dict[str, tuple[str, str]]:
    """``{png stem: (hash route, text that shows it rendered)}`` of the pages to capture, for the newest
    finished run (or ``run_id``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise LookupError(f"{tracking_uri}: no finished run; train one first")
        run = runs[0]
    else:
        run = client.get_run(run_id)
    eid, rid = run.info.experiment_id, run.info.run_id
    name = run.info.run_name
    out = {"1_runs": (f"/experiments/{eid}/runs", name), "2_run_overview": (f"/experiments/{eid}/runs/{rid}", "Description"),
           "3_run_model_metrics": (f"/experiments/{eid}/runs/{rid}/model-metrics", "val/"),
           "4_run_artifacts": (f"/experiments/{eid}/runs/{rid}/artifacts", "overlays")}
    overlays = [a.path for a in client.list_artifacts(rid, "overlays")] if any(a.path == "overlays" for a in client.list_artifacts(rid)) else []
    if overlays:
        out["4_run_artifacts"] = (out["4_run_artifacts"][0] + "/" + overlays[0], "overlays")
    models = client.search_logged_models(experiment_ids=[eid], filter_string=f"source_run_id = '{rid}'")
    if models:
        out["5_logged_model"] = (f"/experiments/{eid}/models/{models[0].model_id}", "test/dice" if "medmtl.scores_set" in run.data.tags
                                 and run.data.tags["medmtl.scores_set"] == "test" else "val/dice")
    versions = [v for v in client.search_model_versions(f"run_id = '{rid}'") if model_name in (None, v.name)]
    if versions:
        v = max(versions, key=lambda v: int(v.version))
        out["6_model_version"] = (f"/models/{v.name}/versions/{v.version}", "Dice")
    return out


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands
    as NUL-terminated JSON on fd 3, answers on fd 4), so no driver library is needed.

    One page (tab) per browser; its local storage persists across :meth:`goto` calls.
    """

    def __init__(self, chromium: str, *, width: int, height: int) -> None:
        import fcntl
        import os

        self._profile = tempfile.TemporaryDirectory()
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # high, close-on-exec copies so that dup2 onto 3 and 4 in the child cannot clobber one another
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def child_fds() -> None:
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)

        cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=child_fds)
        for fd in hi:
            os.close(fd)
        self._w, self._r = os.fdopen(to_chrome_w, "wb", buffering=0), os.fdopen(from_chrome_r, "rb", buffering=0)
        self._buf, self._id = b"", 0
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.width, self.height = width, height
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _call(self, method: str, session: str | None = None, **params):
        import json

        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._w.write(json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = self._r.read(1 << 16)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def call(self, method: str, **params):
        """One DevTools command on the page; returns its result."""
        return self._call(method, self._session, **params)

    def js(self, expression: str):
        """Evaluate ``expression`` in the page (promises awaited); returns its JSON value."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        """Navigate (a hash route on the same origin re-renders the single-page app)."""
        self.call("Page.navigate", url=url)

    def wait_for(self, text: str, timeout: float = 60.0) -> bool:
        """Wait until the page shows ``text`` (then a moment for charts and images); False on timeout."""
        import json

        deadline = time.monotonic() + timeout
        probe = f"!!(document.body && document.body.innerText.includes({json.dumps(text)}))"
        while time.monotonic() < deadline:
            if self.js(probe):
                time.sleep(1.5)  # charts and images paint after their data arrives
                return True
            time.sleep(0.5)
        return False

    def screenshot(self, png: Path, *, height: int | None = None) -> None:
        """Save the viewport as ``png``; with ``height``, first grow the window to that height (pages that
        scroll inside a container only show more that way), then restore it."""
        import base64

        if height:
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False)
            time.sleep(2.0)
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        if height:
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)

    def close(self) -> None:
        """Stop Chromium and remove its profile."""
        try:
            self._call("Browser.close")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._profile.cleanup()


# clicks and inputs a reviewer would make, as page scripts
_CLOSE_ASSISTANT = "(() => { const b = document.querySelector('button[aria-label=\"Close\"]'); if (b) b.click(); return !!b; })()"
_SHOW_MORE = "(() => { const b = document.querySelector('button[aria-label=\"Expand description\"]'); if (b) b.click(); return !!b; })()"
# the run page scrolls inside one container, not the document: its scroll height is the page's length
_PAGE_LENGTH = "Math.max(...[...document.querySelectorAll('div')].map(e => e.scrollHeight > e.clientHeight ? e.scrollHeight - e.clientHeight : 0))"
_SEARCH = """(q => { const el = document.querySelector('input[placeholder*="Search metric"]'); if (!el) return false;
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(el, q);
  el.dispatchEvent(new Event('input', {bubbles: true})); return true; })"""


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with status {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Command line: start ``mlflow ui`` on STORE, capture the pages, stop the UI; prints the PNG paths."""
    ap = argparse.ArgumentParser(prog="python -m medmtl.tracking.screenshots", description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="sqlite:///.../mlflow.db, the mlflow.db file, or its folder")
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--run-id", default=None, help="default: the newest finished run")
    ap.add_argument("--model", default=None, help="registered model name (default: any version registered from the run)")
    ap.add_argument("--port", type=int, default=5057, help="UI port (not one Chromium blocks as unsafe, e.g. 5060, 5061)")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=1100)
    ap.add_argument("--chromium", default=None, help="Chromium binary (default: Debian's /usr/bin/chromium)")
    args = ap.parse_args(argv)

    uri, artifacts = store_paths(args.store)
    chromium = find_chromium(args.chromium)
    routes = pages(uri, run_id=args.run_id, model_name=args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{args.port}"
    # a store written through a server holds mlflow-artifacts:/ URIs: serve them from the same folder
    cmd = [interpreter_tool("mlflow"), "ui", "--backend-store-uri", uri, "--default-artifact-root", artifacts.as_uri(),
           "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
    log = open(out / "mlflow_ui.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=interpreter_env(), start_new_session=True)
    browser = None
    try:
        _wait(f"{base}/health", proc)
        browser = Browser(chromium, width=args.width, height=args.height)
        for stem, (route, ready) in routes.items():
            browser.goto(f"{base}/#{route}?{WORKFLOW_PARAM}")
            if not browser.wait_for(ready):
                print(f"warning: {stem}: {ready!r} did not appear; capturing what rendered", file=sys.stderr)
            if browser.js(_CLOSE_ASSISTANT):  # MLflow opens its chat panel on a first local visit
                time.sleep(1.0)
            height = None
            if stem == "2_run_overview":
                browser.js(_SHOW_MORE)
                time.sleep(1.0)
                height = int(min(args.height + (browser.js(_PAGE_LENGTH) or 0), 2.4 * args.height))
            if stem == "3_run_model_metrics":
                browser.js(_SEARCH + "('val/')")
                time.sleep(3.0)
                height = int(1.6 * args.height)
            png = out / f"{stem}.png"
            browser.screenshot(png, height=height)
            print(png)
    finally:
        if browser is not None:
            browser.close()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
