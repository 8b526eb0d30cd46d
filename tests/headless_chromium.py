"""Drives Debian's headless Chromium over the DevTools protocol on a pipe (no extra packages).

`--remote-debugging-pipe` makes Chromium read protocol commands from fd 3 and write replies to
fd 4, each a JSON object ended by a NUL byte. That is all a test needs to open a page, wait until
its text (including Polymer's shadow DOM, which --dump-dom leaves out) shows what it should, and
take a screenshot: no WebDriver, no websocket library, no browser download.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")

# The text a person can see: descends into open shadow roots, skips scripts, styles, templates
# and elements that are not rendered (display: none, zero size: e.g. other dashboards' tabs).
PAGE_TEXT_JS = """(() => {
  const out = [];
  const skip = new Set(["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT"]);
  const walk = (node) => {
    if (node.nodeType === Node.ELEMENT_NODE) {
      if (skip.has(node.tagName)) return;
      if (node.getClientRects && !node.getClientRects().length &&
          getComputedStyle(node).display !== "contents") return;
    }
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) out.push(child.textContent);
      else walk(child);
    }
  };
  walk(document);
  return out.join(" ").replace(/\\s+/g, " ");
})()"""


def _pipe():
  """os.pipe() with both ends moved to fds >= 10, clear of the 3 and 4 Chromium reads."""
  ends = []
  for fd in os.pipe():
    ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
    os.close(fd)
  return tuple(ends)


def find_chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


class ProtocolError(RuntimeError):
  pass


class Chromium:
  """One headless browser with one page; use as a context manager."""

  def __init__(self, binary=None, width=1600, height=1000, timeout=30.0, prefix=()):
    self.binary = binary or find_chromium()
    # prefix: a command that runs the browser elsewhere, e.g. nsenter into a cluster's network.
    self.prefix = list(prefix)
    self.width, self.height, self.timeout = width, height, timeout
    self._next_id = 0
    self._buffer = b""
    self.log_path = None

  def __enter__(self):
    self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
    to_browser_r, self._to_browser = _pipe()
    self._from_browser, from_browser_w = _pipe()
    self.log_path = os.path.join(self._profile, "chromium.log")
    self._log = open(self.log_path, "wb")
    cmd = [*self.prefix, self.binary, *FLAGS, f"--user-data-dir={self._profile}",
           "--remote-debugging-pipe", f"--window-size={self.width},{self.height}", "about:blank"]
    # bash moves the pipe ends (fds >= 10, see _pipe) to fds 3 and 4, where Chromium expects them.
    shell = (f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} '
             f'{to_browser_r}<&- {from_browser_w}>&-')
    self.proc = subprocess.Popen(["bash", "-c", shell, "bash", *cmd], stdin=subprocess.DEVNULL,
                                 stdout=self._log, stderr=subprocess.STDOUT,
                                 pass_fds=(to_browser_r, from_browser_w))
    os.close(to_browser_r)
    os.close(from_browser_w)
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    self.call("Emulation.setDeviceMetricsOverride", session=True, width=self.width,
              height=self.height, deviceScaleFactor=1, mobile=False)
    return self

  def __exit__(self, *exc):
    try:
      self.call("Browser.close", timeout=5)
    except (ProtocolError, OSError):
      pass
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()  # only the browser this object started
      self.proc.wait()
    for fd in (self._to_browser, self._from_browser):
      os.close(fd)
    self._log.close()
    shutil.rmtree(self._profile, ignore_errors=True)

  # ---- the protocol ----
  def call(self, method, session=False, timeout=None, **params):
    """Sends one command and returns its result (events arriving meanwhile are dropped)."""
    self._next_id += 1
    message = {"id": self._next_id, "method": method, "params": params}
    if session:
      message["sessionId"] = self.session
    os.write(self._to_browser, json.dumps(message).encode() + b"\0")
    deadline = time.monotonic() + (timeout or self.timeout)
    while True:
      reply = self._read(deadline)
      if reply.get("id") == self._next_id:
        if "error" in reply:
          raise ProtocolError(f"{method}: {reply['error']}")
        return reply.get("result", {})

  def _read(self, deadline):
    while b"\0" not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0:
        raise ProtocolError("no reply from Chromium in time")
      ready, _, _ = select.select([self._from_browser], [], [], left)
      if ready:
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
          raise ProtocolError(f"Chromium exited (code {self.proc.poll()}); see its log")
        self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)

  # ---- what tests use ----
  def open(self, url):
    self.call("Page.navigate", session=True, url=url)

  def evaluate(self, expression):
    result = self.call("Runtime.evaluate", session=True, expression=expression,
                       returnByValue=True)
    if "exceptionDetails" in result:
      raise ProtocolError(f"page script failed: {result['exceptionDetails']}")
    return result["result"].get("value")

  def text(self):
    return self.evaluate(PAGE_TEXT_JS) or ""

  def wait_for_text(self, needles, timeout=60.0):
    """Polls the page text until it contains every needle; returns the text (or the last one)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
      text = self.text()
      if all(n in text for n in needles):
        break
      time.sleep(0.5)
    return text

  def screenshot(self, path):
    data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
    with open(path, "wb") as f:
      f.write(base64.b64decode(data))
    return path
