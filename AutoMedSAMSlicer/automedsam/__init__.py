"""AutoMedSAM: learned-prompt SAM-family segmentation of medical volumes (Slicer-free core).

Importing this package is cheap and has no side effects: torch, SimpleITK, segment-anything and
sam2 are imported lazily by the functions that need them.

Conventions used throughout the package (every docstring restates what applies to it):

- Voxel arrays are numpy arrays indexed ``array[k, j, i]`` ("KJI"), i.e. slices, rows, columns,
  with ``i`` the fastest-varying index. This is the order of SimpleITK's ``GetArrayFromImage`` and
  of Slicer's ``slicer.util.arrayFromVolume``. Voxel *indices and coordinates* given as tuples or
  point lists are always in ``(i, j, k)`` order, as ITK and Slicer index them.
- Physical coordinates are millimetres in LPS (the DICOM/ITK patient frame) unless a name says
  ``ras`` (Slicer's frame); :mod:`automedsam.volume` converts exactly between them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
