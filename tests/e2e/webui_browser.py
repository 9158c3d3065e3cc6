"""End-to-end check of QSilk's panel in a running WebUI, in headless Chromium (outside pytest).

    python tests/e2e/webui_browser.py --url http://127.0.0.1:7860 [--host-name neo]
        [--chromium /usr/bin/chromium] [--shots DIR]

Needs ``pip install playwright`` (the Python package only: it drives an installed Chromium, e.g.
Debian's ``apt-get install chromium``; no browser download). Start the WebUI with its UI (no
``--nowebui``) and a checkpoint. Checks, in txt2img: the QSilk accordion is there (and open: on by
default); choosing preset Crisp changes the controls; one generation's infotext carries
``QSilk: v=1; preset=Crisp``; the X/Y/Z plot axis list has ``[QSilk] …`` entries; pasting an
infotext with ``QSilk: v=1; preset=Balanced; tile=48`` through the ↙ button sets the tile slider
to 48. Prints PASS/FAIL lines and ``N passed, M failed``; screenshots of the opened panel go to
``--shots`` (``<host>_panel_balanced.png``, ``<host>_panel_paper.png``, ``<host>_panel.png`` (Crisp),
``<host>_panel_full.png``, ``<host>_page.png``). Also checked: the five groups are there, the
low-bit line describes the loaded model without Refresh, the preset's help follows the chosen
preset and the summary line names what Paper (literal) sets.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

TAB = "txt2img"


class Run:
    def __init__(self):
        self.passed = self.failed = 0

    def report(self, ok: bool, name: str, detail: str = "") -> bool:
        self.passed += bool(ok)
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok


def eid(name: str) -> str:
    return f"#script_{TAB}_qsilk_{name}"


def number_value(page, name: str):
    """The number box of a QSilk slider (read from the DOM: works inside closed groups)."""
    return page.evaluate(
        """(sel) => { const el = document.querySelector(sel + ' input[type=number]');
                      return el ? el.value : null; }""", eid(name))


def dropdown_value(page, name: str):
    return page.evaluate(
        """(sel) => { const root = document.querySelector(sel);
                      if (!root) return null;
                      const input = root.querySelector('input');
                      if (input && input.value) return input.value;
                      const single = root.querySelector('.single-select, .token, span');
                      return single ? single.textContent.trim() : null; }""", eid(name))


def choose(page, selector: str, option: str) -> None:
    """Pick `option` in a Gradio 3.41 / 4.x dropdown."""
    page.locator(f"{selector} input").first.click()
    page.wait_for_timeout(300)
    opts = page.locator("ul.options li, [role=listbox] [role=option]")
    target = opts.filter(has_text=option)
    exact = [i for i in range(target.count()) if target.nth(i).inner_text().strip() == option]
    (target.nth(exact[0]) if exact else target.first).click()
    page.wait_for_timeout(300)
    # Gradio 3.41 keeps the list open while the input has focus
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(500)


def dropdown_options(page, selector: str) -> list[str]:
    page.locator(f"{selector} input").first.click()
    page.wait_for_timeout(500)
    texts = [t.strip() for t in page.locator("ul.options li, [role=listbox] [role=option]").all_inner_texts()]
    page.keyboard.press("Escape")
    page.wait_for_timeout(200)
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--host-name", default="webui")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--shots", default=None, help="folder for screenshots")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the generation")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    run = Run()
    shots = args.shots
    if shots:
        os.makedirs(shots, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        page.set_default_timeout(60_000)
        t0 = time.perf_counter()
        page.goto(args.url, wait_until="domcontentloaded", timeout=180_000)
        page.wait_for_selector(f"#{TAB}_prompt textarea", timeout=180_000)
        page.wait_for_timeout(2000)
        print(f"NOTE page loaded in {time.perf_counter() - t0:.1f} s", flush=True)

        panel = page.locator(eid("enabled")).first
        if not run.report(panel.count() > 0, "QSilk accordion in txt2img", eid("enabled")):
            print(f"{run.passed} passed, {run.failed} failed")
            return 1
        panel.scroll_into_view_if_needed()
        header = panel.locator(".label-wrap").first
        text = header.inner_text().strip() if header.count() else panel.inner_text()[:40]
        visible = page.locator(eid("preset")).first.is_visible()
        checkbox = page.evaluate(
            """(sel) => { const cb = document.querySelector(sel + ' input[type=checkbox]')
                            || document.querySelector(sel + '-checkbox input[type=checkbox]');
                          return cb ? cb.checked : null; }""", eid("enabled"))
        run.report(visible, "QSilk accordion open by default (on)", f"header {text!r}, checkbox {checkbox}")
        if not visible:
            header.click()
            page.wait_for_timeout(800)
            run.report(page.locator(eid("preset")).first.is_visible(), "QSilk accordion opens on click")

        if shots:
            page.wait_for_timeout(500)
            panel.screenshot(path=os.path.join(shots, f"{args.host_name}_panel_balanced.png"))
        # -- panel polish (issue 15): groups, low-bit line, preset help, summary ----------------
        groups = {g: page.locator(eid(f"group_{g}")).count() > 0
                  for g in ("qsilk", "aqclip", "schedule", "probe", "quant")}
        run.report(all(groups.values()), "five closed groups (micro-clamp, AQClip, where, probe, low-bit)",
                   str(groups))
        quant_line = page.evaluate("(sel) => { const el = document.querySelector(sel); "
                                   "return el ? el.textContent.trim() : null; }", eid("quant_status"))
        run.report(bool(quant_line) and "no model loaded" not in quant_line,
                   "low-bit status describes the loaded model without Refresh", repr((quant_line or "")[:160]))

        def block_text(name):
            return page.evaluate("(sel) => { const el = document.querySelector(sel); "
                                 "return el ? el.textContent : ''; }", eid(name))

        balanced_help = block_text("preset")
        choose(page, eid("preset"), "Paper (literal)")
        for _ in range(30):
            paper_hint = page.locator(eid("preset_hint")).first.inner_text()
            paper_help = block_text("preset")
            if paper_hint.startswith("Paper (literal):") and "reproduction" in paper_help:
                break
            page.wait_for_timeout(500)
        run.report("The default." in balanced_help and "reproduction" in paper_help and "The default." not in paper_help,
                   "the preset's help describes the chosen preset",
                   f"Balanced: {balanced_help.strip()[-90:]!r}; Paper: {paper_help.strip()[-90:]!r}")
        run.report(all(w in paper_hint for w in ("tanh α 2", "no sigma floor", "tail shares 0.0005–0.01"))
                   and "%" not in paper_hint,
                   "the summary names the values Paper (literal) sets, tail shares as on the sliders",
                   repr(paper_hint[:220]))

        before = {n: number_value(page, n) for n in ("p_wide", "p_narrow", "tile", "q_hi")}
        hint_before = page.locator(eid("preset_hint")).first.inner_text()
        print(f"NOTE preset {dropdown_value(page, 'preset')!r}, values {before}", flush=True)
        if shots:
            page.wait_for_timeout(500)
            panel.screenshot(path=os.path.join(shots, f"{args.host_name}_panel_paper.png"))
        choose(page, eid("preset"), "Crisp")
        for _ in range(30):  # the values come back from the server: poll (seconds on a busy CPU)
            after = {n: number_value(page, n) for n in ("p_wide", "p_narrow", "tile", "q_hi")}
            hint_after = page.locator(eid("preset_hint")).first.inner_text()
            if after != before and hint_after.startswith("Crisp:"):
                break
            page.wait_for_timeout(500)
        run.report(dropdown_value(page, "preset") == "Crisp" and after != before and hint_after != hint_before,
                   "preset Crisp fills the controls",
                   f"preset {dropdown_value(page, 'preset')!r}, {before} -> {after}; hint now {hint_after[:120]!r}")
        if shots:
            page.wait_for_timeout(500)
            panel.screenshot(path=os.path.join(shots, f"{args.host_name}_panel.png"))
            # the same with every group opened, for a fuller picture
            for acc in panel.locator(".label-wrap").all()[1:]:
                try:
                    acc.click()
                    page.wait_for_timeout(200)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            page.wait_for_timeout(500)
            panel.screenshot(path=os.path.join(shots, f"{args.host_name}_panel_full.png"))

        # -- generate once -----------------------------------------------------------------
        page.locator(f"#{TAB}_prompt textarea").fill("a lighthouse at dusk, film grain")
        for name, value in (("steps", 4), ("width", 64), ("height", 64)):
            box = page.locator(f"#{TAB}_{name} input[type=number]").first
            if box.count():
                box.fill(str(value))
                box.press("Enter")
        page.wait_for_timeout(300)
        t0 = time.perf_counter()
        page.locator(f"#{TAB}_generate").click()
        info_sel = f"#html_info_{TAB}"
        ok, info = False, ""
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            page.wait_for_timeout(1000)
            info = page.locator(info_sel).first.inner_text() if page.locator(info_sel).count() else ""
            if "Steps:" in info or "Error" in info or "error" in info.lower():
                ok = "QSilk: v=1; preset=Crisp" in info
                break
        qs = [part.strip() for part in info.replace("\n", ", ").split(", ") if "QSilk" in part]
        run.report(ok, "generation's infotext has 'QSilk: v=1; preset=Crisp'",
                   f"{time.perf_counter() - t0:.1f} s; {qs or info[-300:]!r}")
        if shots:
            page.screenshot(path=os.path.join(shots, f"{args.host_name}_page.png"), full_page=False)

        # -- X/Y/Z plot axes -------------------------------------------------------------------
        try:
            choose(page, f"#{TAB}_script_container #script_list", "X/Y/Z plot")
            page.wait_for_timeout(1000)
            options = dropdown_options(page, f"#script_{TAB}_xyz_plot_x_type")
            mine = [o for o in options if o.startswith("[QSilk]")]
            run.report(len(mine) > 2, "X/Y/Z plot axis list has [QSilk] axes",
                       f"{len(mine)} of {len(options)}: {', '.join(mine[:6])}{' …' if len(mine) > 6 else ''}")
            choose(page, f"#{TAB}_script_container #script_list", "None")
        except Exception as exc:  # noqa: BLE001
            run.report(False, "X/Y/Z plot axis list has [QSilk] axes", f"{type(exc).__name__}: {exc}")

        # -- paste an infotext -------------------------------------------------------------
        infotext = ("a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 1, "
                    "Size: 64x64, QSilk: v=1; preset=Balanced; tile=48")
        page.locator(f"#{TAB}_prompt textarea").fill(infotext)
        page.locator("#paste").first.click()
        tile = None
        for _ in range(20):
            page.wait_for_timeout(500)
            tile = number_value(page, "tile")
            if tile == "48":
                break
        run.report(tile == "48" and dropdown_value(page, "preset") == "Balanced",
                   "paste (↙) of 'QSilk: v=1; preset=Balanced; tile=48' sets the controls",
                   f"tile {tile}, preset {dropdown_value(page, 'preset')!r}, "
                   f"prompt now {page.locator(f'#{TAB}_prompt textarea').input_value()!r}")
        browser.close()
    print(f"{run.passed} passed, {run.failed} failed (host {args.host_name})")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
