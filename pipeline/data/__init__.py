"""WebDataset loading for pre-training (mixed image/video sources) and evaluation."""
from pipeline.data.evalset import EvalSamples, build_eval_samples
from pipeline.data.loader import TrainLoader, build_train_loader
from pipeline.data.shards import DataError
from pipeline.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["DataError", "EvalSamples", "TrainLoader", "build_eval_samples", "build_train_loader",
           "load_tokenizer", "train_tokenizer"]
