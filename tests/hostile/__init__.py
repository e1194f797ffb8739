"""Hostile inputs for the bad-input corpus (tests/test_safety.py), generated in a temporary folder.

Each generator ``make(tmp, base)`` writes one bad input under ``tmp`` and returns ``(path,
needle)``: what to pass on the command line and a piece of text the one error line must
contain (the culprit: the file, or the key). Generators are grouped by the kind of input
slot a command has (:data:`SLOTS`); ``base`` is a valid input of that kind to tamper with
(a checkpoint, a COCO file), or None.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

LATIN1 = "description: caf\xe9 cr\xe8me\n".encode("latin-1")


def _w(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _deep_yaml(n: int = 3000) -> str:
    return "a: " + "[" * n + "]" * n + "\n"


def _deep_json(n: int = 100000) -> str:
    return "[" * n + "]" * n


# ----------------------------------------------------------------------------- recipes
def _recipe(text: str | bytes, name: str = "r.yaml"):
    return lambda tmp, base: (_w(tmp / name, text), None)


RECIPES = {
    "latin-1 text": _recipe(LATIN1),
    "utf-16 text": _recipe("train:\n  epochs: 2\n".encode("utf-16")),
    "binary garbage": _recipe(bytes(range(256)) * 4),
    # a closing tag has a slash: in a path it spans a folder ("r[bold]x[" / "].yaml")
    "markup in the file name": lambda tmp, base: (_w(tmp / "r[bold]x[/].yaml", "train:\n  lrr: 1\n"), "r[bold]x[/].yaml"),
    "markup closing tag in the name": lambda tmp, base: (_w(tmp / "[/]r.yaml", "train: {epochs: ten}\n"), "[/]r.yaml"),
    "markup opening tag in the name": _recipe("train: {epochs: ten}\n", "[bold red]r.yaml"),
    "markup in a key": lambda tmp, base: (_w(tmp / "r.yaml", "train:\n  '[red]lr': 1\n"), "[red]lr"),
    "markup in a value": lambda tmp, base: (_w(tmp / "r.yaml", "model:\n  student:\n    head: '[/]gfl'\n"), "[/]gfl"),
    "lr .inf": lambda tmp, base: (_w(tmp / "r.yaml", "train:\n  lr: .inf\n"), "train.lr"),
    "weight decay .nan": lambda tmp, base: (_w(tmp / "r.yaml", "train:\n  weight_decay: .nan\n"), "train.weight_decay"),
    "lr 1e999": lambda tmp, base: (_w(tmp / "r.yaml", "train:\n  lr: 1.0e+999\n"), "train.lr"),
    "negative kd weight": lambda tmp, base: (_w(tmp / "r.yaml", "distill:\n  losses:\n    - {type: ssim, weight: -.inf}\n"),
                                             "distill.losses.0.weight"),
    "deep list nesting": _recipe(_deep_yaml()),
    "deep mapping nesting": _recipe("a: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"),
    "unclosed bracket": _recipe("data:\n  format: [shapes\ntrain: {}\n"),
    "tab indentation": _recipe("train:\n\tepochs: 2\n"),
    "a list, not a mapping": _recipe("- train\n- data\n"),
    "python tag": _recipe("description: !!python/object/apply:os.system ['echo pwned']\n"),
    "truncated mid-key": _recipe("train:\n  epochs: 2\n  milestones: [8, 1"),
    "extends itself": _recipe("extends: r.yaml\n"),
    "extends a missing file": lambda tmp, base: (_w(tmp / "r.yaml", "extends: nowhere/base.yaml\n"), "nowhere/base.yaml"),
    "newline in the file name": _recipe("train:\n  lrr: 1\n", "r\nx.yaml"),
    "a folder named .yaml": lambda tmp, base: ((tmp / "dir.yaml").mkdir() or tmp / "dir.yaml", None),
}

# ----------------------------------------------------------------------------- checkpoints


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _retag(base: Path, dest: Path, **meta) -> Path:
    """``base`` with its safetensors metadata changed (tensors untouched)."""
    head, body = _header(base)
    head["__metadata__"] = {**head.get("__metadata__", {}), **meta}
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    return _w(dest, struct.pack("<Q", len(blob)) + blob + body)


def _ckpt(fn):
    return lambda tmp, base: (fn(tmp, base), None)


CHECKPOINTS = {
    "garbage bytes": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", b"\x00\x01garbage" * 100)),
    "empty file": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", b"")),
    "truncated to half": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", base.read_bytes()[: base.stat().st_size // 2])),
    "header length past the end": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", b"\xff" * 8 + b"{}")),
    "header not JSON": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", struct.pack("<Q", 9) + b"{bad json")),
    "a pickle in disguise": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")),
    "no kdctl metadata": _ckpt(lambda tmp, base: _w(tmp / "c.safetensors", struct.pack("<Q", 8) + b"{}      ")),
    "stored recipe not YAML": _ckpt(lambda tmp, base: _retag(base, tmp / "c.safetensors", recipe="model: [unclosed")),
    "stored recipe deeply nested": _ckpt(lambda tmp, base: _retag(base, tmp / "c.safetensors", recipe=_deep_yaml())),
    "stored recipe a list": _ckpt(lambda tmp, base: _retag(base, tmp / "c.safetensors", recipe="- a\n- b\n")),
    "stored recipe with lr .inf": _ckpt(lambda tmp, base: _retag(base, tmp / "c.safetensors", recipe="train: {lr: .inf}\n")),
    "num_classes not a number": _ckpt(lambda tmp, base: _retag(base, tmp / "c.safetensors", num_classes="[red]ten")),
    "another architecture": _ckpt(lambda tmp, base: _retag(
        base, tmp / "c.safetensors", recipe="model: {student: {backbone: test_resnet, fpn_channels: 64, feat_channels: 32}}\n")),
    "markup in the file name": lambda tmp, base: (_w(tmp / "[bold]c[/].safetensors", b"junk"), "[bold]c[/].safetensors"),
    "unbalanced closing tag in the name": lambda tmp, base: (_w(tmp / "c[/].safetensors", b"junk"), "c[/].safetensors"),
    "missing file": _ckpt(lambda tmp, base: tmp / "gone" / "c.safetensors"),
    "folder without last": _ckpt(lambda tmp, base: (tmp / "run").mkdir() or tmp / "run"),
}

# ----------------------------------------------------------------------------- datasets (DATA)


def _coco(tmp: Path, name: str = "d.json", **change) -> Path:
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    data.update(change)
    return _w(tmp / name, json.dumps(data))


def _yolo(tmp: Path, yaml_text: str | bytes = "path: .\ntrain: images\nnames: [a]\n", label: bytes | None = None) -> Path:
    from PIL import Image

    (tmp / "y" / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(tmp / "y" / "images" / "a.png")
    if label is not None:
        _w(tmp / "y" / "labels" / "a.txt", label)
    return _w(tmp / "y" / "data.yaml", yaml_text)


def _voc(tmp: Path, filename: str = "a.jpg", split: bytes | None = None, xml: str | None = None) -> Path:
    from PIL import Image

    root = tmp / "voc"
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(root / "images" / "a.jpg")
    xml = xml or (f"<annotation><filename>{filename}</filename><size><width>16</width><height>16</height></size>"
                  "<object><name>x</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
                  "</object></annotation>")
    _w(root / "annotations" / "a.xml", xml)
    if split is not None:
        _w(root / "splits" / "val.txt", split)
    return root


def _truncated_jpeg(tmp: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp / "a.jpg", quality=90)
    data = (tmp / "a.jpg").read_bytes()
    (tmp / "a.jpg").write_bytes(data[:40])
    return _coco(tmp)


# nine levels of ten: a billion "a"s if an XML parser expanded them
_BOMB = ('<!DOCTYPE a [<!ENTITY a "aaaaaaaaaa">'
         + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)) + "]>")


def _coco_missing_image(tmp: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp / "b.png")
    return _coco(tmp, images=[{"id": 1, "file_name": "[red]gone[/].jpg", "width": 8, "height": 8},
                              {"id": 2, "file_name": "b.png", "width": 16, "height": 16}])


def _yolo_list(tmp: Path) -> Path:
    data_yaml = _yolo(tmp, "path: .\ntrain: list.txt\nnames: [a]\n")
    _w(tmp / "y" / "list.txt", "images/caf\xe9.png\n".encode("latin-1"))
    return data_yaml


DATASETS = {
    "COCO latin-1": lambda tmp, base: (_w(tmp / "d.json", '{"images": [], "x": "caf\xe9"}'.encode("latin-1")), None),
    "COCO truncated": lambda tmp, base: (_w(tmp / "d.json", _coco(tmp).read_bytes()[:50]), None),
    "COCO deeply nested": lambda tmp, base: (_w(tmp / "d.json", _deep_json()), None),
    "COCO a list": lambda tmp, base: (_w(tmp / "d.json", "[1, 2, 3]"), None),
    "COCO bbox NaN": lambda tmp, base: (_coco(tmp, annotations=[{"id": 1, "image_id": 1, "category_id": 1,
                                                                 "bbox": "NaN", "iscrowd": 0}]), None),
    "COCO missing image with markup name": lambda tmp, base: (_coco_missing_image(tmp), "[red]gone[/].jpg"),
    "COCO truncated JPEG": lambda tmp, base: (_truncated_jpeg(tmp), "a.jpg"),
    "COCO markup in the file name": lambda tmp, base: (_w(tmp / "[bold]d[/].json", "{"), "[bold]d[/].json"),
    "YOLO data.yaml latin-1": lambda tmp, base: (_yolo(tmp, "names: [caf\xe9]\ntrain: images\n".encode("latin-1")), None),
    "YOLO data.yaml deeply nested": lambda tmp, base: (_yolo(tmp, _deep_yaml()), None),
    "YOLO data.yaml without names": lambda tmp, base: (_yolo(tmp, "train: images\n"), None),
    "YOLO label latin-1": lambda tmp, base: (_yolo(tmp, label="0 0.5 0.5 0.2 0.2 caf\xe9\n".encode("latin-1")), "a.txt"),
    "YOLO label bad class": lambda tmp, base: (_yolo(tmp, label=b"7 0.5 0.5 0.2 0.2\n"), "a.txt"),
    "YOLO image list latin-1": lambda tmp, base: (_yolo_list(tmp), "list.txt"),
    "VOC absolute filename": lambda tmp, base: (_voc(tmp, "/etc/passwd"), "a.xml"),
    "VOC filename up and out": lambda tmp, base: (_voc(tmp, "../../secret.jpg"), "a.xml"),
    "VOC malformed XML": lambda tmp, base: (_voc(tmp, xml="<annotation><object>"), "a.xml"),
    "VOC entity expansion bomb": lambda tmp, base: (_voc(tmp, xml=_BOMB + "<annotation><object><name>&i;</name></object></annotation>"),
                                                    "a.xml"),
    "VOC external entity": lambda tmp, base: (_voc(tmp, xml='<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                                            "<annotation><object><name>&x;</name></object></annotation>"), "a.xml"),
    "YOLO path a list": lambda tmp, base: (_yolo(tmp, "path: [1]\ntrain: images\nnames: [a]\n"), "data.yaml"),
    "COCO categories not objects": lambda tmp, base: (_coco(tmp, categories=[1, 2]), "d.json"),
    "COCO image width a string": lambda tmp, base: (
        _coco(tmp, images=[{"id": 1, "file_name": "a.jpg", "width": "abc", "height": 8}]), "d.json"),
    "a folder of nothing": lambda tmp, base: ((tmp / "empty").mkdir() or tmp / "empty", None),
}

# ----------------------------------------------------------------------------- predictions files
PREDICTIONS = {
    "latin-1": lambda tmp, base: (_w(tmp / "p.json", '[{"x": "caf\xe9"}]'.encode("latin-1")), None),
    "truncated": lambda tmp, base: (_w(tmp / "p.json", '[{"image_id": 1, "categ'), None),
    "deeply nested": lambda tmp, base: (_w(tmp / "p.json", _deep_json()), None),
    "an object, not a list": lambda tmp, base: (_w(tmp / "p.json", '{"a": 1}'), None),
    "bbox NaN": lambda tmp, base: (_w(tmp / "p.json", '[{"image_id": 1, "category_id": 1, "bbox": [1, 1, NaN, 2], "score": 1}]'), None),
    "markup in the file name": lambda tmp, base: (_w(tmp / "[red]p[/].json", "nope"), "[red]p[/].json"),
    "corner boxes (the message quotes [x, y, w, h])": lambda tmp, base: (
        _w(tmp / "p.json", '[{"image_id": 1, "category_id": 1, "bbox": [5, 5, -2, 3], "score": 1}]'), "[x1, y1, x2, y2]"),
    "a folder": lambda tmp, base: ((tmp / "p.json").mkdir() or tmp / "p.json", None),
}

# ----------------------------------------------------------------------------- run folders


def _run(tmp: Path, base: Path | None, **files: bytes | str) -> Path:
    run = tmp / "run"
    run.mkdir()
    for name, data in files.items():
        _w(run / name.replace("__", "."), data)
    return run


RUNS = {
    "empty folder": lambda tmp, base: (_run(tmp, base), None),
    "recipe.yaml latin-1": lambda tmp, base: (_run(tmp, base, recipe__yaml=LATIN1), "recipe.yaml"),
    "recipe.yaml a list": lambda tmp, base: (_run(tmp, base, recipe__yaml="- 1\n- 2\n"), "recipe.yaml"),
    "recipe.yaml deeply nested": lambda tmp, base: (_run(tmp, base, recipe__yaml=_deep_yaml()), "recipe.yaml"),
    "recipe.yaml binary": lambda tmp, base: (_run(tmp, base, recipe__yaml=bytes(range(256))), "recipe.yaml"),
    "last.safetensors garbage": lambda tmp, base: (
        _run(tmp, base, recipe__yaml=(base.parent / "recipe.yaml").read_bytes(),
             last__safetensors=b"\x08" + b"\x00" * 7 + b"{bad json"), "last.safetensors"),
    "last.state.pt a pickle": lambda tmp, base: (
        _run(tmp, base, recipe__yaml=(base.parent / "recipe.yaml").read_bytes(), last__safetensors=base.read_bytes(),
             last__state__pt=b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."), "last.state.pt"),
    "markup in the folder name": lambda tmp, base: ((tmp / "[red]run[/").mkdir() or tmp / "[red]run[/", None),
}

# ----------------------------------------------------------------------------- URLs (kdctl fetch)
def _url(text: str):
    return lambda tmp, base: (text, text.split("/")[2] if text.count("/") >= 2 and text.split("/")[2] else text)


URLS = {
    "bracket without IPv6": _url("https://[bad/x.pth"),
    "space in the host": _url("http://exa mple.com/x.pth"),
    "port out of range": _url("https://example.com:99999/x.pth"),
    "no host": lambda tmp, base: ("https://", "https://"),
    "escape sequence": lambda tmp, base: ("http://host\x1b[31m/x.pth", "\\x1b[31m"),
}

# ----------------------------------------------------------------------------- model files (eval / predict MODEL.onnx)
def _plain_onnx(tmp: Path) -> Path:
    """A valid ONNX graph (Identity) that kdctl did not write: no kdctl metadata."""
    from onnx import TensorProto, helper, save

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 64, 64]) for n in ("x", "y")]
    save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])),
         str(tmp / "m.onnx"))
    return tmp / "m.onnx"


MODEL_FILES = {
    "garbage bytes": lambda tmp, base: (_w(tmp / "m.onnx", b"\x00\x01garbage" * 100), None),
    "empty file": lambda tmp, base: (_w(tmp / "m.onnx", b""), None),
    "a pickle in disguise": lambda tmp, base: (_w(tmp / "m.onnx", b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."), None),
    "an ONNX file kdctl did not write": lambda tmp, base: (_plain_onnx(tmp), None),
    "markup in the file name": lambda tmp, base: (_w(tmp / "[red]m[/].onnx", b"junk"), "[red]m[/].onnx"),
    "missing file": lambda tmp, base: (tmp / "gone" / "m.onnx", None),
}

SLOTS = {"model": MODEL_FILES, "url": URLS, "recipe": RECIPES, "checkpoint": CHECKPOINTS, "data": DATASETS, "predictions": PREDICTIONS, "run": RUNS}
