"""Figure and ground: the region a sketch's outlines enclose, filled, for fill guidance (a silhouette LGP guided
alongside the edge LGP, docs/guidance.md "Fill guidance").

An outline says where the edges go, not which side of them is the shape; a ring that fills the frame, or a shape whose
outline the frame cuts, is read either way. `fill_sketch` makes the filled silhouette a user would have drawn: the
regions the strokes close (across gaps of a few pixels), or, where nothing is closed inside the frame, the region the
strokes bound most and the frame least."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw

from .sketch import SketchInput, prepare_sketch

# The fill is found at about this many pixels on the sketch's shorter side (any stroke in a block counts), so that the
# gaps it closes are the same fraction of the drawing at any output size.
FILL_WORKING_SIDE = 64
# Strokes are thickened by 1 to this many pixels (at the working size) until they enclose something: gaps of up to
# twice this many pixels are closed.
MAX_GAP_CLOSING = 4
# A region counts only from this fraction of the strokes' bounding box (a smaller one is a loop in a stroke).
MIN_REGION_FRACTION = 0.05


def _dilate(mask: np.ndarray, times: int, border: bool = False) -> np.ndarray:
    """`mask` grown by `times` pixels (3x3 square steps); `border` is the value assumed outside the frame."""
    for _ in range(times):
        padded = np.pad(mask, 1, constant_values=border)
        h, w = mask.shape
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= padded[dy : dy + h, dx : dx + w]
    return mask


def _erode(mask: np.ndarray, times: int) -> np.ndarray:
    """`mask` shrunk by `times` pixels, the frame's outside counted as inside the mask (a fill keeps its border)."""
    return ~_dilate(~mask, times, border=False)


def _regions(free: np.ndarray) -> tuple[np.ndarray, int]:
    """The 4-connected regions of `free`: a label per pixel (0 outside `free`) and their number."""
    labels = PIL.Image.fromarray(np.where(free, -1, 0).astype(np.int32), mode="I")
    count = 0
    for y, x in zip(*np.nonzero(free), strict=True):
        if labels.getpixel((int(x), int(y))) == -1:
            count += 1
            PIL.ImageDraw.floodfill(labels, (int(x), int(y)), count)
    return np.asarray(labels, dtype=np.int64), count


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every region it encloses (not 4-connected to the frame's border) filled."""
    labels, _ = _regions(np.pad(~mask, 1, constant_values=True))
    return labels[1:-1, 1:-1] != labels[0, 0]


def fill_strokes(strokes: np.ndarray) -> np.ndarray:
    """The filled shape that the boolean stroke map `strokes` outlines (see the module's doc), as a boolean map of the
    same size; the strokes themselves where they outline nothing."""
    ys, xs = np.nonzero(strokes)
    if len(ys) == 0:
        return strokes.copy()
    min_area = max(4.0, MIN_REGION_FRACTION * (np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    # Closed outlines, across gaps that thicker strokes close; then thinned back to the strokes' middle.
    for width in range(1, MAX_GAP_CLOSING + 1):
        thick = _dilate(strokes, width)
        filled = _fill_holes(thick)
        if (filled & ~thick).sum() >= min_area:
            return _erode(filled, width) | strokes
    # Nothing closed inside the frame: the frame's border closes the outline. The figure is the region that the
    # strokes bound most and the frame least, more by strokes than by the frame (a line across the page outlines no
    # half of it), and never one that reaches all four sides (that is the ground).
    best, best_score = None, 0.5
    for width in range(1, MAX_GAP_CLOSING + 1):
        thick = _dilate(strokes, width)
        labels, count = _regions(~thick)
        for label in range(1, count + 1):
            region = labels == label
            edges = (region[0], region[-1], region[:, 0], region[:, -1])
            if all(edge.any() for edge in edges) or region.sum() < min_area:
                continue
            on_strokes = (_dilate(region, 1) & thick).sum()
            on_frame = sum(int(edge.sum()) for edge in edges)
            score = on_strokes / max(on_strokes + on_frame, 1)
            if score > best_score:
                best, best_score = _dilate(region, width), score
    return strokes.copy() if best is None else best | strokes


def fill_sketch(sketch: SketchInput, height: int, width: int) -> PIL.Image.Image:
    """The filled silhouette of `sketch` (any input `prepare_sketch` accepts, either polarity) at `height` x `width`:
    a mode-L image, the shape white on black, as silhouette LGPs read it.

    Raises:
        ValueError: for a sketch `prepare_sketch` refuses (a blank one, an unreadable file).
    """
    strokes = prepare_sketch(sketch, height, width)[0, 0].numpy() > 0
    factor = max(1, min(height, width) // FILL_WORKING_SIDE)
    if factor > 1:  # a block with any stroke in it is a stroke
        h, w = -(-height // factor) * factor, -(-width // factor) * factor
        padded = np.pad(strokes, ((0, h - height), (0, w - width)))
        strokes = padded.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))
    filled = PIL.Image.fromarray(fill_strokes(strokes).astype(np.uint8) * 255, mode="L")
    if factor > 1:
        filled = filled.resize((filled.width * factor, filled.height * factor), PIL.Image.Resampling.BILINEAR)
        filled = filled.crop((0, 0, width, height)).point(lambda v: 255 if v >= 128 else 0)
    return filled
