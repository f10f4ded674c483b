"""Data pipeline: one sample schema, webdataset shards, converters and a streaming loader.

See ``docs/data.md`` for the schema, the converters and the streaming/resume semantics.
"""
from rsmoe.data.schema import PARTS, Sample, validate_record
from rsmoe.data.splitter import split_caption

__all__ = ["PARTS", "Sample", "validate_record", "split_caption"]
