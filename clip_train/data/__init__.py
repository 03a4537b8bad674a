"""Training data: webdataset shards to batch dicts ``{"image": Tensor, "text": LongTensor, "skipped": int}``."""
from .loader import TrainData, build_train_data
from .shards import DataError, count_samples, expand_shards

__all__ = ["DataError", "TrainData", "build_train_data", "count_samples", "expand_shards"]
