"""Reading and writing EM data: the I/O layer.

- :mod:`.volumes` -- :func:`open_volume` and the lazy :class:`Volume` over HDF5, zarr/OME-Zarr,
  N5, TIFF, slice folders, Neuroglancer precomputed and ``.npy``. A new volume format is a new
  backend there. :func:`load_npy` reads a ``.npy`` whose header was checked against the file size.
- :mod:`.images` -- :func:`read_image_2d`, the one decoder of 2-D image files and its one
  colour rule (luminance for intensities, never mixed for labels).
- :mod:`.intensity` -- :func:`normalize_intensity` and :func:`intensity_rule`, the one intensity
  normalisation.
- :mod:`.writers` -- atomic writers (temporary file, then rename), and the OME-Zarr writers
  :func:`write_ome_zarr` (in memory, atomic) and :func:`create_ome_zarr` (empty, filled block by block).
"""

from .images import image_dtype, read_image_2d, read_image_stack
from .intensity import freeze_rule, intensity_rule, normalize_intensity, normalize_tiles
from .volumes import Volume, load_npy, natural_sort_key, open_volume, read_npy_header
from .writers import create_ome_zarr, write_n5, write_ome_zarr, write_slices, write_tiff, write_volume

__all__ = [
    "Volume",
    "open_volume",
    "read_image_2d",
    "read_image_stack",
    "normalize_intensity",
    "intensity_rule",
    "freeze_rule",
    "normalize_tiles",
    "write_volume",
    "write_tiff",
    "write_n5",
    "write_slices",
    "write_ome_zarr",
    "create_ome_zarr",
    "natural_sort_key",
    "load_npy",
    "read_npy_header",
    "image_dtype",
]
