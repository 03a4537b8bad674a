"""clip_train: CLIP-style multimodal pretraining (tiled ring contrastive loss, open_clip towers)."""
__version__ = "0.1.0"
