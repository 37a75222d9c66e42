"""The napari plugin of neuroadda_rt (npe2 manifest ``napari.yaml``; ``pip install "neuroadda_rt[napari]"``).

- **Readers.** Every volume format :func:`neuroadda_rt.io.open_volume` reads (HDF5, zarr/OME-Zarr, N5, TIFF,
  slice folders, ``.npy``), lazily, with the voxel size as the layer scale; and the **annotation hand-off**
  folder written by ``neuroadda-rt select`` (:func:`neuroadda_rt.workflow.write_annotation`), opened as the
  selected tiles *in their surrounding context*, a labels layer pre-filled with the source model's segmentation
  (or the labels already painted), and the tile outlines.
- **Writer.** The proofread labels layer goes back into the hand-off's ``labels/`` folder, one uint32 TIFF per
  tile named like its image, where ``neuroadda-rt finetune`` reads them (checked with
  :func:`neuroadda_rt.workflow.read_annotation` before returning).
- **Dock widget** (:class:`~neuroadda_rt.napari._widget.RankSelectWidget`): rank source models and select tiles
  on the open image, the ranking in a table and the chosen tiles outlined in place, and write the hand-off.

The readers and the writer are plain functions on NumPy arrays and layer-data tuples: they import neither
napari nor Qt (only the widget does), and nothing outside this subpackage imports it.
"""

from __future__ import annotations

from pathlib import Path

#: The npe2 manifest (``[project.entry-points."napari.manifest"]`` points napari at it).
MANIFEST = Path(__file__).with_name("napari.yaml")

__all__ = ["MANIFEST"]
