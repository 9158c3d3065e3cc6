"""End-to-end check of QSilk on a running SD.Next through its HTTP API (outside pytest).

    python tests/e2e/sdnext_api.py --url http://127.0.0.1:7870 [--record-baseline FILE | --baseline FILE]
        [--server-log FILE] [--quick] [--samplers sweep|NAMES | --all-samplers] [--samplers-only]

SD.Next (vladmandic/sdnext) started with ``launch.py --skip-all --api-only`` (or with its UI) and one
diffusers model loaded (``tests/e2e/make_diffusers_folder.py`` writes a random-weight SD1.5 folder).
Every request is 64×64 with at most 4 steps. Prints one ``PASS``/``FAIL``/``SKIP`` line per check
(with the request's wall time) and ``N passed, M failed, K skipped``; exits 1 when a check failed.

"Off is bit-identical to SD.Next without the extension" needs two server runs, as for the other
WebUIs: start SD.Next with QSilk NOT in ``<data-dir>/extensions`` and run ``--record-baseline
base.json`` (requests without QSilk arguments; pixel hashes written), then with QSilk and run
``--baseline base.json`` (the same requests with ``{"enabled": false}`` must give those hashes).

What differs from ``webui_api.py`` (A1111 / Forge): SD.Next hands ``process()`` the request's args
exactly as sent; bad arguments fail the request with HTTP 422 (not 500) whose ``errors`` names the
field; hires needs ``hr_resize_mode`` > 0 and takes ``hr_denoising_strength``; without
``sampler_name`` the model's own scheduler runs (PNDM for SD1.5, which QSilk passes through with
a note); the API may return JPEG (hashes are then of the file bytes, still deterministic).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import webui_api  # noqa: E402
from webui_api import (Api, Checker, _message, _qsilk_part, check_again, check_crisp, check_gentle,  # noqa: E402
                       check_log, check_not_loaded, check_off, check_positional_off, check_scripts_listed,
                       load_baseline, png_pixels, print_notes, print_totals, qsilk_args, report_request)

SIZE = 64
STEPS = 4
SEED = 1234
PROMPT = "a lighthouse at dusk, film grain"
BALANCED = [{"enabled": True, "preset": "Balanced"}]
OFF = [{"enabled": False}]


class Result(webui_api.Result):
    """One generation: status, image hashes (PNG pixel data, else the file bytes), infotexts.
    ``ok`` / ``error`` are webui_api's; the images are read apart: SD.Next may answer JPEG/WebP."""

    def __init__(self, status: int, body, seconds: float):
        self.status, self.body, self.seconds = status, body, seconds
        self.hashes: list[str] = []
        self.infotexts: list[str] = []
        self.info: dict = {}
        if status == 200 and isinstance(body, dict):
            for image in body.get("images") or []:
                data = base64.b64decode(image.split(",", 1)[-1])
                try:
                    data = png_pixels(data)[2]
                except ValueError:
                    pass  # JPEG/WebP: the encoded bytes (deterministic for the same pixels)
                self.hashes.append(hashlib.sha256(data).hexdigest()[:16])
            try:
                self.info = json.loads(body.get("info") or "{}")
            except ValueError:
                self.info = {}
            self.infotexts = list(self.info.get("infotexts") or [])

    def note(self) -> str:
        return str((self.info.get("extra_generation_params") or {}).get("QSilk note") or "")


def generate(chk: Checker, label: str, payload: dict, qsilk: list | None) -> Result:
    body = dict(payload)
    if qsilk is not None:
        body["alwayson_scripts"] = qsilk_args(qsilk)
    status, answer, seconds = chk.api.call("/sdapi/v1/txt2img", body)
    chk.timings.append((label, seconds))
    return Result(status, answer, seconds)


def names(api: Api, path: str) -> list[str]:
    _, items, _ = api.call(path)
    return [i.get("name") or i.get("model_name") for i in items] if isinstance(items, list) else []


def cases(api: Api, quick: bool) -> tuple[dict[str, dict], list[str]]:
    notes = []
    base = {"prompt": PROMPT, "negative_prompt": "blurry", "seed": SEED, "steps": STEPS, "width": SIZE,
            "height": SIZE, "cfg_scale": 5.0, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1,
            "send_images": True, "save_images": False}
    out = {"t2i_euler": dict(base)}
    if quick:
        return out, notes
    samplers = names(api, "/sdapi/v1/samplers")
    for key, wanted in (("t2i_dpmpp_2m", "DPM++ 2M"), ("t2i_unipc", "UniPC"), ("t2i_euler_a", "Euler a")):
        if wanted in samplers:
            out[key] = {**base, "sampler_name": wanted}
        else:
            notes.append(f"sampler {wanted} not offered")
    out["t2i_default_scheduler"] = {k: v for k, v in base.items() if k != "sampler_name"}
    hires = {**base, "enable_hr": True, "hr_scale": 2.0, "hr_resize_mode": 1, "hr_second_pass_steps": 2,
             "hr_denoising_strength": 0.5, "hr_sampler_name": "DPM++ 2M"}
    upscalers = names(api, "/sdapi/v1/upscalers")
    latent = next((u for u in upscalers if u.lower().startswith("latent")), None)
    image = next((u for u in upscalers if "lanczos" in u.lower()), None)
    if latent:
        out["t2i_hires_latent"] = {**hires, "hr_upscaler": latent}
    else:
        notes.append(f"no latent upscaler offered ({upscalers}); latent hires skipped")
    if image:
        out["t2i_hires_image"] = {**hires, "hr_upscaler": image, "hr_force": True}
    out["t2i_batch2"] = {**base, "batch_size": 2}
    return out, notes


def record_baseline(chk: Checker, path: str) -> None:
    check_not_loaded(chk)
    reqs, notes = cases(chk.api, chk.args.quick)
    print_notes(notes)
    hashes = {}
    for name, payload in reqs.items():
        r = generate(chk, f"baseline {name}", payload, None)
        if report_request(chk, f"baseline {name}", r):
            hashes[name] = r.hashes
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"host": "sdnext", "url": chk.api.url, "hashes": hashes}, f, indent=1)
    print(f"NOTE baseline written to {path}")


def ui_checks(chk: Checker) -> None:
    """The UI as Gradio describes it (``/config``): in both tabs a visible "Enable QSilk" checkbox
    (SD.Next draws no InputAccordion header checkbox) inside the QSilk accordion."""
    status, config, sec = chk.api.call("/config")
    comps = config.get("components", []) if isinstance(config, dict) else []
    for tab in ("txt2img", "img2img"):
        found = [c for c in comps if str(c.get("props", {}).get("elem_id", "")).endswith(f"{tab}_qsilk_enabled")]
        props = found[0].get("props", {}) if found else {}
        ok = bool(found) and found[0].get("type") == "checkbox" and props.get("visible") is not False \
            and props.get("label") == "Enable QSilk"
        chk.report(ok, f"UI ({tab}): a visible 'Enable QSilk' checkbox",
                   f"{found[0].get('type')} {props.get('elem_id')} label={props.get('label')!r} "
                   f"visible={props.get('visible')} value={props.get('value')}" if found else f"HTTP {status}: not found",
                   sec)
    axes = set()
    for c in comps:
        for choice in c.get("props", {}).get("choices") or []:
            label = choice[0] if isinstance(choice, (list, tuple)) else choice
            if isinstance(label, str) and label.startswith("[QSilk]"):
                axes.add(label)
    chk.report({"[QSilk] Enabled", "[QSilk] Preset", "[QSilk] Tile size"} <= axes,
               "UI: the XYZ grid offers QSilk axes", f"{len(axes)} axes, e.g. {sorted(axes)[:4]}")


def run_checks(chk: Checker) -> None:
    api, args = chk.api, chk.args
    baseline = load_baseline(args.baseline)

    check_scripts_listed(chk)
    ui_checks(chk)

    reqs, notes = cases(api, args.quick)
    print_notes(notes)
    for name, payload in reqs.items():
        off = generate(chk, f"{name} off", payload, OFF)
        if not report_request(chk, f"{name}: off request succeeds", off):
            continue
        check_off(chk, name, off, baseline, "SD.Next")
        on = generate(chk, f"{name} Balanced", payload, BALANCED)
        if not report_request(chk, f"{name}: Balanced request succeeds", on):
            continue
        want = payload.get("batch_size", 1)
        tagged = [t for t in on.infotexts if "QSilk: v=1; preset=Balanced" in t]
        chk.report(len(on.hashes) == want and len(tagged) == want,
                   f"{name}: {want} image(s), each infotext has 'QSilk: v=1; preset=Balanced'",
                   _qsilk_part(on.infotexts[0]) if on.infotexts else "no infotexts")
        if name == "t2i_default_scheduler":  # SD1.5's PNDM: passed through, said so in the infotext
            chk.report("PNDM" in on.note(), f"{name}: the default PNDM scheduler is named in a QSilk note",
                       on.note() or "no note")
            chk.report(on.hashes == off.hashes, f"{name}: passed through = the off image, bit for bit",
                       f"{on.hashes} vs off {off.hashes}")
            continue
        chk.report(all(a != b for a, b in zip(on.hashes, off.hashes)), f"{name}: Balanced changes the pixels",
                   f"{on.hashes} vs off {off.hashes}")
        if on.note():
            print(f"NOTE {name}: QSilk note: {on.note()}")
        if name == "t2i_euler":
            again = generate(chk, f"{name} Balanced again", payload, BALANCED)
            check_again(chk, name, again, on)
            gentle = generate(chk, f"{name} [true, Gentle]", payload, [True, "Gentle"])
            check_gentle(chk, name, gentle)
            crisp = generate(chk, f"{name} Crisp tile=48", payload, [{"preset": "Crisp", "tile": 48}])
            check_crisp(chk, name, crisp)
            pos_off = generate(chk, f"{name} [false]", payload, [False])
            check_positional_off(chk, name, pos_off, off)

    payload = reqs["t2i_euler"]
    for label, value, needle in (("tile=3", [{"tile": 3}], "tile"),
                                 ("unknown key 'tiles'", [{"tiles": 48}], "tiles"),
                                 ("unknown preset 'Sharpest'", [{"preset": "Sharpest"}], "Sharpest"),
                                 ("q_hi='x'", [{"q_hi": "x"}], "q_hi"),
                                 ("two dicts", [{"enabled": True}, {"preset": "Gentle"}], "one argument dict")):
        r = generate(chk, f"invalid {label}", payload, value)
        text = r.body if isinstance(r.body, str) else json.dumps(r.body)
        chk.report(r.status == 422 and needle in text, f"invalid {label} -> HTTP 422 naming it",
                   f"HTTP {r.status}: {_message(r.body) or text[:300]}", r.seconds)
    after = generate(chk, "after errors", payload, BALANCED)
    chk.report(after.ok and any("preset=Balanced" in t for t in after.infotexts),
               "a valid request after the refused ones succeeds", "" if after.ok else after.error(), after.seconds)

    interrupt_check(chk, payload, args.server_log)
    if args.all_samplers or args.samplers:
        wanted = names(api, "/sdapi/v1/samplers") if args.all_samplers else (
            list(SWEEP) if args.samplers == "sweep" else [n.strip() for n in args.samplers.split(",")])
        sampler_sweep(chk, payload, wanted, args.server_log, args.sweep_steps)


#: A sampler sweep of reasonable length: the classes QSilk has an x0 formula for, and a few it
#: passes through (SD.Next lists about 120 samplers; ``--all-samplers`` runs every one).
SWEEP = ("UniPC", "DDIM", "Euler", "Euler a", "Euler SGM", "Euler EDM", "Euler FlowMatch", "DPM++", "DPM++ 2M",
         "DPM++ 3M", "DPM++ 1S", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M EDM", "DPM SDE", "Heun", "DEIS", "TCD",
         "LCM", "DDPM", "LMSD", "PNDM", "IPNDM", "KDPM2", "DDIM Parallel", "SA Solver", "ER-SDE", "RES-Multistep 2M")


def sampler_sweep(chk: Checker, payload: dict, wanted: list[str], log_path: str | None, steps: int = 3) -> None:
    """One Balanced request per sampler (`steps` steps). Each must succeed and the job's console line
    must show either stabilised evaluations or a note saying the scheduler was passed through.
    Needs ``--server-log`` (the line is read from the log the request appended)."""
    if not log_path:
        chk.report(None, "sampler sweep", "needs --server-log")
        return
    offered = names(chk.api, "/sdapi/v1/samplers")
    for sampler in wanted:
        if sampler not in offered:
            chk.report(None, f"sampler {sampler!r}", "not offered by this SD.Next")
            continue
        with open(log_path, "rb") as f:
            start = f.seek(0, 2)
        r = generate(chk, f"{sampler} Balanced", {**payload, "sampler_name": sampler, "steps": steps}, BALANCED)
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        found = [ln.strip() for ln in lines if "QSilk (sdnext):" in ln]
        line = found[-1] if found else ""
        m = re.search(r"(\d+) evaluation\(s\) stabilised", line)
        evaluations = int(m.group(1)) if m else -1
        passed_through = "passes it through" in line or "no x0 formula" in line or "not covered" in line
        ok = r.ok and bool(found) and (evaluations > 0 or passed_through)
        what = (f"{evaluations} evaluation(s) stabilised" if evaluations > 0 else "passed through") if found else ""
        chk.report(ok, f"sampler {sampler!r}: {what}" if ok else f"sampler {sampler!r}",
                   (line.split("s; ", 1)[-1][:160] if passed_through else "") if r.ok else r.error(), r.seconds)


def interrupt_check(chk: Checker, payload: dict, log_path: str | None) -> None:
    """Interrupt a Balanced job mid-way (``/sdapi/v1/interrupt``): SD.Next then skips
    ``postprocess``; QSilk must still report the job (from ``after_process``) and leave nothing
    behind — the next off request gives the off image of before, bit for bit."""
    import threading

    before = generate(chk, "interrupt: off before", payload, OFF)
    start = 0
    if log_path:
        with open(log_path, "rb") as f:
            start = f.seek(0, 2)
    box: dict = {}
    job = threading.Thread(target=lambda: box.update(r=generate(chk, "interrupt: Balanced, 12 steps",
                                                                   {**payload, "steps": 12}, BALANCED)))
    job.start()
    time.sleep(max(3.0, before.seconds / 2))
    status, _, _ = chk.api.call("/sdapi/v1/interrupt", {})
    job.join()
    r = box["r"]
    chk.report(status in (200, 204) and r.status == 200, "interrupt: the interrupted Balanced request returns",
               f"interrupt HTTP {status}, request HTTP {r.status}", r.seconds)
    if log_path:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        found = [ln.strip() for ln in text.splitlines() if "QSilk (sdnext):" in ln]
        chk.report(bool(found), "interrupt: the job is still reported (after_process)", found[-1] if found else "none")
    after = generate(chk, "interrupt: off after", payload, OFF)
    chk.report(before.ok and after.ok and after.hashes == before.hashes,
               "interrupt: the next off request is bit-identical to the one before", f"{after.hashes} vs {before.hashes}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7870")
    ap.add_argument("--quick", action="store_true", help="txt2img Euler and the invalid-argument checks only")
    ap.add_argument("--all-samplers", action="store_true", help="also every sampler /sdapi/v1/samplers lists")
    ap.add_argument("--samplers", metavar="NAMES", help="also these samplers (comma-separated), or 'sweep' "
                    "for a representative set; with --server-log")
    ap.add_argument("--samplers-only", action="store_true", help="run only the sampler checks")
    ap.add_argument("--interrupt-only", action="store_true", help="run only the interrupt check")
    ap.add_argument("--sweep-steps", type=int, default=3, help="steps per sampler-sweep request (default 3; "
                    "SD.Next's PNDM sampler fails at 3 steps with or without QSilk: use 4)")
    ap.add_argument("--record-baseline", metavar="FILE", help="server runs WITHOUT QSilk: record image hashes")
    ap.add_argument("--baseline", metavar="FILE", help="hashes recorded with --record-baseline")
    ap.add_argument("--server-log", metavar="FILE", help="the server's console output, to find QSilk's line")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    args.host_name = "sdnext"
    chk = Checker(Api(args.url, args.timeout), args)
    print(f"QSilk end-to-end API check: SD.Next at {args.url}", flush=True)
    t0 = time.perf_counter()
    if args.record_baseline:
        record_baseline(chk, args.record_baseline)
    elif args.interrupt_only:
        interrupt_check(chk, cases(chk.api, True)[0]["t2i_euler"], args.server_log)
    elif args.samplers_only:
        ui_checks(chk)
        payload = cases(chk.api, True)[0]["t2i_euler"]
        wanted = names(chk.api, "/sdapi/v1/samplers") if args.all_samplers else (
            list(SWEEP) if args.samplers in (None, "sweep") else [n.strip() for n in args.samplers.split(",")])
        sampler_sweep(chk, payload, wanted, args.server_log, args.sweep_steps)
    else:
        run_checks(chk)
        if args.server_log:
            check_log(chk, args.server_log)
            with open(args.server_log, encoding="utf-8", errors="replace") as f:
                hosts = set(re.findall(r"QSilk \(([^)]*)\): \d+ pass", f.read()))
            chk.report(hosts == {"sdnext"}, "the summary line names the host sdnext", f"host names {sorted(hosts)}")
    print_totals(chk, t0, "sdnext")
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
