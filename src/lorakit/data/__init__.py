"""Training data: read, validate, tokenize with loss masks, split, batch; plus the demo task.

The usual pipeline::

    records = read_records("train.jsonl")                   # validated up front (DataError)
    train, valid = split_records(records, 0.1, seed=0)
    examples, stats = tokenize_records(train, tokenizer, max_length=512)
    batch = Collator(tokenizer)(examples[:8])                # padded torch tensors
    pairs = eval_pairs(valid, tokenizer)                     # (rendered prompt, reference)

Nothing here imports transformers; any Hugging Face tokenizer object can be passed in.
"""

from .collate import Collator
from .demo_task import demo_records, write_demo_dataset
from .metrics import exact_match
from .packing import IGNORE, pack_examples
from .readers import read_records
from .records import Record
from .render import EvalPair, eval_pairs, has_chat_template
from .split import load_splits, split_records
from .tokenize import DatasetStats, tokenize_records

__all__ = [
    "IGNORE",
    "Collator",
    "DatasetStats",
    "EvalPair",
    "Record",
    "demo_records",
    "eval_pairs",
    "exact_match",
    "has_chat_template",
    "load_splits",
    "pack_examples",
    "read_records",
    "split_records",
    "tokenize_records",
    "write_demo_dataset",
]
