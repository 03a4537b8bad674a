"""clip-prep: turn local (media, caption) pairs into img2dataset/open_clip-compatible webdataset shards."""

__version__ = "0.1.0"
