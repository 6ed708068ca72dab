"""Screenshot TensorBoard's CUSTOM SCALARS tab with headless Chromium (docs/filter_curves.png).

    python docs/tensorboard_screenshot.py LOGDIR docs/filter_curves.png

Starts ``tensorboard`` on a free loopback port, drives headless ``chromium`` over the DevTools
protocol (a minimal WebSocket client from the standard library): smoothing and outlier clipping
off, the per-layer chart widened with a log y axis, its last point hovered (the tooltip names
every layer); saves the PNG, then stops both processes. Needs ``chromium`` on PATH.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_json(url: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class DevTools:
    """Just enough of RFC 6455 to send DevTools commands and read their answers."""

    def __init__(self, ws_url: str) -> None:
        rest = ws_url.removeprefix("ws://")
        hostport, path = rest.split("/", 1)
        host, port = hostport.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(4096)
        if b" 101 " not in answer.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"WebSocket handshake refused: {answer[:200]!r}")
        self.next_id = 0

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _recv_message(self) -> str:
        parts = b""
        while True:
            head = self._recv_exact(2)
            fin, length = head[0] & 0x80, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._recv_exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._recv_exact(8))[0]
            parts += self._recv_exact(length)
            if fin:
                return parts.decode()

    def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)
        while True:
            message = json.loads(self._recv_message())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


# every element of the page, through the shadow DOMs of TensorBoard's Polymer dashboards
ALL_ELEMENTS_JS = """
const all = [];
const walk = (root) => {
  for (const el of root.querySelectorAll('*')) {
    all.push(el);
    if (el.shadowRoot) walk(el.shadowRoot);
  }
};
walk(document);
"""
# widen the first chart and give it a log y axis (its "fullscreen" and "line-weight" buttons)
EXPAND_FIRST_CHART_JS = f"""
(() => {{
  {ALL_ELEMENTS_JS}
  const clicked = [];
  for (const icon of ['fullscreen', 'line-weight']) {{
    const button = all.find(el => el.getAttribute && el.getAttribute('icon') === icon);
    if (button) {{ button.click(); clicked.push(icon); }}
  }}
  return clicked;
}})()
"""
# a point near the right end of the first chart's plot area (hovering it shows the tooltip that
# names every series)
HOVER_POINT_JS = f"""
(() => {{
  {ALL_ELEMENTS_JS}
  const plot = all.find(el => el.classList && el.classList.contains('xy-plot'));
  if (!plot) return null;
  const box = plot.getBoundingClientRect();
  return [box.right - 3, box.top + box.height / 2];
}})()
"""


def screenshot(logdir: Path, out: Path, width: int, height: int) -> None:
    tb_port, cdp_port = free_port(), free_port()
    tensorboard = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(tb_port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    profile = tempfile.mkdtemp()
    chromium = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
         f"--remote-debugging-port={cdp_port}", f"--window-size={width},{height}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{tb_port}"
        wait_json(f"{base}/data/plugin/custom_scalars/layout")
        pages = wait_json(f"http://127.0.0.1:{cdp_port}/json/list")
        page = next(p for p in pages if p.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                   deviceScaleFactor=1, mobile=False)  # fmt: skip
        tools.call("Page.navigate", url=f"{base}/")
        time.sleep(3)
        # the custom-scalars dashboard reads this setting from localStorage
        tools.evaluate("localStorage.setItem('_ignoreYOutliers', 'false')")
        tools.call("Page.navigate", url=f"{base}/#custom_scalars&_smoothingWeight=0")
        time.sleep(12)
        clicked = tools.evaluate(EXPAND_FIRST_CHART_JS)
        print(f"chart buttons clicked: {clicked}")
        time.sleep(2)
        point = tools.evaluate(HOVER_POINT_JS)
        if point:
            x, y = point
            tools.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
            time.sleep(1)
        png = tools.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(png))
    finally:
        for process in (chromium, tensorboard):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    screenshot(args.logdir, args.out, args.width, args.height)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
