"""Evaluation: FID, FD_dom, k-NN precision/recall, class-conditional accuracy, sampler speed.

- ``frechet``: the Fréchet distance (float64) and streaming ``FeatureStats``;
- ``features``: running a feature network over images in batches, with a progress bar;
- ``inception``: the FID Inception-v3: weight lookup, preprocessing, the one wrapper that runs it;
- ``stats_cache``: reference statistics cached under a hash of everything that made them;
- ``feature_net``: the small CNN classifier whose 128-d features define FD_dom, and its training;
- ``precision_recall``: Kynkäänniemi et al. (2019) k-NN manifold precision and recall;
- ``metrics``: ``evaluate(...)`` (one report with every protocol field) and
  ``measure_sampler_speed``;
- ``cli``: the ``selfflow eval`` command.
"""
from selfflow.files import cache_root, sha256_file

from .feature_net import (FeatureNet, FeatureNetConfig, conditional_accuracy, feature_net_for, load_feature_net,
                          save_feature_net, train_feature_net, train_on_dataset)
from .features import compute_stats, extract_features, iterate_batches
from .frechet import FeatureStats, frechet_distance
from .inception import (InceptionExtractor, InceptionNetwork, find_default_inception, inception_features,
                        load_inception, preprocess_for_inception, resolve_inception_path)
from .metrics import METRICS, environment_info, evaluate, measure_sampler_speed
from .precision_recall import PrecisionRecall, knn_radii, precision_recall
from .stats_cache import cache_key, cached_stats, reference_stats

__all__ = [
    "FeatureNet", "FeatureNetConfig", "conditional_accuracy", "feature_net_for", "load_feature_net",
    "save_feature_net", "train_feature_net", "train_on_dataset", "FeatureStats", "InceptionExtractor",
    "InceptionNetwork", "cache_key", "cache_root", "cached_stats", "compute_stats", "extract_features",
    "find_default_inception", "frechet_distance", "inception_features", "iterate_batches", "load_inception",
    "preprocess_for_inception", "reference_stats", "resolve_inception_path", "sha256_file", "METRICS",
    "environment_info", "evaluate", "measure_sampler_speed", "PrecisionRecall", "knn_radii", "precision_recall",
]
