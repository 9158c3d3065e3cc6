"""End-to-end check of QSilk on a running WebUI through its HTTP API (outside pytest).

    python tests/e2e/webui_api.py --url http://127.0.0.1:7860 [--host-name neo] [--quick]
        [--record-baseline FILE | --baseline FILE] [--server-log FILE]

Start the WebUI with ``--api`` (``--nowebui`` is enough) and one checkpoint; every request is 64×64
with at most 4 steps. Prints one ``PASS``/``FAIL``/``SKIP`` line per check (with the request's
wall time) and a final ``N passed, M failed, K skipped`` line; exits 1 when a check failed.

"Off is bit-identical to a WebUI without the extension" needs two server runs:

1. start the WebUI **without** QSilk in ``extensions/`` and run with ``--record-baseline base.json``:
   every request is sent without QSilk arguments and the pixel hashes are written to the file;
2. start it again **with** QSilk and run with ``--baseline base.json``: the same requests with
   ``{"enabled": false}`` must give the recorded hashes.

``--server-log FILE`` (the server's captured console) adds a check that QSilk's one-line job
summary (``QSilk (<host>): … pass(es) …``) was printed, and prints the distinct lines' host names.

Needs only the Python standard library (PNGs are compared by their decompressed pixel data).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib

SIZE = 64
STEPS = 4
SEED = 1234
PROMPT = "a lighthouse at dusk, film grain"


# -- tiny stdlib PNG helpers ------------------------------------------------------------------
def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, decompressed IDAT stream) of a PNG; the stream is what we hash."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width, height = 8, [], 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    return width, height, zlib.decompress(b"".join(idat))


def make_png(width: int = SIZE, height: int = SIZE) -> str:
    """A deterministic RGB gradient PNG as base64 (the img2img init image)."""
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in ((x * 4) % 256, (y * 4) % 256, 128))
                    for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


# -- HTTP ---------------------------------------------------------------------------------
class Api:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url.rstrip("/"), timeout

    def call(self, path: str, payload: dict | None = None) -> tuple[int, dict | str, float]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        seconds = time.perf_counter() - t0
        try:
            return status, json.loads(body), seconds
        except ValueError:
            return status, body.decode(errors="replace"), seconds


class Result:
    """One generation: status, image hashes, infotexts, seconds, raw body (on failure)."""

    def __init__(self, status: int, body, seconds: float):
        self.status, self.body, self.seconds = status, body, seconds
        self.hashes: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.infotexts: list[str] = []
        if status == 200 and isinstance(body, dict):
            for image in body.get("images") or []:
                w, h, pixels = png_pixels(base64.b64decode(image.split(",", 1)[-1]))
                self.hashes.append(hashlib.sha256(pixels).hexdigest()[:16])
                self.sizes.append((w, h))
            try:
                info = json.loads(body.get("info") or "{}")
            except ValueError:
                info = {}
            self.info = info
            self.infotexts = list(info.get("infotexts") or [])

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.hashes)

    def error(self) -> str:
        text = self.body if isinstance(self.body, str) else json.dumps(self.body)
        return f"HTTP {self.status}: {text[:400]}"


# -- the checks ---------------------------------------------------------------------------
class Checker:
    def __init__(self, api: Api, args: argparse.Namespace):
        self.api, self.args = api, args
        self.passed = self.failed = self.skipped = 0
        self.timings: list[tuple[str, float]] = []

    def report(self, ok: bool | None, name: str, detail: str = "", seconds: float | None = None) -> bool:
        tag = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        if ok is None:
            self.skipped += 1
        elif ok:
            self.passed += 1
        else:
            self.failed += 1
        timing = f" ({seconds:.2f} s)" if seconds is not None else ""
        print(f"{tag} {name}{timing}{': ' + detail if detail else ''}", flush=True)
        return bool(ok)

    def generate(self, label: str, endpoint: str, payload: dict) -> Result:
        status, body, seconds = self.api.call(f"/sdapi/v1/{endpoint}", payload)
        self.timings.append((label, seconds))
        return Result(status, body, seconds)


def qsilk_args(value) -> dict:
    return {"QSilk": {"args": value}}


def pick(names: list[str], *wanted: str) -> str | None:
    lower = {n.lower(): n for n in names}
    for w in wanted:
        if w.lower() in lower:
            return lower[w.lower()]
    return None


def cases(api: Api, quick: bool, host: str) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """The base requests (without QSilk arguments), by name; and notes on what was chosen."""
    notes = []
    _, samplers, _ = api.call("/sdapi/v1/samplers")
    names = [s["name"] for s in samplers] if isinstance(samplers, list) else []
    base = {"prompt": PROMPT, "negative_prompt": "blurry", "seed": SEED, "steps": STEPS, "width": SIZE,
            "height": SIZE, "cfg_scale": 5.0, "sampler_name": pick(names, "Euler") or "Euler",
            "batch_size": 1, "n_iter": 1, "send_images": True, "save_images": False}
    out: dict[str, tuple[str, dict]] = {"t2i_euler": ("txt2img", dict(base))}
    if quick:
        return out, notes
    for key, wanted in (("t2i_dpmpp_2m", ("DPM++ 2M", "DPM++ 2M Karras")), ("t2i_ddim", ("DDIM",))):
        name = pick(names, *wanted)
        if name is None:
            notes.append(f"sampler {wanted[0]} not offered (samplers: {', '.join(names)})")
            continue
        out[key] = ("txt2img", {**base, "sampler_name": name})
    hires = {**base, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.5,
             # new Forge / Neo: without it the hires pass fails inside Forge; other hosts ignore the field
             "hr_additional_modules": ["Use same choices"]}
    _, latent_modes, _ = api.call("/sdapi/v1/latent-upscale-modes")
    _, upscalers, _ = api.call("/sdapi/v1/upscalers")
    latent_modes = [m["name"] for m in latent_modes] if isinstance(latent_modes, list) else []
    upscalers = [u["name"] for u in upscalers] if isinstance(upscalers, list) else []
    latent = pick(latent_modes, "Latent")
    image = pick(upscalers, "Lanczos") or pick(upscalers, "None")  # Neo 2.26 has no Lanczos: "None" = plain resize
    if latent:
        out["t2i_hires_latent"] = ("txt2img", {**hires, "hr_upscaler": latent})
    else:
        notes.append(f"no latent upscale mode offered (latent modes: {latent_modes}); hires with a latent upscaler skipped")
    if image:
        out["t2i_hires_image"] = ("txt2img", {**hires, "hr_upscaler": image})
        if image != "Lanczos":
            notes.append(f"no Lanczos upscaler (upscalers: {upscalers}); image-space hires uses {image!r}")
    # a hires CFG: new Forge / Neo call it hr_cfg (default 1.0); send the other spelling too
    out["t2i_hires_cfg"] = ("txt2img", {**hires, "hr_upscaler": latent or image, "hr_cfg": 5.0, "hr_cfg_scale": 5.0})
    out["t2i_batch2"] = ("txt2img", {**base, "batch_size": 2})
    out["i2i"] = ("img2img", {**base, "init_images": [make_png()], "denoising_strength": 0.6})
    return out, notes


def load_baseline(path: str | None) -> dict:
    """The hashes a ``--record-baseline`` run wrote, by request name ({} without a baseline)."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)["hashes"]


def print_notes(notes: list[str]) -> None:
    for n in notes:
        print(f"NOTE {n}")


def check_not_loaded(chk: Checker) -> None:
    """A baseline server must run without QSilk."""
    _, scripts, _ = chk.api.call("/sdapi/v1/scripts")
    present = isinstance(scripts, dict) and "qsilk" in [s.lower() for s in scripts.get("txt2img", [])]
    chk.report(not present, "baseline server runs without QSilk", "qsilk is loaded!" if present else "")


def check_scripts_listed(chk: Checker) -> None:
    status, scripts, sec = chk.api.call("/sdapi/v1/scripts")
    for tab in ("txt2img", "img2img"):
        listed = [s.lower() for s in scripts.get(tab, [])] if isinstance(scripts, dict) else []
        chk.report("qsilk" in listed, f"/sdapi/v1/scripts lists qsilk in {tab}",
                   "" if "qsilk" in listed else f"HTTP {status}: {str(scripts)[:300]}", sec)


def report_request(chk: Checker, label: str, r) -> bool:
    """PASS when the generation returned images (their hashes), else FAIL with the HTTP error."""
    return chk.report(r.ok, label, ",".join(r.hashes) if r.ok else r.error(), r.seconds)


def check_off(chk: Checker, name: str, off, baseline: dict, host: str) -> None:
    """An off request writes no QSilk infotext and gives the baseline's pixels (`host` without QSilk)."""
    text = " | ".join(off.infotexts)
    chk.report("QSilk" not in text, f"{name}: off writes no QSilk infotext", "" if "QSilk" not in text else text[:300])
    if name in baseline:
        chk.report(off.hashes == baseline[name], f"{name}: off bit-identical to {host} without QSilk",
                   f"{off.hashes} vs baseline {baseline[name]}")
    else:
        chk.report(None, f"{name}: off bit-identical to {host} without QSilk", "no baseline (--baseline)")


def check_again(chk: Checker, name: str, again, on) -> None:
    chk.report(again.ok and again.hashes == on.hashes, f"{name}: Balanced twice is bit-identical",
               f"{again.hashes} vs {on.hashes}" if again.ok else again.error(), again.seconds)


def check_positional_off(chk: Checker, name: str, pos_off, off) -> None:
    chk.report(pos_off.ok and pos_off.hashes == off.hashes, f"{name}: positional [false] = off",
               f"{pos_off.hashes} vs {off.hashes}" if pos_off.ok else pos_off.error(), pos_off.seconds)


def check_gentle(chk: Checker, name: str, gentle) -> None:
    chk.report(gentle.ok and any("preset=Gentle" in t for t in gentle.infotexts),
               f"{name}: positional [true, \"Gentle\"] = preset Gentle",
               _qsilk_part(gentle.infotexts[0]) if gentle.ok and gentle.infotexts else gentle.error(),
               gentle.seconds)


def check_crisp(chk: Checker, name: str, crisp) -> None:
    chk.report(crisp.ok and any("QSilk: v=1; preset=Crisp; tile=48" in t for t in crisp.infotexts),
               f"{name}: dict {{preset: Crisp, tile: 48}} in the infotext",
               _qsilk_part(crisp.infotexts[0]) if crisp.ok and crisp.infotexts else crisp.error(), crisp.seconds)


def print_totals(chk: Checker, t0: float, host: str) -> None:
    if chk.timings:
        print("TIMES " + "; ".join(f"{label} {s:.2f}s" for label, s in chk.timings))
    print(f"{chk.passed} passed, {chk.failed} failed, {chk.skipped} skipped "
          f"({time.perf_counter() - t0:.0f} s, host {host})")


def record_baseline(chk: Checker, path: str) -> None:
    api = chk.api
    check_not_loaded(chk)
    reqs, notes = cases(api, chk.args.quick, chk.args.host_name)
    print_notes(notes)
    hashes = {}
    for name, (endpoint, payload) in reqs.items():
        r = chk.generate(f"baseline {name}", endpoint, payload)
        if chk.report(r.ok, f"baseline {name}", r.hashes and ",".join(r.hashes) or r.error(), r.seconds):
            hashes[name] = r.hashes
            if name == "t2i_hires_cfg":
                print(f"NOTE hires-CFG infotext: {r.infotexts[0] if r.infotexts else ''!r}")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"host": chk.args.host_name, "url": api.url, "hashes": hashes}, f, indent=1)
    print(f"NOTE baseline written to {path}")


def run_checks(chk: Checker) -> None:
    api, args = chk.api, chk.args
    baseline = load_baseline(args.baseline)

    # -- the script is registered -----------------------------------------------------------
    check_scripts_listed(chk)
    status, info, sec = api.call("/sdapi/v1/script-info")
    entries = [s for s in info if isinstance(s, dict) and (s.get("name") or "").lower() == "qsilk"] \
        if isinstance(info, list) else []
    ok = len(entries) == 2 and all(e.get("is_alwayson") for e in entries) and all(e.get("args") for e in entries)
    detail = ""
    if entries:
        a = entries[0]["args"]
        detail = (f"{len(entries)} entries (img2img flags {sorted(bool(e.get('is_img2img')) for e in entries)}), "
                  f"{len(a)} args, first: {a[0].get('label')!r}={a[0].get('value')!r}, "
                  f"second: {a[1].get('label')!r}={a[1].get('value')!r} choices={a[1].get('choices')}")
    chk.report(ok, "/sdapi/v1/script-info describes qsilk", detail or f"HTTP {status}: {str(info)[:300]}", sec)

    reqs, notes = cases(api, args.quick, args.host_name)
    print_notes(notes)

    balanced = [{"enabled": True, "preset": "Balanced"}]
    for name, (endpoint, payload) in reqs.items():
        off = chk.generate(f"{name} off", endpoint, {**payload, "alwayson_scripts": qsilk_args([{"enabled": False}])})
        if not report_request(chk, f"{name}: off request succeeds", off):
            continue
        check_off(chk, name, off, baseline, "the WebUI")
        on = chk.generate(f"{name} Balanced", endpoint, {**payload, "alwayson_scripts": qsilk_args(balanced)})
        if not report_request(chk, f"{name}: Balanced request succeeds", on):
            continue
        want = payload.get("batch_size", 1)
        chk.report(len(on.hashes) == want, f"{name}: {want} image(s) returned", f"got {len(on.hashes)} {on.sizes}")
        tagged = [t for t in on.infotexts if "QSilk: v=1; preset=Balanced" in t]
        chk.report(len(tagged) == want and len(on.infotexts) == want,
                   f"{name}: every infotext has 'QSilk: v=1; preset=Balanced'",
                   _qsilk_part(on.infotexts[0]) if on.infotexts else "no infotexts")
        differs = all(a != b for a, b in zip(on.hashes, off.hashes))
        chk.report(differs, f"{name}: Balanced changes the pixels", f"{on.hashes} vs off {off.hashes}")
        note = on.info.get("extra_generation_params", {}).get("QSilk note") if isinstance(on.info, dict) else None
        if note:
            print(f"NOTE {name}: QSilk note: {note}")
        if name == "t2i_hires_cfg" and on.infotexts:
            m = re.search(r"Hires CFG Scale: ([^,]+)", on.infotexts[0])
            print(f"NOTE {name}: hires CFG in infotext: {m.group(1) if m else 'none (host has no hires CFG)'}")
        if name == "t2i_euler":
            again = chk.generate(f"{name} Balanced again", endpoint,
                                 {**payload, "alwayson_scripts": qsilk_args(balanced)})
            check_again(chk, name, again, on)
            default = chk.generate(f"{name} default", endpoint, dict(payload))
            chk.report(default.ok and default.hashes == on.hashes
                       and any("QSilk: v=1; preset=Balanced" in t for t in default.infotexts),
                       f"{name}: no QSilk args = the default (on, Balanced)",
                       f"{default.hashes} vs Balanced {on.hashes}" if default.ok else default.error(), default.seconds)
            pos_off = chk.generate(f"{name} [false]", endpoint, {**payload, "alwayson_scripts": qsilk_args([False])})
            check_positional_off(chk, name, pos_off, off)
            gentle = chk.generate(f"{name} [true, Gentle]", endpoint,
                                  {**payload, "alwayson_scripts": qsilk_args([True, "Gentle"])})
            check_gentle(chk, name, gentle)
            crisp = chk.generate(f"{name} Crisp tile=48", endpoint,
                                 {**payload, "alwayson_scripts": qsilk_args([{"preset": "Crisp", "tile": 48}])})
            check_crisp(chk, name, crisp)

    # -- invalid arguments fail the request, naming the field -------------------------------------
    payload = reqs["t2i_euler"][1]
    for label, value, needle in (("tile=3", [{"tile": 3}], "tile"),
                                 ("unknown key 'tiles'", [{"tiles": 48}], "tiles"),
                                 ("unknown preset 'Sharpest'", [{"preset": "Sharpest"}], "Sharpest"),
                                 ("two dicts", [{"enabled": True}, {"preset": "Gentle"}], "QSilk")):
        r = chk.generate(f"invalid {label}", "txt2img", {**payload, "alwayson_scripts": qsilk_args(value)})
        text = r.body if isinstance(r.body, str) else json.dumps(r.body)
        message = _message(r.body)
        chk.report(r.status == 500 and needle in text, f"invalid {label} -> HTTP 500 naming it",
                   f"HTTP {r.status}: {message or (_qsilk_part(r.infotexts[0]) if r.infotexts else text[:300])}",
                   r.seconds)
    # and the server is still usable afterwards
    after = chk.generate("after errors", "txt2img", {**payload, "alwayson_scripts": qsilk_args(balanced)})
    chk.report(after.ok and any("preset=Balanced" in t for t in after.infotexts),
               "a valid request after the failed ones succeeds", "" if after.ok else after.error(), after.seconds)


def _qsilk_part(infotext: str) -> str:
    m = re.search(r"QSilk: [^,\n]*(?:, QSilk note: [^,\n]*)?", infotext)
    return m.group(0) if m else f"no QSilk entry in {infotext[-200:]!r}"


def _message(body) -> str:
    if isinstance(body, dict):
        for key in ("errors", "message", "detail", "error"):
            if body.get(key):
                return f"{key}: {str(body[key])[:300]}"
    return ""


def check_log(chk: Checker, path: str) -> None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        chk.report(False, "QSilk summary line in the server console", str(exc))
        return
    found = [ln for ln in lines if re.search(r"QSilk \([^)]*\): \d+ pass", ln)]
    hosts = sorted({re.search(r"QSilk \(([^)]*)\)", ln).group(1) for ln in found})
    chk.report(bool(found), "QSilk summary line in the server console",
               f"{len(found)} lines, host names {hosts}; last: {found[-1].strip()}" if found else "none")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--host-name", default="webui", help="a label for the output (neo, classic, forge, a1111)")
    ap.add_argument("--quick", action="store_true", help="txt2img Euler and the invalid-argument checks only")
    ap.add_argument("--record-baseline", metavar="FILE", help="server runs WITHOUT QSilk: record pixel hashes")
    ap.add_argument("--baseline", metavar="FILE", help="hashes recorded with --record-baseline")
    ap.add_argument("--server-log", metavar="FILE", help="the server's console output, to find QSilk's line")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    chk = Checker(Api(args.url, args.timeout), args)
    print(f"QSilk end-to-end API check: host {args.host_name} at {args.url}", flush=True)
    t0 = time.perf_counter()
    if args.record_baseline:
        record_baseline(chk, args.record_baseline)
    else:
        run_checks(chk)
        if args.server_log:
            check_log(chk, args.server_log)
    print_totals(chk, t0, args.host_name)
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
