"""Typed run configuration: dataclasses, YAML files, ``key=value`` overrides.

A run is described by one :class:`RunConfig` made of sections (``data``, ``model``, ``method``,
``train``, ``sample``, and optionally ``text`` and ``modality``). YAML files under ``configs/`` fill it;
``--set train.lr=3e-4`` overrides a field. Every key is checked against the dataclass it lands in: an
unknown key, a wrong type or a value out of range raises :class:`ConfigError` naming the key *before*
any training starts.

The ``method`` section is open-ended: its ``name`` picks a method (``selfflow.methods``), and the
remaining keys are validated against that method's own config dataclass.

One module per section, and the loader on top; every name is importable from ``selfflow.config``:

=============  =====================================================================================
``fields``     checking values: choices, types (``from_dict``), scalars of ``key=value``, YAML files
``data``       :class:`DataConfig`
``model``      :class:`ModelConfig` and the named sizes
``train``      :class:`TrainConfig`: steps, optimiser, precision, devices, compile, checkpoints, loggers
``sample``     :class:`SampleConfig`: the sampler a run and its exported model draw with
``text``       :class:`TextConfig` (optional section): captions and their encoder
``modality``   :class:`ModalityConfig` (optional section): video, audio, audio-video, actions
``represent``  the ``method`` section of representation learning, and :class:`ProbeConfig`
``methods``    the ``method`` section of generator training: one dataclass per method
``run``        :class:`RunConfig`, ``load_config``, overrides, ``sample_settings`` (the loader on top)
``pipeline``   :class:`PipelineConfig`: ``selfflow pipeline``'s stages
=============  =====================================================================================
"""
from __future__ import annotations

from selfflow.errors import ConfigError  # noqa: F401  (re-exported: the error's old home)
from selfflow.config.fields import (  # noqa: F401
    check_choice, coerce_value, from_dict, _one_line_yaml, parse_scalar, read_yaml_mapping, _type_name,
)
from selfflow.config.data import (  # noqa: F401
    BAD_IMAGE_POLICIES, CROPS, DATA_NAMES, DATA_SPLITS, STREAMED_DATA, DataConfig,
)
from selfflow.config.model import (  # noqa: F401
    MODEL_SIZES, POS_EMBEDS, ModelConfig,
)
from selfflow.config.train import (  # noqa: F401
    COMPILE_MODES, CUDA_GRAPH_MODES, DEVICE_NAMES, DISTRIBUTED_MODES, LOGGERS, PRECISIONS, TrainConfig,
    check_device,
)
from selfflow.config.sample import (  # noqa: F401
    NOISE_INJECTING_SAMPLERS, SAMPLER_NAMES, SampleConfig,
)
from selfflow.config.text import (  # noqa: F401
    TEXT_ENCODERS, TextConfig,
)
from selfflow.config.modality import (  # noqa: F401
    AUDIO_SOURCES, DIGIT_SOURCES, MODALITY_KINDS, OBSERVATION_KINDS, POLICY_KINDS, ModalityConfig,
)
from selfflow.config.represent import (  # noqa: F401
    REPRESENT_ENCODERS, REPRESENT_METHODS, ProbeConfig, RepresentConfig, SimClrConfig, StableRepConfig,
    SupConConfig, SupervisedConfig,
)
from selfflow.config.methods import (  # noqa: F401
    DISTILL_LOSSES, ENCODER_KINDS, FEW_STEPS, INCEPTION_STAGES, MASK_MODES, METHOD_CONFIGS, PAIR_METHODS,
    TIME_DISTRIBUTIONS, DistillConfig, Dmd2Config, DmdConfig, FlowMatchingConfig, MethodConfig, ReflowConfig,
    RegressionConfig, RepaConfig, SelfFlowConfig, method_config_from_dict, method_name_of,
)
from selfflow.config.run import (  # noqa: F401
    OPTIONAL_SECTIONS, SECTION_TYPES, RunConfig, apply_overrides, config_from_dict, load_config, move_legacy_keys,
    sample_settings,
)
from selfflow.config.pipeline import (  # noqa: F401
    PIPELINE_SECTIONS, STUDENT_KINDS, EvaluateStage, PipelineConfig, PipelineSettings, StudentStage, SynthStage,
    apply_pipeline_overrides, load_pipeline_config, pipeline_config_from_dict, _refuse_pipeline_keys, _stage_run,
)
