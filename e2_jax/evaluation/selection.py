"""Where E²'s selection tokens look: the share of each group's picks that land on its own detail.

E²'s claim is that a group's selection tokens find the region of its entity (the brand tokens
the logo). On data that records where each small detail is (SynthFashion's `detail_boxes`: a
box per view and detail, -1 where the view does not show it), this is counted rather than
judged by eye. For each group and fusion block:

- `on_own`: of the group's picks in the views that show its own detail, the share on a patch
  that overlaps that detail's box; `chance`: the share of patches that overlap it (what a
  token picking a patch at random would score), over the same views;
- `on_any`: of the group's picks in every view, the share on a patch that overlaps any
  detail of that view; `chance_any`: the share of patches that do.

A group whose tag has no detail in the image (the description, the sub-category: the whole
silhouette) has `on_own` None. A patch overlaps a box when their interiors meet; the boxes are
in unit coordinates of the image as the model sees it (square images: SynthFashion's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patches_on_boxes(boxes: np.ndarray, grid: int) -> np.ndarray:
    """bool [..., grid * grid] (row-major, as the model's patches): which patches overlap
    each box of `boxes` [..., 4] (y0, x0, y1, x1; an absent box, y0 < 0, overlaps none)."""
    edges = np.arange(grid + 1) / grid
    y0, x0, y1, x1 = (boxes[..., i, None] for i in range(4))
    rows = (y0 < edges[1:]) & (y1 > edges[:-1])  # [..., grid]
    cols = (x0 < edges[1:]) & (x1 > edges[:-1])
    on = rows[..., :, None] & cols[..., None, :]
    return (on & (boxes[..., 0, None, None] >= 0)).reshape(*boxes.shape[:-1], grid * grid)


def picks_on_details(picks: np.ndarray, boxes: np.ndarray, grid: int, groups: Sequence[tuple[str, str, int]],
                     detail_fields: Sequence[str]) -> dict[str, dict]:
    """`picks` int [blocks, N, K] (patch index per fusion block, image and selection token),
    `boxes` float [N, D, 4] (each image's detail boxes), `groups` [(name, tag field, tokens)]
    in token order, `detail_fields` [D] (the tag field each detail shows). Returns
    {group: {"detail": field or None, "blocks": [{on_own, chance, images, on_any, chance_any}]}}
    (fractions in percent; `images`: how many views showed the group's detail)."""
    blocks, n, k = picks.shape
    if sum(t for _, _, t in groups) != k:
        raise ValueError(f"the groups have {sum(t for _, _, t in groups)} tokens, the picks {k}")
    if boxes.shape[:2] != (n, len(detail_fields)):
        raise ValueError(f"boxes {boxes.shape} do not match {n} images x {len(detail_fields)} details")
    on = patches_on_boxes(boxes, grid)  # [N, D, P]
    on_any = on.any(axis=1)  # [N, P]
    shown = boxes[..., 0] >= 0  # [N, D]
    report, start = {}, 0
    for name, field, tokens in groups:
        token_picks = picks[:, :, start : start + tokens]  # [blocks, N, t]
        start += tokens
        detail = detail_fields.index(field) if field in detail_fields else None
        rows = []
        for b in range(blocks):
            hit_any = np.take_along_axis(on_any, token_picks[b], axis=1)  # [N, t]
            row = {"on_any": 100 * float(hit_any.mean()), "chance_any": 100 * float(on_any.mean())}
            if detail is not None:
                views = shown[:, detail]
                hit = np.take_along_axis(on[:, detail], token_picks[b], axis=1)[views]
                row |= {"on_own": 100 * float(hit.mean()) if views.any() else float("nan"),
                        "chance": 100 * float(on[views, detail].mean()) if views.any() else float("nan"),
                        "images": int(views.sum())}
            else:
                row |= {"on_own": None, "chance": None, "images": 0}
            rows.append(row)
        report[name] = {"detail": field if detail is not None else None, "blocks": rows}
    return report


def table(report: dict[str, dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, rows) of `picks_on_details`: one row per group and fusion block."""
    header = ("group", "block", "picks on its own detail", "chance", "views with it", "picks on any detail", "chance")
    rows = []
    for name, entry in report.items():
        for b, row in enumerate(entry["blocks"]):
            own = ("no visual detail", "", "") if entry["detail"] is None else (
                f"{row['on_own']:.1f}", f"{row['chance']:.1f}", f"{row['images']:,}")
            rows.append((name, str(b + 1), *own, f"{row['on_any']:.1f}", f"{row['chance_any']:.1f}"))
    return header, rows
