"""The one place that loads any model file kdctl knows and runs it: :func:`load_model_file`.

Kinds (``ModelFile.kind``):

- ``checkpoint``: a training checkpoint (``RUN/best.safetensors``, or a run directory);
- ``safetensors``: an exported ``.safetensors`` (``kdctl export --format safetensors``);
- ``onnx``: the raw ONNX export (head outputs; onnxruntime, then kdctl's postprocess);
- ``onnx-end-to-end``: the end-to-end ONNX export (NMS inside; :mod:`.end_to_end`);
- ``torchscript``: the TorchScript export (head outputs; then kdctl's postprocess).

Every kind takes the same input: uint8 images ``[B, 3, H, W]`` letterboxed by
:func:`kdctl.data.transforms.letterbox` (keep ratio, fill ``pad_colour(mean)``), with the
image's valid extent ``valid_sizes`` (h', w') and ``scales`` (h'/h, w'/w). The runner
normalises. Exported graphs fix ``H x W`` (``input_size``); PyTorch kinds take any multiple of 32.

One rule for every kind, so that every kind gives the same detections:

1. candidates, NMS and the best ``max_det`` on the whole ``H x W`` input: boxes are clipped to
   ``[0, W] x [0, H]`` before NMS (an end-to-end graph sees no valid extent). For PyTorch, raw
   ONNX and TorchScript that is :func:`kdctl.models.postprocess.postprocess` with
   ``valid_sizes = (H, W)`` and ``scales = 1``; the end-to-end graph computes the same rows;
2. :func:`finalize`, the same final step for all: clip each box to its image's valid extent,
   drop boxes left with zero width or height (they lie in the padding; not for models
   converted from torchvision, whose decoder keeps empty boxes: ``drop_empty``), divide by
   ``scales``.

``kdctl eval`` of a checkpoint clips to the valid extent before NMS instead; for an image that
fills the input (square images in a square input, as the demo) the two are the same.

End-to-end files have their thresholds baked in (metadata ``end_to_end``). ``detect`` honours
a request exactly or refuses it in one line naming the exported value: ``score_thr`` may be
raised (rows at or below it are dropped: exact, because NMS and the ``max_det`` cut are monotone
in the score) except for the ``centerness`` score rule (FCOS/ATSS threshold the class score, not
the final one); ``nms_iou`` must be the exported one; ``max_det`` may be lowered (the first rows).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kdctl.artifact import FORMAT
from kdctl.errors import KdctlError
from kdctl.models.postprocess import Detections, to_original

KINDS = ("checkpoint", "safetensors", "onnx", "onnx-end-to-end", "torchscript")
E2E_KEY = "end_to_end"  # metadata key of an end-to-end ONNX file (JSON, see kdctl.export.end_to_end)


def normalise(images: Tensor, mean, std) -> Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 ``(x - 255 mean) / (255 std)``, the arithmetic of
    :class:`kdctl.data.transforms.ToFloatNormalize` (subtract, then multiply by the inverse)."""
    from kdctl.data.transforms import normalization

    m, inv = (t.to(images.device).view(1, -1, 1, 1) for t in normalization(mean, std))
    return (images.float() - m) * inv


def finalize(boxes: Tensor, batch_index: Tensor, scores: Tensor, labels: Tensor, valid_sizes: Tensor, scales: Tensor,
             drop_empty: bool = True) -> Detections:
    """The final step of every kind: ``boxes`` ``[D, 4]`` xyxy input pixels -> clipped to the
    valid extent ``valid_sizes[batch_index]`` (h', w'), rows left with zero width or height
    dropped (``drop_empty``: the decoder's rule, :attr:`kdctl.models.decoders.BoxDecoder.drop_empty`),
    divided by ``scales[batch_index]`` (y, x) -> original-image pixels."""
    hw = valid_sizes.to(boxes.device, torch.float32)[batch_index]  # [D, 2] (h, w)
    limit = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)
    bx = torch.minimum(boxes.float().clamp(min=0), limit)
    keep = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
    if not drop_empty:
        keep = torch.ones_like(keep)
    s = scales.to(boxes.device, torch.float32)[batch_index[keep]]
    bx = to_original(bx[keep], s)
    return Detections(batch_index=batch_index[keep], boxes=bx, scores=scores[keep].float(), labels=labels[keep])


@dataclass
class ModelFile:
    """A loaded model file; see the module docstring. ``detect`` is the only way to run it."""

    path: Path
    kind: str
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int] | None
    default_input_size: tuple[int, int]
    postprocess: dict  # score_thr, nms_iou, topk_pre_nms, max_per_image (the recipe's eval defaults)
    meta: dict = field(default_factory=dict)
    drop_empty: bool = True  # the decoder's rule for boxes of zero width or height (see finalize)
    recipe: object = None  # the stored kdctl Recipe (eval reads its data section)
    _run: object = None  # uint8 [B, 3, H, W] -> raw per-level outputs (or the end-to-end outputs)
    _detector: object = None  # the Detector whose decoder / priors postprocess the raw outputs
    device: torch.device = torch.device("cpu")

    def _check(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise KdctlError(f"{self.path}: detect takes uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        if self.input_size is not None and hw != tuple(self.input_size):
            H, W = self.input_size
            raise KdctlError(f"{self.path}: was exported for {H}x{W} inputs, got {hw[0]}x{hw[1]}; "
                             f"use --input-size {H} {W} (or re-export with --input-size {hw[0]} {hw[1]})")
        if self.input_size is None and (hw[0] % 32 or hw[1] % 32):
            raise KdctlError(f"--input-size {hw[0]} {hw[1]}: both sides must be multiples of 32 for {self.path}")

    def _settings(self, score_thr, nms_iou, max_det) -> tuple[float, float, int]:
        p = self.postprocess
        score_thr = p["score_thr"] if score_thr is None else float(score_thr)
        nms_iou = p["nms_iou"] if nms_iou is None else float(nms_iou)
        max_det = p["max_per_image"] if max_det is None else int(max_det)
        if self.kind != "onnx-end-to-end":
            return score_thr, nms_iou, max_det
        e = self.meta[E2E_KEY]
        name = self.path.name
        if score_thr < e["score_thr"] - 1e-9:
            raise KdctlError(f"--conf {score_thr:g}: {name} was exported with --conf {e['score_thr']:g} baked in; "
                             f"use --conf {e['score_thr']:g} or higher, or re-export with a lower --conf")
        if score_thr > e["score_thr"] + 1e-9 and e["score_rule"] == "centerness":
            raise KdctlError(f"--conf {score_thr:g}: {name} thresholds the class score before centerness (exported with "
                             f"--conf {e['score_thr']:g}); re-export it with --conf {score_thr:g}")
        if abs(nms_iou - e["nms_iou"]) > 1e-9:
            raise KdctlError(f"--iou {nms_iou:g}: {name} was exported with --iou {e['nms_iou']:g} baked in; "
                             f"leave --iou out or re-export with --iou {nms_iou:g}")
        if max_det > e["max_det"]:
            raise KdctlError(f"--max-det {max_det}: {name} was exported with --max-det {e['max_det']}; "
                             f"use at most {e['max_det']} or re-export with a larger --max-det")
        return score_thr, nms_iou, max_det

    @torch.no_grad()
    def detect(self, images: Tensor, valid_sizes: Tensor, scales: Tensor, *, score_thr: float | None = None,
               nms_iou: float | None = None, max_det: int | None = None, keep_classes: Tensor | None = None) -> Detections:
        """Detections of letterboxed uint8 ``images`` ``[B, 3, H, W]``; ``valid_sizes`` int64
        ``[B, 2]`` (h', w') of each image inside the input, ``scales`` float32 ``[B, 2]`` (y, x)
        resized / original. Boxes in original-image pixels, best first within each image (as
        ``Detector.predict``). None settings take :attr:`postprocess`; see the module docstring
        for what an end-to-end file accepts. ``keep_classes``: bool ``[K]``, the classes to detect;
        the others are removed before NMS and the ``max_det`` cut, so they take no slot (an
        end-to-end graph has NMS inside: there they are removed from its output)."""
        self._check(images)
        score_thr, nms_iou, max_det = self._settings(score_thr, nms_iou, max_det)
        B, (H, W) = images.shape[0], images.shape[-2:]
        if self.kind == "onnx-end-to-end":
            boxes, scores, labels, num = self._run(images.cpu())
            rank = torch.arange(boxes.shape[1])[None, :]
            found = rank < num[:, None].long()
            if score_thr > self.meta[E2E_KEY]["score_thr"]:  # a stricter --conf on top (never for "centerness", see _settings)
                found &= scores > score_thr
            if keep_classes is not None:
                found &= keep_classes[labels.long().clamp(min=0)]
            found &= found.cumsum(dim=1) <= max_det  # the best max_det of what is left
            bidx, col = found.nonzero(as_tuple=True)  # batch-major, best first within an image
            return finalize(boxes[bidx, col], bidx, scores[bidx, col], labels[bidx, col].long(), valid_sizes, scales,
                            self.drop_empty)
        raw = self._run(images.to(self.device))
        det = self._detector
        full = torch.tensor([[H, W]], dtype=torch.long, device=self.device).expand(B, 2)
        d = det.postprocess(raw, full, torch.ones(B, 2, device=self.device), score_thr=score_thr, nms_iou=nms_iou,
                            topk_pre_nms=self.postprocess["topk_pre_nms"], max_per_image=max_det,
                            keep_classes=None if keep_classes is None else keep_classes.to(self.device))
        return finalize(d.boxes, d.batch_index, d.scores, d.labels, valid_sizes.to(self.device), scales.to(self.device),
                        self.drop_empty)


# ============================================================================= loading
def _one_line(exc: Exception) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


def _pick_device(device: str | torch.device, kind: str, path: Path) -> torch.device:
    from kdctl.engine.device import pick_device

    if kind.startswith("onnx"):
        if str(device) not in ("cpu", "auto"):
            raise KdctlError(f"--device {device}: {path.name} runs with onnxruntime on the CPU; use --device cpu")
        return torch.device("cpu")
    return pick_device(str(device))


def _skeleton(path: Path, meta: dict[str, str]):
    """The Detector (random weights) that ``meta``'s stored recipe describes: its decoder,
    priors and output layout turn an exported graph's raw outputs into detections."""
    from kdctl.artifact.stored import detector_from

    model, _, recipe, _ = detector_from(path, meta)
    return model.eval(), recipe


def _json(meta: dict[str, str], key: str, path: Path, kind: type):
    """``meta[key]`` parsed as JSON of type ``kind``; KdctlError naming the file and key when
    it is missing or malformed (a damaged or hand-edited file)."""
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError):
        value = None
    if not isinstance(value, kind):
        raise KdctlError(f"{path}: metadata {key!r} is missing or not valid ({kind.__name__} JSON expected); "
                         "re-export the file with kdctl export")
    return value


def _common(path: Path, kind: str, meta: dict[str, str], model, recipe, device) -> dict:
    size = tuple(_json(meta, "input_size", path, list))
    classes = meta["classes"].split("\n") if meta.get("classes") else []
    return {"path": path, "kind": kind, "classes": classes, "mean": tuple(_json(meta, "mean", path, list)),
            "std": tuple(_json(meta, "std", path, list)), "meta": meta, "recipe": recipe, "device": device,
            "postprocess": _json(meta, "postprocess", path, dict), "input_size": size, "default_input_size": size,
            "drop_empty": model.postprocess_rules["drop_empty"]}


def _load_pytorch(path: Path, device) -> ModelFile:
    from kdctl.export.source import default_input_size, read_detector

    src = read_detector(path)
    exported = "exported_from" in src.meta  # kdctl.export.source.export_meta writes it; training checkpoints lack it
    dev = _pick_device(device, "checkpoint", path)
    model = src.model.to(dev).eval()
    size = tuple(_json(src.meta, "input_size", src.file, list)) if exported and "input_size" in src.meta else default_input_size(src.recipe)
    mean, std = tuple(model.mean), tuple(model.std)
    return ModelFile(path=src.file, kind="safetensors" if exported else "checkpoint", classes=list(src.classes), mean=mean,
                     std=std, input_size=None, default_input_size=tuple(size), postprocess=src.postprocess_cfg(),
                     meta=dict(src.meta), recipe=src.recipe, _run=lambda x: model(normalise(x, mean, std)), _detector=model,
                     device=dev, drop_empty=model.postprocess_rules["drop_empty"])


def _load_onnx(path: Path, device, threads: int | None) -> ModelFile:
    import onnx

    from kdctl.export.onnx import OrtRunner

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise KdctlError(f"{path}: not a readable ONNX file ({_one_line(exc)}); give a file written by kdctl export") from None
    meta = {p.key: p.value for p in graph.metadata_props}
    del graph
    if meta.get("format") != FORMAT or "recipe" not in meta:
        raise KdctlError(f"{path}: is not a kdctl export (no kdctl metadata); kdctl runs the ONNX files that "
                         "`kdctl export --format onnx` writes")
    kind = "onnx-end-to-end" if E2E_KEY in meta else "onnx"
    dev = _pick_device(device, kind, path)
    runner = _any_batch(OrtRunner(path, threads=threads))
    model, recipe = _skeleton(path, meta)
    common = _common(path, kind, meta, model, recipe, dev)
    if kind == "onnx-end-to-end":
        meta[E2E_KEY] = _json(meta, E2E_KEY, path, dict)
        return ModelFile(**common, _run=runner)
    mean, std = common["mean"], common["std"]
    return ModelFile(**common, _run=lambda x: model.raw_from_tuple(runner(normalise(x, mean, std))), _detector=model)


def _any_batch(runner):
    """``runner`` as is when its graph's batch dimension is symbolic; else (a graph exported
    without ``--dynamic-batch``, batch fixed at 1) a callable that runs the images one by one
    and concatenates the outputs."""
    batch = runner.session.get_inputs()[0].shape[0]
    if not isinstance(batch, int):
        return runner

    def one_by_one(images: Tensor) -> tuple[Tensor, ...]:
        outs = [runner(images[i:i + 1]) for i in range(images.shape[0])]
        return tuple(torch.cat(parts) for parts in zip(*outs))

    return one_by_one


def _load_torchscript(path: Path, device) -> ModelFile:
    from kdctl.export.torchscript import TorchScriptRunner

    try:
        runner = TorchScriptRunner(path)
    except Exception as exc:  # torch.jit raises RuntimeError for anything it cannot read
        raise KdctlError(f"{path}: not a readable TorchScript file ({_one_line(exc)}); give a file written by kdctl export") from None
    meta = {k: str(v) for k, v in runner.meta.items()}
    if meta.get("format") != FORMAT or "recipe" not in meta:
        raise KdctlError(f"{path}: is not a kdctl export (no kdctl.json metadata); kdctl runs the TorchScript files that "
                         "`kdctl export --format torchscript` writes")
    dev = _pick_device(device, "torchscript", path)
    runner.module.to(dev)
    model, recipe = _skeleton(path, meta)
    model.to(dev)
    common = _common(path, "torchscript", meta, model, recipe, dev)
    mean, std = common["mean"], common["std"]
    return ModelFile(**common, _run=lambda x: model.raw_from_tuple(runner(normalise(x, mean, std))), _detector=model)


def load_model_file(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None) -> ModelFile:
    """Load a kdctl checkpoint or run directory, an exported ``.safetensors``, a raw or
    end-to-end ``.onnx`` or a ``.torchscript.pt`` / ``.pt`` file (see the module docstring).

    ``device``: ``cpu``, ``auto``, ``cuda[:N]`` (ONNX files run on the CPU only); ``threads``:
    onnxruntime intra-op threads (default: torch's). Nothing in the file runs code on load:
    safetensors weights, ONNX graphs and TorchScript archives (``torch.jit.load``, no pickled
    Python). KdctlError names the file when it is missing or not a kdctl model file."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".onnx"):
        if not p.is_file():
            raise KdctlError(f"{p}: no such file; give an .onnx written by kdctl export")
        return _load_onnx(p, device, threads)
    if name.endswith(".pt") or name.endswith(".torchscript"):
        if not p.is_file():
            raise KdctlError(f"{p}: no such file; give a .torchscript.pt written by kdctl export")
        return _load_torchscript(p, device)
    return _load_pytorch(p, device)
