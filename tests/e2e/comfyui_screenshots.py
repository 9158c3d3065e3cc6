#!/usr/bin/env python3
"""Pictures of the example workflows in the real ComfyUI frontend (headless Chromium).

Writes docs/images/comfyui_txt2img.png and docs/images/comfyui_hires.png. Needs a running ComfyUI
with this repository in its custom_nodes (so the QSilk nodes draw as themselves), Playwright
(`pip install playwright`) and a Chromium (the system's: `--chromium /usr/bin/chromium`):

    python tests/e2e/comfyui_screenshots.py --url http://127.0.0.1:8188 --chromium /usr/bin/chromium

Each workflow is loaded through the frontend's own `app.loadGraphData`, the view is set so that
every node fits, and the canvas is cropped to the nodes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOBS = (("qsilk_txt2img", "comfyui_txt2img", 1.0), ("qsilk_hires", "comfyui_hires", 0.72))

FIT = """(scale) => {
    const app = window.app, c = app.canvas, title = 30, margin = 30;
    let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
    for (const n of app.graph._nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    c.ds.scale = scale;
    c.ds.offset = [-x0 + margin / scale, -y0 + margin / scale];
    c.setDirty(true, true); c.draw(true, true);
    const r = c.canvas.getBoundingClientRect();
    return {left: r.left, top: r.top, w: (x1 - x0) * scale + 2 * margin, h: (y1 - y0) * scale + 2 * margin,
            cw: r.width, ch: r.height};
}"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8188", help="the running ComfyUI")
    ap.add_argument("--chromium", help="Chromium executable (default: Playwright's own)")
    ap.add_argument("--out", default=str(REPO / "docs" / "images"))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 2000, "height": 900}, device_scale_factor=1)
        page.goto(args.url, wait_until="networkidle", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
        time.sleep(3)
        for name, picture, scale in JOBS:
            graph = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
            page.evaluate("async (g) => { await window.app.loadGraphData(g, true, false); }", graph)
            time.sleep(2)
            page.keyboard.press("Escape")  # close any dialog
            box = page.evaluate(FIT, scale)
            time.sleep(1.5)
            clip = {"x": box["left"], "y": box["top"], "width": min(box["w"], box["cw"]),
                    "height": min(box["h"], box["ch"])}
            path = out / f"{picture}.png"
            page.screenshot(path=str(path), clip=clip)
            print(f"{path}: {clip['width']:.0f}×{clip['height']:.0f}, {path.stat().st_size // 1024} KB")
        browser.close()


if __name__ == "__main__":
    main()
