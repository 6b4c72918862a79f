"""The medical Q&A data pipeline: load, clean, split, format with the chat template, batch.

    from data import prepare_data
    prepared = prepare_data(tokenizer, source=None, num_examples=None, seed=42, max_length=512)
    prepared.examples.train[0].labels  # -100 on the prompt, token ids on the answer and its EOS
"""

from data.batching import collate, epoch_steps, micro_batches, padding_fraction
from data.clean import CleaningReport, QAPair, clean_rows, normalize
from data.format import IGNORE_INDEX, SYSTEM_PROMPT, EncodedExample, build_messages, encode_example, prompt_ids, prompt_text
from data.load import EMBEDDED_DATASET, DataError, load_rows
from data.pipeline import PreparedData, check_max_length, prepare_data, save_length_histogram
from data.split import SCOPE_TOPICS, Splits, check_num_examples, repeat_scope_rows, sample_and_split

__all__ = [
    "CleaningReport",
    "DataError",
    "EMBEDDED_DATASET",
    "EncodedExample",
    "IGNORE_INDEX",
    "PreparedData",
    "QAPair",
    "SYSTEM_PROMPT",
    "Splits",
    "build_messages",
    "check_max_length",
    "check_num_examples",
    "clean_rows",
    "collate",
    "encode_example",
    "epoch_steps",
    "load_rows",
    "micro_batches",
    "normalize",
    "padding_fraction",
    "prepare_data",
    "prompt_ids",
    "prompt_text",
    "sample_and_split",
    "save_length_histogram",
    "repeat_scope_rows",
    "SCOPE_TOPICS",
]
