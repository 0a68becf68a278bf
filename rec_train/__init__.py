"""rayrec training: data preparation, the recommender model, Ray Train + DeepSpeed training, export."""

__version__ = "0.1.0"
