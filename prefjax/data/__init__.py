"""Preference data: files and public datasets -> canonical examples -> batches.

Canonical examples (format: prefjax.data.records) come from ``load_source`` (local files,
a prepared TFDS directory, or a registered builder); ``prefjax.data.builders`` holds the TFDS
builders (imported on demand, since it imports tensorflow_datasets). The grain pipeline
(``pipeline``) turns them into prefjax.batch.Batch values; ``streams`` are what the trainer
reads (the pipeline, prefix-shared rows, synthetic batches). ``label_noise`` flips a chosen
fraction of preferences; ``synthetic_batches`` and ``synthetic_logps`` make random batches and
random loss inputs for tests, benchmarks and smoke runs.
"""

from prefjax.data.formats import FORMATS, check_format, detect_row_format, iter_parse, parse_as
from prefjax.data.pipeline import DataConfig, Pipeline, PipelineConfig
from prefjax.data.readers import detect_format, expand_paths, read_examples, read_rows
from prefjax.data.records import (
                                  KINDS,
                                  DataError,
                                  LoadSummary,
                                  Location,
                                  parse_label,
                                  parse_row,
)
from prefjax.data.sources import (
                                  ListSource,
                                  TfdsSource,
                                  from_files,
                                  from_tfds_builder,
                                  from_tfds_directory,
                                  load_source,
)

__all__ = [
    "FORMATS", "KINDS", "DataConfig", "DataError", "ListSource", "LoadSummary", "Location", "Pipeline",
    "PipelineConfig", "TfdsSource", "check_format", "detect_format", "detect_row_format", "expand_paths",
    "from_files", "from_tfds_builder", "from_tfds_directory", "iter_parse", "load_source", "parse_as",
    "parse_label", "parse_row", "read_examples", "read_rows",
]
