"""TFDS builders for preference data (array_record, no TensorFlow); importing registers them.

- ``preference_files``: your local files (``prepare_files``), one config per shape.
- ``hh_rlhf``: Anthropic HH-RLHF, configs per subset and ``all``.
- ``ultrafeedback_binarized``: HuggingFaceH4/ultrafeedback_binarized preference splits.
- ``helpsteer2``: nvidia/HelpSteer2 as ``pairs`` or ``ranked``.

Prepared datasets read back as canonical examples with ``prefjax.data.load_source``.
"""

from prefjax.data.builders.base import PreferenceBuilder
from prefjax.data.builders.helpsteer2 import Helpsteer2, Helpsteer2Config
from prefjax.data.builders.hh_rlhf import HhRlhf, HhRlhfConfig
from prefjax.data.builders.local import PreferenceFiles, PreferenceFilesConfig, prepare_files
from prefjax.data.builders.ultrafeedback import UltrafeedbackBinarized

__all__ = ["PreferenceBuilder", "PreferenceFiles", "PreferenceFilesConfig", "prepare_files", "HhRlhf",
           "HhRlhfConfig", "UltrafeedbackBinarized", "Helpsteer2", "Helpsteer2Config"]
