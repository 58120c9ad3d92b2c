"""OHIF in front of an Orthanc, for a look at results: the demo's viewer and screenshots of series
that ohif-check does not check (Secondary Capture key images).

The viewer is the shared ohif-check's (../shared/tools/ohif-check: its cached OHIF ``dist/``, its
``app-config.js`` and its ``serve.py``, which proxies /dicom-web to the Orthanc on the same origin),
served from a thread of this process on a free loopback port; the browser is tests/cdp.py's
headless Chromium.  Nothing is downloaded: ``make setup`` (ohif-check's setup.sh) filled the cache.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.peers import REPO

OHIF_CHECK = REPO.parent / "shared" / "tools" / "ohif-check"
OHIF_VERSION = os.environ.get("OHIF_VERSION", "3.13.2")  # the version ohif-check's setup.sh installs


def _cache() -> Path:
    return Path(os.environ.get("OHIF_CHECK_HOME") or Path.home() / ".cache" / "ohif-check")


def dist() -> Path:
    return _cache() / f"ohif-app-{OHIF_VERSION}" / "dist"


def available() -> str:
    """Empty when the viewer can be served, else why not."""
    if not (OHIF_CHECK / "lib" / "serve.py").is_file():
        return f"ohif-check not found at {OHIF_CHECK}"
    if not (dist() / "index.html").is_file():
        return f"OHIF {OHIF_VERSION} not in {dist()}: run `make setup` (ohif-check's setup.sh)"
    if not Path("/usr/bin/chromium").exists():
        return "chromium not installed: run `make setup`"
    return ""


def _serve_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ohif_check_serve", OHIF_CHECK / "lib" / "serve.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_viewer(orthanc_url: str, port: int = 0) -> Any:
    """OHIF on 127.0.0.1 (``.url``; ``.stop()`` stops it) reading ``orthanc_url``'s DICOMweb."""
    why = available()
    if why:
        raise RuntimeError(why)
    server = _serve_module().ViewerServer(str(dist()), str(OHIF_CHECK / "lib" / "app-config.js"), orthanc_url, port)
    return server.start()


def study_url(viewer_url: str, study_uid: str) -> str:
    return f"{viewer_url}/viewer?StudyInstanceUIDs={study_uid}"


def series_screenshot(viewer_url: str, study_uid: str, series_uid: str, out: Path, timeout: float = 60.0) -> Path:
    """Open ``series_uid`` of the study in OHIF (headless Chromium) and save the page as ``out`` (PNG).

    Waits until the viewport's canvas is drawn (not uniform); raises TimeoutError otherwise.
    """
    import numpy as np
    from PIL import Image

    from tests.cdp import Browser

    with Browser(timeout=timeout) as browser:
        page = browser.new_page()
        page.call("Emulation.setDeviceMetricsOverride", {"width": 1600, "height": 900, "deviceScaleFactor": 1,
                                                          "mobile": False})
        page.goto(f"{viewer_url}/app-config.js")  # same origin: no onboarding tour from the start
        page.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        page.goto(f"{study_url(viewer_url, study_uid)}&SeriesInstanceUIDs={series_uid}")
        deadline = time.monotonic() + timeout
        while True:
            drawn = page.evaluate(
                "(() => { const c = document.querySelector('canvas.cornerstone-canvas');"
                " if (!c) return null; const r = c.getBoundingClientRect();"
                " return [r.x, r.y, r.width, r.height]; })()")
            if drawn and drawn[2] > 100:
                time.sleep(1.5)  # the image arrives after the canvas
                page.screenshot(out)
                x, y, w, h = (int(v) for v in drawn)
                px = np.asarray(Image.open(out).convert("L"))[y:y + h, x:x + w].astype(float)
                if px.size and px.std() > 5.0:
                    return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"OHIF did not draw series {series_uid} within {timeout:.0f} s")
            time.sleep(0.5)
