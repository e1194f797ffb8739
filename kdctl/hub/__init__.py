"""Teacher hub: kdctl's registry of published COCO detectors, verified resumable downloads, and
conversion into kdctl checkpoints (see docs/fetch.md).

- :mod:`kdctl.hub.registry`: the table (``TEACHERS``), COCO class names;
- :mod:`kdctl.hub.download`: ``download`` (HTTP Range resume, SHA-256 check, atomic move), ``cache_home``;
- :mod:`kdctl.hub.convert_torchvision` / :mod:`kdctl.hub.convert_mmdet`: state-dict key mapping;
- :mod:`kdctl.hub.fetch`: ``fetch`` (name / URL / local file -> teachers/NAME.safetensors).
"""
from kdctl.hub.registry import TEACHERS, Teacher, get_teacher


def registry_rows() -> list[dict]:
    """One plain dict per registry entry, in table order (what ``kdctl fetch --list`` shows)."""
    return [{"name": t.name, "source": t.source, "detector": t.head, "backbone": t.backbone_label,
             "timm_backbone": t.detector["backbone"], "schedule": t.schedule, "box_ap": t.box_ap, "size_mb": t.size_mb,
             "url": t.url, "sha256": t.sha256, "sha256_prefix": t.sha256_prefix, "notes": t.notes}
            for t in TEACHERS.values()]


__all__ = ["TEACHERS", "Teacher", "get_teacher", "registry_rows"]
