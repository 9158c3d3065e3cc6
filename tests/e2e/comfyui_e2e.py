#!/usr/bin/env python3
"""End-to-end check of the QSilk ComfyUI nodes against a real, headless ComfyUI on CPU.

    python tests/e2e/comfyui_e2e.py --comfyui /path/to/ComfyUI [--python /path/to/venv/bin/python] [--keep]

It needs a ComfyUI checkout and a Python that has ComfyUI's requirements installed (``--python``;
default: the Python running this script). No model download: it writes a random-weight, full-size
SD1.5 checkpoint once (``make_checkpoint.py``, the one the WebUI checks use; about 2 GB, cached in
``--cache-dir``; it needs diffusers and transformers, as in the dev venv: ``--checkpoint-python``,
default the Python running this script) unless ``--checkpoint`` names one. ComfyUI runs with ``--base-directory`` set to a temporary folder whose
``custom_nodes/qsilk`` links to this repository, so the checkout itself is not touched and the
current work tree is what gets tested.

The workflows it runs are the ones shipped in ``example_workflows/`` (ComfyUI's UI format),
converted to API format here with the server's ``/object_info`` (so what we ship is what we test),
shrunk to a 64×64 image and a few steps. One PASS/FAIL line per check, then "N passed, M failed";
exit status 1 when anything failed. This file is deliberately not named ``test_*.py``: it is not part
of the pytest run (it needs ComfyUI and takes minutes on CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
HERE = Path(__file__).resolve().parent
QSILK_NODES = ("QSilkModel", "QSilkModelAdvanced", "QSilkLatent")
PRESETS = ("Off", "Gentle", "Balanced", "Crisp", "High-res", "Paper (literal)")
# widget-less UI nodes that never reach the server
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SUMMARY_RE = re.compile(r"QSilk \(comfyui\): (?P<rest>.*)")


# --------------------------------------------------------------------------------------------
# UI (graph) format → API format
# --------------------------------------------------------------------------------------------

def _spec_type(spec):
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def _spec_opts(spec):
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _has_control_widget(name, spec):
    """The frontend adds a 'control_after_generate' widget (serialised right after the value) to an
    INT named seed/noise_seed or any INT/COMBO whose spec says control_after_generate."""
    opts = _spec_opts(spec)
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return _spec_type(spec) == "INT" and name in ("seed", "noise_seed")


def ui_to_api(graph: dict, object_info: dict) -> dict:
    """Convert a ComfyUI UI-format workflow into the API format POST /prompt takes.

    widgets_values are matched to the node's widget inputs in /object_info's input order
    (required, then optional), skipping each control_after_generate value. Raises ValueError when
    a node's widgets_values do not fit its definition (a stale example workflow)."""
    links = {}
    for link in graph.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            link_id, src, src_slot = link[0], link[1], link[2]
            links[link_id] = (src, src_slot)
    prompt = {}
    for node in graph["nodes"]:
        ctype = node["type"]
        if ctype in UI_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed
            if node.get("mode", 0) == 4:
                raise ValueError(f"node {node['id']} ({ctype}) is bypassed; not supported here")
            continue
        if ctype not in object_info:
            raise ValueError(f"node {node['id']}: unknown node type {ctype!r}")
        info = object_info[ctype]
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {node['id']} ({ctype}): dict widgets_values not supported")
        inputs = {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                is_widget = _spec_type(spec) in WIDGET_TYPES and not _spec_opts(spec).get("forceInput")
                value = None
                if is_widget:
                    if not values:
                        raise ValueError(f"node {node['id']} ({ctype}): no widget value for {name!r}")
                    value = values.pop(0)
                    if _has_control_widget(name, spec):
                        if not values:
                            raise ValueError(f"node {node['id']} ({ctype}): {name!r} lacks its control_after_generate value")
                        values.pop(0)
                if name in linked:
                    src, slot = links[linked[name]]
                    inputs[name] = [str(src), slot]
                elif is_widget:
                    inputs[name] = value
        if values:
            raise ValueError(f"node {node['id']} ({ctype}): {len(values)} widget value(s) left over: {values!r}")
        prompt[str(node["id"])] = {"class_type": ctype, "inputs": inputs}
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return sorted((k for k, v in prompt.items() if v["class_type"] == class_type), key=int)


def bypass(prompt: dict, class_types) -> dict:
    """The same workflow without the given (1-in, 1-out pass-through) nodes: their consumers are
    wired to their input."""
    p = copy.deepcopy(prompt)
    for nid in [k for k, v in p.items() if v["class_type"] in class_types]:
        node = p.pop(nid)
        src = next(v for v in node["inputs"].values() if isinstance(v, list))
        for other in p.values():
            for name, v in other["inputs"].items():
                if isinstance(v, list) and v[0] == nid:
                    other["inputs"][name] = list(src)
    return p


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    p = copy.deepcopy(prompt)
    for nid in nodes_of(p, class_type):
        p[nid]["inputs"].update(values)
    return p


def shrink(prompt: dict, size: int, steps: int, seed: int) -> dict:
    """CPU-sized: `size`×`size` image, `steps` steps, fixed seed, outputs under a QSilk prefix."""
    p = set_inputs(prompt, "EmptyLatentImage", width=size, height=size, batch_size=1)
    p = set_inputs(p, "KSampler", steps=steps, seed=seed)
    return p


# --------------------------------------------------------------------------------------------
# PNG pixels (8-bit RGB/RGBA/grey, non-interlaced, as ComfyUI's SaveImage writes), no Pillow needed
# --------------------------------------------------------------------------------------------

def png_pixels(data: bytes):
    """(width, height, channels, bytes of the unfiltered pixel rows)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = ihdr
    chans = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or chans is None or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = w * chans
    out = bytearray()
    prev = bytearray(stride)
    i = 0
    for _ in range(h):
        f = raw[i]
        line = bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - chans] if x >= chans else 0
            b = prev[x]
            c = prev[x - chans] if x >= chans else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + ((a + b) >> 1)) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pr) & 255
        out += line
        prev = line
    return w, h, chans, bytes(out)


def mean_abs_diff(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class PromptRefused(Exception):
    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {json.dumps(body)[:600]}")
        self.status, self.body = status, body


class Comfy:
    def __init__(self, comfyui: Path, python: str, base: Path, log_path: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log_offset = 0
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--disable-auto-launch", "--cache-none",
               "--preview-method", "none"]
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(comfyui), stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_ready(self, timeout: float):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode} while starting")
            try:
                self.get_json("/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s")

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self.log_file.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def new_log(self) -> str:
        """Log text since the previous call."""
        text = self.log_text()
        new, self.log_offset = text[self.log_offset:], len(text)
        return new

    def get_json(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.load(r)

    def get_bytes(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def queue(self, prompt: dict) -> str:
        req = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.load(r)["prompt_id"]
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read())
            except ValueError:
                body = {}
            raise PromptRefused(e.code, body) from None

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue `prompt`, wait for its history entry; returns it. Raises on error or time-out."""
        self.new_log()
        pid = self.queue(prompt)
        end = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.proc.returncode}")
            hist = self.get_json(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") != "success":
                    msgs = [m for m in status.get("messages", []) if m and m[0] == "execution_error"]
                    raise RuntimeError(f"prompt failed: {json.dumps(msgs)[:1500]}")
                entry["log"] = self.new_log()
                return entry
            if time.time() > end:
                try:
                    data = json.dumps({"delete": [pid]}).encode()
                    urllib.request.urlopen(urllib.request.Request(self.url + "/queue", data=data), timeout=10)
                    urllib.request.urlopen(urllib.request.Request(self.url + "/interrupt", data=b"{}"), timeout=10)
                except OSError:
                    pass
                raise TimeoutError(f"prompt did not finish within {timeout:.0f} s")
            time.sleep(0.5)

    def image(self, entry: dict, node_id: str):
        """Pixels of the first image `node_id` saved in a history entry."""
        img = entry["outputs"][node_id]["images"][0]
        q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                    "type": img.get("type", "output")})
        return png_pixels(self.get_bytes("/view?" + q))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summaries(log: str) -> list[str]:
    return [m.group(0).strip() for m in SUMMARY_RE.finditer(log)]


def summary_count(summary: str, what: str):
    """The number before `what` in a summary line ("3 evaluation(s)", "3 attention map(s)", …); None
    when the line does not have it."""
    m = re.search(r"(\d+) " + re.escape(what), summary)
    return int(m.group(1)) if m else None


def sampler_summaries(log: str) -> list[str]:
    """Summary lines of sampler runs (QSilk (model)); QSilk before decode logs 0 evaluations."""
    return [s for s in summaries(log) if (summary_count(s, "evaluation(s)") or 0) > 0]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

class Results:
    def __init__(self):
        self.passed = self.failed = 0
        self.failures = []

    def check(self, name: str, fn):
        t0 = time.time()
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 — every failure is reported, the run goes on
            self.failed += 1
            self.failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e} ({time.time() - t0:.0f} s)", flush=True)
            return False
        self.passed += 1
        print(f"PASS {name}{': ' + detail if detail else ''} ({time.time() - t0:.0f} s)", flush=True)
        return True


def ensure(cond, msg):
    if not cond:
        raise AssertionError(msg)


def make_checkpoint(args) -> Path:
    if args.checkpoint:
        ckpt = Path(args.checkpoint).resolve()
        ensure(ckpt.is_file(), f"--checkpoint {ckpt} does not exist")
        return ckpt
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / "qsilk_e2e_sd15_random.safetensors"
    if not ckpt.is_file():
        print(f"writing a random-weight SD1.5 checkpoint to {ckpt} (once; about 2 GB)", flush=True)
        subprocess.run([args.checkpoint_python, str(HERE / "make_checkpoint.py"), str(ckpt)], check=True)
    return ckpt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="QSilk ⇄ ComfyUI end-to-end check (headless, CPU)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"),
                    help="ComfyUI checkout (default: $COMFYUI_DIR)")
    ap.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                    help="Python with ComfyUI's requirements (default: $COMFYUI_PYTHON or this Python)")
    ap.add_argument("--checkpoint", help="an SD1.5 .safetensors to use instead of the random one")
    ap.add_argument("--checkpoint-python", default=sys.executable,
                    help="the Python (with diffusers and transformers) that writes the random checkpoint")
    ap.add_argument("--cache-dir", default=os.environ.get("QSILK_E2E_CACHE", str(Path.home() / ".cache" / "qsilk-e2e")),
                    help="where the random checkpoint is kept (default: $QSILK_E2E_CACHE or ~/.cache/qsilk-e2e)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary base directory (log, outputs)")
    ap.add_argument("--port", type=int, default=0, help="loopback port for ComfyUI (default: a free one)")
    ap.add_argument("--all-samplers", action="store_true",
                    help="also run QSilk (model) with Paper (literal) on every sampler KSampler lists (minutes)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--steps", type=int, default=3, help="sampling steps per pass (default 3)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prompt-timeout", type=float, default=900, help="seconds per prompt (default 900)")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds for ComfyUI to start (default 300)")
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui (or $COMFYUI_DIR) is required")
    args.comfyui = Path(args.comfyui).resolve()
    if not (args.comfyui / "main.py").is_file():
        ap.error(f"{args.comfyui} is not a ComfyUI checkout (no main.py)")

    t_start = time.time()
    res = Results()
    base = Path(tempfile.mkdtemp(prefix="qsilk-comfy-e2e-"))
    server = None
    try:
        ckpt = make_checkpoint(args)
        for d in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "qsilk").symlink_to(REPO, target_is_directory=True)
        (base / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt)
        port = args.port or free_port()
        print(f"ComfyUI {args.comfyui} on 127.0.0.1:{port}, base directory {base}", flush=True)
        server = Comfy(args.comfyui, args.python, base, base / "comfyui.log", port)
        t0 = time.time()
        server.wait_ready(args.start_timeout)
        print(f"ComfyUI ready in {time.time() - t0:.0f} s", flush=True)
        run_checks(server, res, args, ckpt.name)
    except Exception as e:  # noqa: BLE001
        res.failed += 1
        res.failures.append("setup")
        print(f"FAIL setup: {type(e).__name__}: {e}", flush=True)
    finally:
        if server is not None:
            server.stop()
            if res.failed:
                tail = server.log_text().splitlines()[-60:]
                print("---- ComfyUI log (last 60 lines) ----")
                print("\n".join(tail))
                print("---- end of log ----")
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"total {time.time() - t_start:.0f} s")
    print(f"{res.passed} passed, {res.failed} failed")
    return 1 if res.failed else 0


def run_checks(server: Comfy, res: Results, args, ckpt_name: str):
    info = server.get_json("/object_info", timeout=120)
    state = {}

    def qsilk_nodes_registered():
        missing = [n for n in QSILK_NODES if n not in info]
        ensure(not missing, f"not in /object_info: {missing}")
        for n in QSILK_NODES:
            req = info[n]["input"]["required"]
            ensure("enabled" in req and _spec_type(req["enabled"]) == "BOOLEAN", f"{n}: no BOOLEAN 'enabled'")
            for name, spec in {**req, **info[n]["input"].get("optional", {})}.items():
                if _spec_type(spec) in WIDGET_TYPES:
                    ensure(_spec_opts(spec).get("tooltip"), f"{n}.{name}: no tooltip")
        m, lat = info["QSilkModel"], info["QSilkLatent"]
        ensure("model" in m["input"]["required"] and m["output"] == ["MODEL"], "QSilkModel: model → MODEL")
        ensure("samples" in lat["input"]["required"] and lat["output"] == ["LATENT"], "QSilkLatent: samples → LATENT")
        ensure(info["QSilkModelAdvanced"]["output"] == ["MODEL"], "QSilkModelAdvanced → MODEL")
        categories = {n: info[n].get("category") for n in QSILK_NODES}
        ensure(categories == {"QSilkModel": "model_patches/unet", "QSilkModelAdvanced": "model_patches/unet",
                              "QSilkLatent": "latent"}, f"categories {categories}")
        for n in ("QSilkModel", "QSilkLatent"):
            spec = m["input"]["required"]["preset"] if n == "QSilkModel" else lat["input"]["required"]["preset"]
            choices = spec[0] if isinstance(spec[0], list) else _spec_opts(spec).get("options", [])
            ensure(tuple(choices) == PRESETS, f"{n}.preset choices {choices}")
        adv = info["QSilkModelAdvanced"]
        names = [*adv["input_order"].get("required", []), *adv["input_order"].get("optional", [])]
        shown = ", ".join("%s (%s)" % (n, info[n].get("display_name")) for n in QSILK_NODES)
        return f"{shown}; Advanced has {len(names)} inputs; categories {categories}"


    if not res.check("a. the three QSilk nodes are in /object_info, with tooltips", qsilk_nodes_registered):
        return

    def examples_convert():
        templates = server.get_json("/workflow_templates")
        ensure(sorted(templates.get("qsilk", [])) == ["qsilk_hires", "qsilk_txt2img"],
               f"/workflow_templates lists {templates.get('qsilk')}")
        for name in ("qsilk_txt2img", "qsilk_hires"):
            served = json.loads(server.get_bytes(f"/api/workflow_templates/qsilk/{name}.json"))
            ensure(served == json.loads((EXAMPLES / f"{name}.json").read_text()), f"{name}: served copy differs")
            api = ui_to_api(served, info)
            for node in api.values():
                if node["class_type"] == "CheckpointLoaderSimple":
                    node["inputs"]["ckpt_name"] = ckpt_name
            state[name] = api
        kinds = {n: sorted({v["class_type"] for v in state[n].values()}) for n in state}
        ensure({"QSilkModel", "QSilkLatent", "KSampler", "SaveImage"} <= set(kinds["qsilk_txt2img"]), kinds)
        ensure(len(nodes_of(state["qsilk_hires"], "KSampler")) == 2
               and len(nodes_of(state["qsilk_hires"], "QSilkLatent")) == 2
               and nodes_of(state["qsilk_hires"], "LatentUpscaleBy"), kinds["qsilk_hires"])
        return "served by /workflow_templates; UI format converts with /object_info's input order"

    if not res.check("example workflows: listed as templates, convert to API format", examples_convert):
        return

    txt = shrink(state["qsilk_txt2img"], args.size, args.steps, args.seed)
    save = nodes_of(txt, "SaveImage")[0]
    plain = bypass(txt, QSILK_NODES)

    def pixels(prompt, prefix):
        prompt = set_inputs(prompt, "SaveImage", filename_prefix=f"qsilk_e2e/{prefix}")
        entry = server.run(prompt, args.prompt_timeout)
        w, h, c, px = server.image(entry, save)
        ensure((w, h) == (args.size, args.size), f"{prefix}: image is {w}×{h}")
        return px, entry

    def plain_deterministic():
        a, _ = pixels(plain, "plain_a")
        b, _ = pixels(plain, "plain_b")
        ensure(a == b, f"two runs differ (mean |Δ| {mean_abs_diff(a, b):.3f})")
        ensure(len(set(a)) > 8, f"the image is (nearly) uniform: {len(set(a))} distinct values")
        state["plain"] = a
        return f"{len(set(a))} distinct byte values"

    res.check("b0. plain workflow (QSilk nodes removed) is deterministic (run twice, --cache-none)", plain_deterministic)

    def identical_to_plain(prompt, prefix):
        def check():
            ensure("plain" in state, "no plain image to compare with")
            px, entry = pixels(prompt, prefix)
            ensure(px == state["plain"], f"differs from plain (mean |Δ| {mean_abs_diff(px, state['plain']):.3f})")
            ensure(not summaries(entry["log"]), f"QSilk still ran: {summaries(entry['log'])}")
            return "bit-identical pixels, no QSilk summary in the log (the input passed through)"
        return check

    res.check("b1. preset Off (both nodes) → bit-identical to the plain workflow",
              identical_to_plain(set_inputs(set_inputs(txt, "QSilkModel", preset="Off"), "QSilkLatent", preset="Off"),
                                 "off"))
    res.check("b2. enabled=false (preset Balanced) → bit-identical to the plain workflow",
              identical_to_plain(set_inputs(set_inputs(txt, "QSilkModel", enabled=False, preset="Balanced"),
                                            "QSilkLatent", enabled=False, preset="Balanced"), "disabled"))

    def balanced():
        ensure("plain" in state, "no plain image to compare with")
        p = set_inputs(set_inputs(txt, "QSilkModel", enabled=True, preset="Balanced"),
                       "QSilkLatent", enabled=True, preset="Balanced")
        px, entry = pixels(p, "balanced")
        state["balanced_log"] = entry["log"]
        ensure(px != state["plain"], "Balanced gave the same pixels as the plain workflow")
        return f"mean |Δ| {mean_abs_diff(px, state['plain']):.3f} of 255"

    res.check("c. preset Balanced → the image differs", balanced)

    def balanced_summaries():
        ensure("balanced_log" in state, "no Balanced run")
        lines = sampler_summaries(state["balanced_log"])
        ensure(lines, "no 'QSilk (comfyui): … evaluation(s) …' summary line in the server log: "
                      f"{summaries(state['balanced_log'])}")
        return lines

    def no_lite():
        lines = balanced_summaries()
        lite = [s for s in lines if summary_count(s, "Lite fallback") != 0 or "attention map unavailable" in s]
        ensure(not lite, f"Lite fallback (or no fallback count) on SD1.5: {lite}")
        return " | ".join(lines)

    def maps():
        lines = balanced_summaries()
        counts = [summary_count(s, "attention map") for s in lines]
        ensure(all(c is not None for c in counts), f"the summary line gives no attention-map count: {lines}")
        ensure(all(c > 0 for c in counts), f"no attention maps: {lines}")
        return f"attention maps per sampler run: {counts}"

    res.check("d1. Balanced on SD1.5: the sampler run's QSilk summary reports 0 Lite fallbacks", no_lite)
    res.check("d2. the attention probe made maps (attention map(s) > 0 in the summary)", maps)

    def hires():
        p = shrink(state["qsilk_hires"], args.size, args.steps, args.seed)
        p = set_inputs(p, "SaveImage", filename_prefix="qsilk_e2e/hires")
        entry = server.run(p, args.prompt_timeout)
        out = nodes_of(p, "SaveImage")[0]
        w, h, _, px = server.image(entry, out)
        ensure(w > args.size and h > args.size, f"second pass image is {w}×{h}")
        lines = sampler_summaries(entry["log"])
        ensure(len(lines) == 2, f"expected a QSilk summary per sampler pass, got {summaries(entry['log'])}")
        return f"{w}×{h}; " + " | ".join(summaries(entry["log"]))

    res.check("e. two-pass hires workflow (KSampler → QSilkLatent → LatentUpscaleBy → KSampler → QSilkLatent) runs",
              hires)

    def refused(prompt, node_id, field, words=None):
        def check():
            try:
                server.queue(prompt)
            except PromptRefused as e:
                ensure(e.status == 400, f"HTTP {e.status}")
                errs = e.body.get("node_errors", {})
                ensure(node_id in errs, f"node_errors does not name node {node_id}: {json.dumps(e.body)[:400]}")
                text = json.dumps(errs[node_id])
                ensure(field in text, f"node_errors[{node_id}] does not name {field!r}: {text[:400]}")
                if words is not None:
                    ensure(words in text, f"node_errors[{node_id}] does not say {words!r}: {text[:400]}")
                first = errs[node_id]["errors"][0]
                return f"HTTP 400: {first.get('message')}: {first.get('details')}"
            raise AssertionError("the prompt was accepted")
        return check

    qid = nodes_of(txt, "QSilkModel")[0]
    res.check("f1. preset 'Nope' is refused by ComfyUI's validation",
              refused(set_inputs(txt, "QSilkModel", preset="Nope"), qid, "preset"))
    adv = advanced_prompt(txt, info, qid, tile=3)
    res.check("f2. QSilkModelAdvanced tile=3 (below its minimum) is refused",
              refused(adv, qid, "tile"))
    # queue-time refusals by QSilkModelAdvanced.VALIDATE_INPUTS: HTTP 400, the message naming the field
    for tag, override, field, words in (
            ("f3", {"p_wide": float("nan")}, "p_wide", "QSilk: p_wide must be"),  # JSON NaN
            ("f4", {"sigma_floor": "nan"}, "sigma_floor", "QSilk: sigma_floor must be"),  # the string "nan"
            ("f5", {"p_wide": 0.05, "p_narrow": 0.01}, "p_wide", "QSilk: p_wide must be at most p_narrow"),
            ("f6", {"step_start": 0.8, "step_end": 0.2}, "step_start", "QSilk: step_start must be at most step_end")):
        res.check(f"{tag}. QSilkModelAdvanced {override} is refused at queue time, naming {field}",
                  refused(advanced_prompt(txt, info, qid, **override), qid, field, words))

    def linked_value_fails_cleanly():
        """A value fed by a link is unknown at queue time: the node refuses it when it runs, with a
        plain ValueError (not the package-qualified SettingsError) carrying the message."""
        ensure("PrimitiveFloat" in info, "no PrimitiveFloat node in this ComfyUI")
        p = advanced_prompt(txt, info, qid, p_narrow=0.01)
        p["901"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 0.05}}
        p[qid]["inputs"]["p_wide"] = ["901", 0]
        try:
            server.run(set_inputs(p, "SaveImage", filename_prefix="qsilk_e2e/linked"), args.prompt_timeout)
        except RuntimeError as e:
            text = str(e)
            ensure('"exception_type": "ValueError"' in text, f"not a plain ValueError: {text[:600]}")
            ensure("QSilk: p_wide must be at most p_narrow" in text, f"message: {text[:600]}")
            m = re.search(r'"exception_message": "([^"]*)"', text)
            return f"queued, then ValueError: {m.group(1) if m else text[:200]}"
        raise AssertionError("the prompt ran")

    res.check("f7. a linked p_wide above p_narrow fails when the node runs, as a plain ValueError",
              linked_value_fails_cleanly)

    def after_other_patch(node, size):
        def check():
            ensure(node in info, f"{node} is not in this ComfyUI")
            p = set_inputs(set_inputs(txt, "QSilkModel", enabled=True, preset="Balanced"),
                           "QSilkLatent", enabled=True, preset="Balanced")
            p = set_inputs(p, "EmptyLatentImage", width=size, height=size)
            defaults = {k: _spec_opts(v).get("default") for k, v in info[node]["input"]["required"].items()
                        if _spec_type(v) in WIDGET_TYPES}
            p["900"] = {"class_type": node, "inputs": {"model": p[qid]["inputs"]["model"], **defaults}}
            p[qid]["inputs"]["model"] = ["900", 0]
            entry = server.run(set_inputs(p, "SaveImage", filename_prefix=f"qsilk_e2e/after_{node}"),
                               args.prompt_timeout)
            w, h, _, px = server.image(entry, save)
            ensure((w, h) == (size, size) and len(set(px)) > 8, f"{w}×{h} image, {len(set(px))} distinct values")
            ensure(sampler_summaries(entry["log"]), f"no QSilk sampler summary: {summaries(entry['log'])}")
            return f"{size}×{size}, {node} {defaults} → QSilk (model): " + " | ".join(sampler_summaries(entry["log"]))
        return check

    res.check("g1. QSilk (model) after PerturbedAttentionGuidance runs",
              after_other_patch("PerturbedAttentionGuidance", args.size))
    # SAG needs a middle-block attention map of more than one token: an 8×8 latent (64 px) makes it
    # fail in ComfyUI's own create_blur_map (total 1 → no divisor), with or without QSilk.
    res.check("g2. QSilk (model) after SelfAttentionGuidance runs (128×128: SAG fails below)",
              after_other_patch("SelfAttentionGuidance", max(args.size, 128)))

    def advanced_runs():
        p = advanced_prompt(txt, info, qid)
        px, entry = pixels(p, "advanced")
        ensure(summaries(entry["log"]), "no QSilk summary in the log")
        return "defaults: " + "; ".join(summaries(entry["log"]))

    res.check("h. QSilk (model, advanced) with its default widgets runs", advanced_runs)

    def uni_pc(sampler):
        """uni_pc sets the run's last σ to 0.001 in place: QSilk (model) with Paper (literal) (only a
        before-decode stage) must still stabilise the run's output and log no leftover-noise note."""
        def check():
            base = set_inputs(bypass(txt, ("QSilkLatent",)), "KSampler", sampler_name=sampler)
            ref, _ = pixels(bypass(base, QSILK_NODES), f"{sampler}_plain")
            px, entry = pixels(set_inputs(base, "QSilkModel", enabled=True, preset="Paper (literal)"),
                               f"{sampler}_paper")
            ensure(px != ref, "Paper (literal) gave the same pixels as no QSilk")
            ensure("leftover noise" not in entry["log"], "a leftover-noise note was logged")
            lines = summaries(entry["log"])
            ensure(lines and all(summary_count(s, "pre-decode(s)") == 1 for s in lines),
                   f"expected one pre-decode in the summary: {lines}")
            return f"mean |Δ| {mean_abs_diff(px, ref):.3f} of 255; " + " | ".join(lines)
        return check

    res.check("i1. uni_pc + Paper (literal): stabilised before decode, no leftover-noise note", uni_pc("uni_pc"))
    res.check("i2. uni_pc_bh2 + Paper (literal): stabilised before decode, no leftover-noise note",
              uni_pc("uni_pc_bh2"))

    def every_sampler():
        """Each sampler of KSampler's list ends its run at σ = 0 (0.001 for uni_pc): one pre-decode in
        its summary line and no leftover-noise note."""
        names = _spec_opts(info["KSampler"]["input"]["required"]["sampler_name"]).get("options") \
            or info["KSampler"]["input"]["required"]["sampler_name"][0]
        base = set_inputs(bypass(txt, ("QSilkLatent",)), "QSilkModel", enabled=True, preset="Paper (literal)")
        bad, times = [], []
        for name in names:
            t0 = time.time()
            try:
                _, entry = pixels(set_inputs(base, "KSampler", sampler_name=name), f"all_{name}")
            except Exception as e:  # noqa: BLE001 — reported with the sampler's name
                bad.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
                continue
            times.append(time.time() - t0)
            lines = summaries(entry["log"])
            if "leftover noise" in entry["log"] or not lines or any(summary_count(x, "pre-decode(s)") != 1
                                                                    for x in lines):
                bad.append(f"{name}: {lines}")
        ensure(not bad, f"{len(bad)} of {len(names)}: " + " | ".join(bad))
        return f"{len(names)} samplers, one pre-decode each, no leftover-noise note ({sum(times):.0f} s)"

    if args.all_samplers:
        res.check("j. every sampler KSampler lists, with Paper (literal): one pre-decode, no leftover-noise note",
                  every_sampler)


def advanced_prompt(prompt: dict, info: dict, node_id: str, **override) -> dict:
    """`prompt` with node `node_id` replaced by a QSilkModelAdvanced with default widget values."""
    p = copy.deepcopy(prompt)
    adv = info["QSilkModelAdvanced"]
    inputs = {"model": p[node_id]["inputs"]["model"]}
    for section in ("required", "optional"):
        for name, spec in adv["input"].get(section, {}).items():
            t = _spec_type(spec)
            if t not in WIDGET_TYPES:
                continue
            opts = _spec_opts(spec)
            if "default" in opts:
                inputs[name] = opts["default"]
            elif t == "COMBO":
                inputs[name] = (spec[0] if isinstance(spec[0], list) else opts.get("options"))[0]
            else:
                inputs[name] = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[t]
    inputs.update(override)
    p[node_id] = {"class_type": "QSilkModelAdvanced", "inputs": inputs}
    return p


if __name__ == "__main__":
    sys.exit(main())
