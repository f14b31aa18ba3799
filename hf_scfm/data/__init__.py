"""Reading AnnData, the bundled example datasets, corpora (build, load, stream) and collators."""

from . import collators
from .collators import (
    DataCollatorForCellClassification,
    DataCollatorForGeneMLM,
    DataCollatorForMaskedExpression,
    DataCollatorForMaskedRegression,
    DataCollatorForNextGene,
    DataCollatorForPerturbation,
)
from .corpus import CorpusBuildReport, build_corpus
from .examples import EXAMPLES, example_path, load_example
from .loading import (
    CorpusFormatError,
    LengthGroupedBatchSampler,
    length_grouping_arguments,
    load_corpus,
    split_by_column,
    split_by_node,
)
from .pooling import pool_cells
from .streaming import CollatedBatches, iter_batches

__all__ = [
    "EXAMPLES",
    "example_path",
    "load_example",
    "pool_cells",
    "build_corpus",
    "CorpusBuildReport",
    "load_corpus",
    "iter_batches",
    "CollatedBatches",
    "CorpusFormatError",
    "split_by_column",
    "split_by_node",
    "LengthGroupedBatchSampler",
    "length_grouping_arguments",
    *collators.__all__,
]
