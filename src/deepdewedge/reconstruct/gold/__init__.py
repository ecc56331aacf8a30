"""Gold fiducials: find them in tilt images and erase them before reconstruction."""

from deepdewedge.reconstruct.gold.erase import erase_gold_beads
from deepdewedge.reconstruct.gold.find import find_gold_beads, find_gold_beads_in_tilt_series

__all__ = ["find_gold_beads", "find_gold_beads_in_tilt_series", "erase_gold_beads"]
