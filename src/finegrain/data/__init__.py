"""Reading, writing and splitting labelled examples."""

from finegrain.data.readers import Example, ReadResult, check_labels, read_examples, write_examples
from finegrain.data.split import infer_labels, stratified_split, stratified_subset

__all__ = [
    "Example",
    "ReadResult",
    "check_labels",
    "infer_labels",
    "read_examples",
    "stratified_split",
    "stratified_subset",
    "write_examples",
]
