"""Reading AnnData, the bundled example datasets, corpora and collators."""

from .examples import EXAMPLES, example_path, load_example

__all__ = ["EXAMPLES", "example_path", "load_example"]
