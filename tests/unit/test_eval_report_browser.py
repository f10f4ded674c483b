"""report.html in a real browser: thumbnails keep their aspect ratio (square and non-square).

Renders a report in headless Chromium (--dump-dom after a small script has written every <img>'s
natural and rendered size into the page). Skips when /usr/bin/chromium is absent; CI installs it.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess

import pytest

from rsmoe.eval.report import THUMB_SIZE, write_report

CHROMIUM = "/usr/bin/chromium"

PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) {
    out.push({key: im.alt, nw: im.naturalWidth, nh: im.naturalHeight, cw: im.clientWidth, ch: im.clientHeight});
  });
  var pre = document.createElement('pre'); pre.id = 'sizes'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 60, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not found: install Debian's chromium to render report.html")
def test_thumbnails_keep_their_aspect_ratio_in_chromium(tmp_path):
    sizes = {"square": (256, 256), "wide": (300, 150), "tall": (120, 240), "odd": (252, 256), "tiny": (32, 32)}
    # Long text beside each image: a flex row as tall as its text would stretch a stretchable image.
    items = [{"key": k, "image_png": _png(w, h), "experts": {"theme": "A scene. " * 20}, "caption": "A caption. " * 30,
              "references": [f"reference {i} " * 8 for i in range(15)]} for k, (w, h) in sizes.items()]
    paths = write_report(tmp_path / "report", {"meta": {"model": "test"}}, items)
    probe = tmp_path / "probe.html"
    probe.write_text(paths["html"].read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,900", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="sizes">(.*?)</pre>', proc.stdout)
    assert m, f"no sizes in the dumped DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    rendered = {r["key"]: r for r in json.loads(m.group(1))}
    assert set(rendered) == set(sizes)
    for key, (w, h) in sizes.items():
        r = rendered[key]
        assert r["cw"] > 0 and r["ch"] > 0, (key, r)
        assert (r["cw"] / r["ch"]) == pytest.approx(w / h, rel=0.02), (key, r)  # the image's own aspect ratio
        assert max(r["cw"], r["ch"]) == THUMB_SIZE, (key, r)  # longest side drawn at the thumbnail size
