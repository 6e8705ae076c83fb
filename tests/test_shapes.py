"""The demo's procedural dataset: the maps it writes beside its images line up with the shapes drawn."""

import json

import cv2
import numpy as np

from benchmarks.efficacy import iou
from pipeline_sketch_guided.training.shapes import (
    render_drawn_edges,
    render_sample,
    render_silhouette,
    shape_mask,
    write_image_folder,
)


def distance_to_outline(filled: np.ndarray) -> np.ndarray:
    """Each pixel's distance (pixels) to the nearest pixel of the filled mask's outline."""
    outline = filled & ~cv2.erode(filled.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return cv2.distanceTransform((~outline).astype(np.uint8), cv2.DIST_L2, 3)


def test_silhouettes_and_drawn_outlines_lie_on_the_shapes_of_their_image():
    for seed in range(1_000_000, 1_000_012):
        _, _, shapes = render_sample(seed)
        filled = np.logical_or.reduce([shape_mask(shape) for shape in shapes])
        assert iou(np.asarray(render_silhouette(shapes)) > 127, filled) > 0.9
        drawn = np.asarray(render_drawn_edges(shapes, seed))
        strokes = drawn > 60
        assert np.median(drawn) == 0 and drawn.max() > 200  # light strokes on black, the edge LGP's convention
        assert strokes.mean() < filled.mean()  # outlines, not fills
        # The strokes follow the outlines (bent by a few pixels at most), and cover most of them (breaks aside).
        distance = distance_to_outline(filled)
        assert np.mean(distance[strokes] <= 4) > 0.9, seed
        assert np.mean(cv2.dilate(strokes.astype(np.uint8), np.ones((7, 7), np.uint8))[distance == 0] > 0) > 0.7


def test_drawn_outlines_are_seeded_and_vary_in_style():
    _, _, shapes = render_sample(1_000_003)
    first, again = np.asarray(render_drawn_edges(shapes, 7)), np.asarray(render_drawn_edges(shapes, 7))
    assert np.array_equal(first, again)
    widths = {(np.asarray(render_drawn_edges(shapes, seed)) > 60).sum() for seed in range(8)}
    assert max(widths) > 1.5 * min(widths)  # thin and thick strokes


def test_the_image_folder_holds_each_images_maps_under_its_name(tmp_path):
    write_image_folder(
        tmp_path / "images", 3, first_seed=10, silhouettes_dir=tmp_path / "s", drawn_edges_dir=tmp_path / "d"
    )
    names = [
        json.loads(line)["file_name"] for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()
    ]
    assert names == ["0000010.png", "0000011.png", "0000012.png"]
    for folder in ("images", "s", "d"):
        assert sorted(p.name for p in (tmp_path / folder).glob("*.png")) == names
