"""`kdctl fetch` against a real HTTP server on 127.0.0.1: resumable downloads (HTTP Range),
hash checks, 404, offline, the cache, conversion into a checkpoint that `kdctl eval` and
`kdctl distill --teacher` use, and untrusted pickles that must run no code."""
import hashlib
import io
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from kdctl.cli import app
from kdctl.errors import KdctlError
from kdctl.hub import registry
from kdctl.hub.download import download
from kdctl.hub.fetch import read_untrusted

from conftest import shared
from test_hub_convert import mmdet_checkpoint, tiny_teacher
from helpers import run


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class Server:
    """Files served from memory; ``cuts`` responses send only ``cut_after`` bytes of their body
    and then drop the connection; ``ranges=False`` ignores Range headers (always 200)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cuts, self.cut_after, self.ranges = 0, 0, True
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                owner.requests.append((self.path, rng))
                body = owner.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and owner.ranges:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                data = body[start:]
                if owner.cuts > 0:
                    owner.cuts -= 1
                    self.wfile.write(data[: owner.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "kdctl-home"
    monkeypatch.setenv("KDCTL_HOME", str(path))
    return path


def payload(n=300_000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ============================================================================= downloads
def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    data = payload()
    server.files["/f.pth"] = data
    server.cuts, server.cut_after = 1, 120_000
    dest = tmp_path / "cache" / "f.pth"
    with pytest.raises(KdctlError, match="interrupted at 0.1 MB of 0.3 MB; run the same command again to resume"):
        download(server.url + "/f.pth", dest, sha256=sha(data), retries=0, progress=False)
    part = dest.with_name("f.pth.part")
    assert not dest.exists() and part.stat().st_size == 120_000
    result = download(server.url + "/f.pth", dest, sha256=sha(data), retries=0, progress=False)
    assert server.requests == [("/f.pth", None), ("/f.pth", "bytes=120000-")]
    assert dest.read_bytes() == data and not part.exists()
    assert result["resumed_from"] == 120_000 and result["checked"] == "sha256" and result["sha256"] == sha(data)


def test_dropped_connection_resumes_within_one_call_and_prefix_hash(server, tmp_path):
    data = payload(seed=1)
    server.files["/m-x.pth"] = data
    server.cuts, server.cut_after = 2, 50_000
    result = download(server.url + "/m-x.pth", tmp_path / "m.pth", sha256_prefix=sha(data)[:8], retries=3, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=50000-", "bytes=100000-"]
    assert (tmp_path / "m.pth").read_bytes() == data and result["checked"] == "prefix"


def test_server_without_range_support_restarts_the_file(server, tmp_path):
    data = payload(seed=2)
    server.files["/f.pth"] = data
    server.cuts, server.cut_after, server.ranges = 1, 70_000, False
    download(server.url + "/f.pth", tmp_path / "f.pth", sha256=sha(data), retries=1, progress=False)
    assert [r for _, r in server.requests] == [None, "bytes=70000-"]  # asked, got a 200, started over
    assert (tmp_path / "f.pth").read_bytes() == data


def test_wrong_hash_is_rejected_and_leaves_nothing(server, tmp_path):
    data = payload(seed=3)
    server.files["/f.pth"] = data
    cache = tmp_path / "downloads"
    with pytest.raises(KdctlError, match="SHA-256 mismatch.*the file was deleted"):
        download(server.url + "/f.pth", cache / "f.pth", sha256="0" * 64, progress=False)
    with pytest.raises(KdctlError, match="expected a hash starting 12345678"):
        download(server.url + "/f.pth", cache / "f.pth", sha256_prefix="12345678", progress=False)
    assert list(cache.iterdir()) == []


# ============================================================================= kdctl fetch
def _publish(server, monkeypatch, head="gfl", name=None, variant=None, seed=0):
    """Serve an MMDetection-layout checkpoint of a tiny detector and register it."""
    buf = io.BytesIO()
    torch.save(mmdet_checkpoint(head, seed=seed), buf)
    data = buf.getvalue()
    path = f"/v2.0/{head}/tiny_{head}_20200101-{sha(data)[:8]}.pth"
    server.files[path] = data
    teacher = tiny_teacher(head, variant, name=name, url=server.url + path)
    monkeypatch.setitem(registry.TEACHERS, teacher.name, teacher)
    return teacher, data


def test_fetch_converts_into_a_checkpoint_that_eval_and_distill_use(server, home, monkeypatch, tmp_path):
    teacher, data = _publish(server, monkeypatch)
    server.cuts, server.cut_after = 1, len(data) // 3  # one dropped connection on the way
    result = run("fetch", teacher.name, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    ckpt = home / "teachers" / f"{teacher.name}.safetensors"
    assert info["path"] == str(ckpt) and info["downloaded"] and info["checked"] == "prefix"
    assert info["sha256"] == sha(data) and info["resumed_from"] == 0
    assert server.requests[-1][1] == f"bytes={len(data) // 3}-"
    assert (home / "downloads" / teacher.filename).read_bytes() == data
    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("head.scales.2.scale"), mmdet_checkpoint("gfl")["state_dict"]["bbox_head.scales.2.scale"])
    assert meta["model"] == "teacher" and meta["num_classes"] == "80" and meta["source_sha256"] == sha(data)
    assert meta["classes"].split("\n")[:3] == ["person", "bicycle", "car"]

    again = run("fetch", teacher.name)  # cached: no request
    n = len(server.requests)
    assert again.exit_code == 0 and "cached" in again.output and len(server.requests) == n
    forced = run("fetch", teacher.name, "--force")
    assert forced.exit_code == 0 and "converted" in forced.output and len(server.requests) == n + 1

    # kdctl eval reads it directly (COCO8: 80 COCO classes, YOLO layout)
    coco8 = shared("coco8") / "data.yaml"
    ev = run("eval", ckpt, "--data", coco8, "--json", "-", "--device", "cpu", "--batch-size", "4")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["num_images"] == 4
    # ... and so does kdctl distill --teacher (CrossKD needs the same head: gfl)
    student = ["model.student.head=gfl", "model.student.backbone=test_resnet", "model.student.fpn_channels=32",
               "model.student.feat_channels=32", "model.student.stacked_convs=2"]
    tiny = ["distill.losses.0.reuse_idx=1", "data.short_side=160", "data.max_side=160", "data.batch_size=2", "data.num_workers=0", "train.epochs=1",
            "runtime.threads=1"]
    args = [a for s in (*student, *tiny) for a in ("--set", s)]
    dist = run("distill", "coco8", "--teacher", ckpt, "--method", "crosskd", "--max-steps", "1", "--out", tmp_path / "run",
               "--device", "cpu", "--json", *args)
    assert dist.exit_code == 0, dist.output
    assert json.loads(dist.stdout)["step"] == 1 and "non-finite" not in dist.output


def test_fetch_by_url_and_from_file(server, home, monkeypatch, tmp_path):
    teacher, data = _publish(server, monkeypatch, head="atss")
    # a URL the registry does not list needs --as (the architecture) and --sha256
    server.files["/mirror/other.pth"] = data
    one_line_error(run("fetch", server.url + "/mirror/other.pth"), "--as NAME")
    one_line_error(run("fetch", server.url + "/mirror/other.pth", "--as", teacher.name), "--sha256")
    ok = run("fetch", server.url + "/mirror/other.pth", "--as", teacher.name, "--sha256", sha(data), "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["checked"] == "sha256"
    # offline: a local copy, checked against the registry's hash prefix
    local = tmp_path / "copy.pth"
    local.write_bytes(data)
    res = run("fetch", "--from-file", local, "--as", teacher.name, "--force", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["downloaded"] is False
    other = tmp_path / "finetuned.pth"
    other.write_bytes(io_bytes(mmdet_checkpoint("atss", seed=5)))
    one_line_error(run("fetch", "--from-file", other, "--as", teacher.name, "--force"), "SHA-256 mismatch", f"--sha256 {sha(other.read_bytes())}")
    assert run("fetch", "--from-file", other, "--as", teacher.name, "--force", "--sha256", sha(other.read_bytes())).exit_code == 0
    one_line_error(run("fetch", "--from-file", other), "--as NAME")
    one_line_error(run("fetch", "atss_r50_fpn_1x"), "did you mean 'atss_r50_fpn_1x_coco'")


def io_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_404_and_offline_are_one_clear_line(server, home, monkeypatch):
    teacher, _ = _publish(server, monkeypatch)
    server.files.clear()
    one_line_error(run("fetch", teacher.name), "HTTP 404", "--from-file")
    assert not any(p.is_file() for p in home.rglob("*"))
    with socket.socket() as sock:  # a port with nothing listening: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x/{teacher.filename}"
    monkeypatch.setitem(registry.TEACHERS, teacher.name, tiny_teacher("gfl", name=teacher.name, url=url))
    one_line_error(run("fetch", teacher.name), "cannot reach 127.0.0.1", "offline?", f"kdctl fetch --from-file FILE --as {teacher.name}")


def test_fetch_list_shows_the_registry():
    table = run("fetch", "--list")
    assert table.exit_code == 0
    for needle in ("retinanet_resnet50_fpn_v2", "gfl_r101_fpn_mstrain_2x_coco", "41.5", "44.7", "X-101-32x4d"):
        assert needle in table.output
    rows = json.loads(run("fetch", "--list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["fcos_resnet50_fpn"]["box_ap"] == 39.2 and by_name["fcos_resnet50_fpn"]["sha256_prefix"] == "99b0c9b7"
    assert {r["detector"] for r in rows} == {"gfl", "atss", "retinanet", "fcos"}
    assert "Example" in run("fetch", "--help").output
    one_line_error(run("fetch"), "--list")


# ============================================================================= untrusted pickles
class Evil:
    """Unpickling this calls ``open(path, "w")``: creating the file is the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_runs_no_code(tmp_path, home, monkeypatch, server):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Evil(marker)}, bad)
    with pytest.raises(KdctlError, match="refused to load"):
        read_untrusted(bad)
    teacher, _ = _publish(server, monkeypatch)
    digest = sha(bad.read_bytes())
    one_line_error(run("fetch", "--from-file", bad, "--as", teacher.name, "--sha256", digest), "refused to load", "weights_only")
    server.files["/evil-" + digest[:8] + ".pth"] = bad.read_bytes()
    one_line_error(run("fetch", server.url + "/evil-" + digest[:8] + ".pth", "--as", teacher.name, "--sha256", digest), "refused")
    assert not marker.exists()
    assert not (home / "teachers").exists() or not any((home / "teachers").iterdir())
    # the payload is live: an unrestricted load does run it
    torch.load(bad, weights_only=False)
    assert marker.exists()
    os.remove(marker)
