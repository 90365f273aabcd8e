"""Pictures of the quality feature map (the 8-channel m x m map that the teacher's decoder and the
student both output): where in the image the model's quality features respond.

`render(image, feature_map)` gives one PNG-ready panel, left to right: the input as the model saw
it, the map's mean over channels laid over it, and the 8 channels on their own (2 rows of 4). Each
picture is scaled to its own range (the map's units are the model's, not a quality scale), with a
colour ramp from dark purple (low) through red to yellow (high).
"""
import numpy as np
from PIL import Image, ImageDraw

SIDE = 256  # pixels of the thumbnail and of the overlay
GAP = 8
# Anchors of the colour ramp (an inferno-like ramp: perceptually ordered, readable in grey).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """(h, w) numbers -> (h, w, 3) uint8 colours, the lowest value dark, the highest yellow."""
    low, high = float(values.min()), float(values.max())
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values, np.float32)
    position = unit * (len(_RAMP) - 1)
    below = np.clip(np.floor(position).astype(int), 0, len(_RAMP) - 2)
    frac = (position - below)[..., None]
    return np.rint(_RAMP[below] * (1 - frac) + _RAMP[below + 1] * frac).astype(np.uint8)


def _upsampled(colours: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(colours).resize((side, side), Image.Resampling.BILINEAR)


def render(image: np.ndarray, feature_map: np.ndarray, title: str = "") -> Image.Image:
    """The panel for one image: `image` (S, S, 3) in [0, 1] as preprocessed for the model,
    `feature_map` (m, m, C) its quality feature map; `title` is written above."""
    if feature_map.ndim != 3:
        raise ValueError(f"feature map of shape {feature_map.shape}: expected (m, m, channels)")
    thumb = Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (SIDE, SIDE), Image.Resampling.BILINEAR)
    overlay = Image.blend(thumb, _upsampled(colorize(feature_map.mean(-1)), SIDE), 0.6)
    channels = feature_map.shape[-1]
    columns = (channels + 1) // 2
    tile = (SIDE - GAP) // 2
    top = 20 if title else 0
    panel = Image.new("RGB", (2 * SIDE + columns * (tile + GAP) + GAP, SIDE + top), "white")
    panel.paste(thumb, (0, top))
    panel.paste(overlay, (SIDE + GAP, top))
    for c in range(channels):
        row, col = divmod(c, columns)
        at = (2 * SIDE + GAP + col * (tile + GAP), top + row * (tile + GAP))
        panel.paste(_upsampled(colorize(feature_map[..., c]), tile), at)
    if title:
        ImageDraw.Draw(panel).text((4, 4), title, fill="black")
    return panel
