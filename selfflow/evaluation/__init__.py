"""Evaluation: FID, FD_dom, k-NN precision/recall, class-conditional accuracy, sampler speed.

- ``fid``: Fréchet distance (float64), streaming ``FeatureStats``, the TorchScript FID
  Inception-v3 and its preprocessing, and the reference-statistics cache keyed by a hash of
  everything that made the statistics;
- ``feature_net``: the small CNN classifier whose 128-d features define FD_dom;
- ``precision_recall``: Kynkäänniemi et al. (2019) k-NN manifold precision and recall;
- ``metrics``: ``evaluate(...)`` (one report with every protocol field) and
  ``measure_sampler_speed``.
"""
from .feature_net import (FeatureNet, FeatureNetConfig, conditional_accuracy, load_feature_net,
                          save_feature_net, train_feature_net)
from .fid import (FeatureStats, InceptionExtractor, cache_key, cached_stats, compute_stats,
                  extract_features, find_default_inception, frechet_distance, inception_features,
                  load_inception, preprocess_for_inception, reference_stats, sha256_file)
from .metrics import METRICS, environment_info, evaluate, measure_sampler_speed
from .precision_recall import PrecisionRecall, knn_radii, precision_recall

__all__ = [
    "FeatureNet", "FeatureNetConfig", "conditional_accuracy", "load_feature_net", "save_feature_net",
    "train_feature_net", "FeatureStats", "InceptionExtractor", "cache_key", "cached_stats", "compute_stats",
    "extract_features", "find_default_inception", "frechet_distance", "inception_features", "load_inception",
    "preprocess_for_inception", "reference_stats", "sha256_file", "METRICS", "environment_info", "evaluate",
    "measure_sampler_speed", "PrecisionRecall", "knn_radii", "precision_recall",
]
