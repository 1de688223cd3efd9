"""The page at ``/`` in headless Chromium (Debian's package): type a prompt, click Generate, get the image.

The browser is driven over the Chrome DevTools Protocol (a WebSocket) and kept off the network:
every host but the test server's loopback address resolves to nothing. A screenshot of the page
with its result is saved in the test's temporary folder. Skipped only where no Chromium binary
is installed (CI installs one: see .ci/run).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websocket
from server_support import decode_png, running_server, wait_until
from t2i_server import Limits
from t2i_server._jobs import Service, load_model

from t2i_core import GenerationRequest
from t2i_core.testing import assert_images_equal

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium; CI has it)")


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs, over one page's WebSocket."""

    def __init__(self, url: str) -> None:
        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.last = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last += 1
        self.socket.send(json.dumps({"id": self.last, "method": method, "params": params}))
        for _ in range(10_000):  # events arrive in between; bounded like every loop here
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])
        raise RuntimeError(f"{method}: no answer")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect(); "
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({selector!r}).focus()")
        self.call("Input.insertText", text=text)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[DevTools]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",  # the suite may run as root (CI does)
        "--disable-gpu",
        "--remote-debugging-port=0",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--metrics-recording-only",
        "--no-pings",
        # Nothing leaves the machine: every host but the loopback address resolves to nothing.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "about:blank",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(
            lambda: any("DevTools listening on" in line for line in lines) or process.poll() is not None, 60, "Chromium"
        )
        listening = next((line for line in lines if "DevTools listening on" in line), None)
        assert listening is not None, "".join(lines)
        port = re.search(r"ws://127\.0\.0\.1:(\d+)/", listening).group(1)  # type: ignore[union-attr]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        page = next(target for target in targets if target["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        try:
            yield devtools
        finally:
            devtools.socket.close()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def test_the_page_makes_an_image_from_a_typed_prompt(chromium: DevTools, tmp_path: Path, sd15_engine: Any) -> None:
    service = Service([load_model("tiny:sd15", "tiny:sd15", device="cpu")], Limits())
    with running_server(service) as base:
        chromium.call("Page.enable")
        chromium.call("Page.navigate", url=f"{base}/")
        ready = "document.readyState === 'complete' && document.getElementById('model').options.length > 0"
        wait_until(lambda: chromium.evaluate(ready), 30, "the page and its list of models")
        assert chromium.evaluate("document.getElementById('steps').placeholder") == "50"

        chromium.type_into("#prompt", "a lighthouse at dusk")
        chromium.type_into("#negative", "fog")
        chromium.type_into("#steps", "2")
        chromium.type_into("#seed", "42")
        chromium.click("#generate")

        shown = "(() => { const img = document.querySelector('#gallery figure img'); return !!img && img.complete && img.naturalWidth > 0; })()"
        wait_until(lambda: chromium.evaluate(shown), 60, "the image in the gallery")
        status = chromium.evaluate("document.getElementById('status').textContent")
        assert status == "Done: 1 image(s), seed 42.", status
        assert chromium.evaluate("document.getElementById('error').textContent") == ""
        caption = chromium.evaluate("document.querySelector('#gallery figure figcaption').innerText")
        assert (
            "a lighthouse at dusk" in caption and "42" in caption and "tiny:sd15" in caption and "64\u00d764" in caption
        )
        assert chromium.evaluate("document.querySelector('#gallery figure').dataset.seed") == "42"

        screenshot = chromium.call("Page.captureScreenshot", format="png")
        (tmp_path / "page.png").write_bytes(base64.b64decode(screenshot["data"]))
        # T2I_DOCS_SCREENSHOT=docs/images/serve-page.png refreshes the picture in docs/serving.md.
        if os.environ.get("T2I_DOCS_SCREENSHOT"):
            Path(os.environ["T2I_DOCS_SCREENSHOT"]).write_bytes(base64.b64decode(screenshot["data"]))
        assert decode_png(screenshot["data"]).size[0] >= 1000

        # The image the page shows is exactly the SDK's for the settings it sent.
        source = chromium.evaluate("document.querySelector('#gallery figure img').src")
        shown_image = decode_png(httpx.get(source, timeout=30).content)
        request = GenerationRequest(
            prompt="a lighthouse at dusk", negative_prompt="fog", num_inference_steps=2, seed=42
        )
        assert_images_equal([shown_image], sd15_engine.generate(request).images)

        # A bad value comes back as a message next to the field it names.
        chromium.evaluate("document.getElementById('seed').value = ''")
        chromium.evaluate("document.getElementById('width').value = '100'")
        chromium.click("#generate")
        invalid = "document.getElementById('width').getAttribute('aria-invalid') === 'true'"
        wait_until(lambda: chromium.evaluate(invalid), 30, "the error on the width field")
        assert "multiple of 8" in chromium.evaluate("document.getElementById('error').textContent")
