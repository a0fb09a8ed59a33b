"""Masks: the subnetwork as one type and one file format shared by every command."""

from rlsparse.masks.mask import FORMAT, SCHEMA_VERSION, Mask, MaskMeta, MaskWriter, load_mask, pack, unpack

__all__ = ["FORMAT", "SCHEMA_VERSION", "Mask", "MaskMeta", "MaskWriter", "load_mask", "pack", "unpack"]
