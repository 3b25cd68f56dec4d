"""The common TFDS builder for preference data: array_record files, one JSON text column per field.

Subclasses say which kind they store (``_kind``) and feed canonical examples to
``_write_examples``; the base class sets the features (see ``codec``), keeps file order
(``disable_shuffling``: the pipeline shuffles, and file order makes a prepared dataset easy to
compare with its source), applies the error policy, and stores each split's ``LoadSummary`` in
the dataset's metadata (``builder.info.metadata["load_summary"][split]``), so skipped rows stay
visible after preparation.

No TensorFlow: the default ``file_format`` is "array_record", read back with
``as_data_source``; never call ``as_dataset``/``tfds.load``.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Iterable, Iterator

import tensorflow_datasets as tfds

from prefjax.data.builders import codec
from prefjax.data.records import DataError, LoadSummary, check_on_error, handle_error

log = logging.getLogger(__name__)


class PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of prefjax's preference builders (not registered itself)."""

    # Named public datasets skip (and count) the handful of broken rows real data has; local files
    # raise by default so a user sees their own data problems at once.
    DEFAULT_ON_ERROR = "skip"

    def __init__(self, *, on_error: str | None = None, file_format: str = "array_record", **kwargs: Any):
        self.on_error = on_error or self.DEFAULT_ON_ERROR
        check_on_error(self.on_error)
        super().__init__(file_format=file_format, **kwargs)

    @abc.abstractmethod
    def _kind(self) -> str:
        """"pair", "unpaired" or "ranked"."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {key: tfds.features.Text(doc="JSON text of the canonical value")
             for key in codec.FEATURE_KEYS[self._kind()]})
        return self.dataset_info_from_configs(features=features, disable_shuffling=True,
                                              metadata=tfds.core.MetadataDict(), description=self.__doc__,
                                              homepage=getattr(self, "HOMEPAGE", None))

    def _handle(self, error: DataError, summary: LoadSummary) -> None:
        handle_error(error, self.on_error, summary)

    def _write_examples(self, split: str, examples: Iterable[dict[str, Any]],
                        summary: LoadSummary) -> Iterator[tuple[int, dict[str, str]]]:
        """Encodes examples with sequential keys; records ``summary`` once the split is written."""
        count = 0
        for count, example in enumerate(examples, start=1):
            if example["kind"] != self._kind():
                raise ValueError(f"{self.name}: a {example['kind']} example in a {self._kind()} dataset "
                                 f"({example['source']})")
            yield count, codec.encode(example)
        summary.examples = count
        self.info.metadata.setdefault("load_summary", {})[split] = summary.as_dict()
        if summary.num_skipped or summary.filtered:
            config = f"/{self.builder_config.name}" if self.builder_config else ""
            log.warning("%s%s split %s: %s", self.name, config, split, summary)
