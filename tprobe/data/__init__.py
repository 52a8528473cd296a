"""Data in: discover images, read them (PNG/TIFF/OME-TIFF, fields of view + masks), preprocess cells into views."""
